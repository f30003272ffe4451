"""The open-loop sender: every request leaves at its scheduled time, whatever is pending.

A dispatcher sleeps until each request's ``send_offset_s`` and starts it as its own task,
so a slow or stuck request never delays the next send (an open loop, like real users).
Each request is bounded by ``request_timeout_s``, so the whole run ends by the last
send time plus that timeout. Every request ends in exactly one ``RequestRecord``:

- ``COMPLETED``: the stream ended normally with at least one token;
- ``REJECTED``: the client raised ``Rejected`` (reason kept);
- ``FAILED``: ``RequestFailed``, a timeout, a stream with no tokens, or an unexpected
  client exception (its type and message kept as the reason).

Times are seconds from the run's start, read from ``time.monotonic``; token arrival times
are taken here, as each stream event arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field

from bench.replay.client import Rejected, ReplayClient, RequestFailed, StreamEvent
from bench.replay.workload import ReplayRequest


class Outcome(enum.Enum):
    COMPLETED = "completed"
    REJECTED = "rejected"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """What the client saw of one request."""

    request_id: str
    scheduled_s: float
    sent_s: float
    end_s: float
    outcome: Outcome
    reason: str | None  # None only for COMPLETED
    input_tokens: int
    max_tokens: int
    token_times_s: tuple[float, ...]  # arrival time of every token, in order

    @property
    def output_tokens(self) -> int:
        return len(self.token_times_s)

    @property
    def send_lag_s(self) -> float:
        return self.sent_s - self.scheduled_s


@dataclass(frozen=True, slots=True)
class ReplayRun:
    """All records of one run, in workload order, with cluster counters around it."""

    records: tuple[RequestRecord, ...]
    wall_s: float
    metrics_before: Mapping[str, float] = field(default_factory=dict)
    metrics_after: Mapping[str, float] = field(default_factory=dict)
    metrics_error: str | None = None  # why metrics_after could not be read, if so


def _closing(stream: AsyncIterator[StreamEvent]) -> contextlib.AbstractAsyncContextManager[object]:
    """Close the stream when leaving early, so the client can cancel its call."""
    if hasattr(stream, "aclose"):
        return contextlib.aclosing(stream)  # type: ignore[type-var]
    return contextlib.nullcontext()


async def replay(
    requests: Sequence[ReplayRequest],
    client: ReplayClient,
    *,
    request_timeout_s: float,
    lead_s: float = 0.02,
) -> ReplayRun:
    """Send ``requests`` open-loop and wait for every one to end (bounded by the timeout).

    ``lead_s`` delays time zero a little so the first sends are not already late.
    """
    if request_timeout_s <= 0:
        raise ValueError(f"request_timeout_s must be > 0, got {request_timeout_s}")
    ids = [request.request_id for request in requests]
    if len(set(ids)) != len(ids):
        raise ValueError("request ids in one replay must be unique")
    ordered = sorted(requests, key=lambda request: request.send_offset_s)
    metrics_before = await client.node_metrics()
    origin = time.monotonic() + lead_s

    def now() -> float:
        return time.monotonic() - origin

    async def one(request: ReplayRequest) -> RequestRecord:
        sent = now()
        times: list[float] = []
        outcome, reason = Outcome.COMPLETED, None
        stream = client.generate(
            request.request_id, list(request.prompt_token_ids), request.max_tokens
        )
        try:
            async with asyncio.timeout(request_timeout_s), _closing(stream):
                async for event in stream:
                    arrived = now()
                    times.extend(arrived for _ in event.token_ids)
        except Rejected as exc:
            outcome, reason = Outcome.REJECTED, exc.reason
        except RequestFailed as exc:
            outcome, reason = Outcome.FAILED, exc.reason
        except TimeoutError:
            outcome = Outcome.FAILED
            reason = f"timed out after {request_timeout_s:g}s with {len(times)} token(s)"
        except Exception as exc:  # noqa: BLE001 - a client bug must not lose the request
            outcome, reason = Outcome.FAILED, f"client error {type(exc).__name__}: {exc}"
        else:
            if not times:
                outcome, reason = Outcome.FAILED, "stream ended without tokens"
        return RequestRecord(
            request_id=request.request_id,
            scheduled_s=request.send_offset_s,
            sent_s=sent,
            end_s=now(),
            outcome=outcome,
            reason=reason,
            input_tokens=len(request.prompt_token_ids),
            max_tokens=request.max_tokens,
            token_times_s=tuple(times),
        )

    tasks: list[asyncio.Task[RequestRecord]] = []
    for request in ordered:
        delay = request.send_offset_s - now()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(request), name=f"replay:{request.request_id}"))
    records = await asyncio.gather(*tasks)
    wall_s = max(now(), 0.0)
    metrics_error = None
    try:
        metrics_after = await client.node_metrics()
    except Exception as exc:  # noqa: BLE001 - the records are worth keeping without counters
        metrics_after, metrics_error = {}, f"{type(exc).__name__}: {exc}"
    by_id = {record.request_id: record for record in records}
    return ReplayRun(
        records=tuple(by_id[request.request_id] for request in requests),
        wall_s=wall_s,
        metrics_before=metrics_before,
        metrics_after=metrics_after,
        metrics_error=metrics_error,
    )
