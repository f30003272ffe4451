"""Turning trace records into the requests one replay run sends.

Three scalings make a production trace fit a CPU cluster:

- **length**: a trace block (512 tokens) becomes ``block_tokens`` tokens, so a prompt of
  ``L`` trace tokens becomes ``ceil(L * block_tokens / 512)`` tokens (every hash id keeps
  at least one token); ``output_scale`` and ``max_output_tokens`` shrink answers, and
  ``max_input_tokens`` cuts over-long prompts (a cut prompt is still a prefix of the
  original, so prefix sharing survives);
- **window**: ``TraceWindow`` keeps the requests arriving in
  ``[start_s, start_s + duration_s)`` trace seconds, at most ``max_requests`` of them;
- **time**: ``speedup`` divides every inter-arrival time, so wall time is about
  ``window / speedup`` and the offered request rate is multiplied by ``speedup``.

Arrivals: the conversation trace rounds timestamps to 3 s, so ~10 requests share each
timestamp. Replayed as recorded they arrive together at any speed-up, and a burst of ten
prompts queues on one prefill node however light the average load. ``spread_ms`` spreads
the ``n`` requests sharing a timestamp evenly over that many trace milliseconds after it
(the ``k``-th at ``k * spread_ms / n``, in trace order), which is what the rounding hid.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from bench.replay.tokens import TokenMapper
from bench.replay.trace import TraceRecord


class WorkloadError(ValueError):
    """The scaling or window settings cannot produce a workload from this trace."""


@dataclass(frozen=True, slots=True)
class TraceWindow:
    """Which slice of the trace to replay, in trace seconds."""

    start_s: float = 0.0
    duration_s: float | None = None
    max_requests: int | None = None

    def __post_init__(self) -> None:
        if self.start_s < 0:
            raise WorkloadError(f"window start must be >= 0 s, got {self.start_s}")
        if self.duration_s is not None and self.duration_s <= 0:
            raise WorkloadError(f"window duration must be > 0 s, got {self.duration_s}")
        if self.max_requests is not None and self.max_requests < 1:
            raise WorkloadError(f"max_requests must be >= 1, got {self.max_requests}")


@dataclass(frozen=True, slots=True)
class WindowSelection:
    """The records inside a window and the window's length in trace seconds.

    ``length_s`` runs from the window start to the duration's end, or, when
    ``max_requests`` or the trace's end stops earlier, to the next later arrival that
    was left out (or to the last kept arrival at the end of the trace). It is None when
    that length would be zero, i.e. every kept request arrives at the window start.
    """

    records: tuple[TraceRecord, ...]
    start_s: float
    length_s: float | None

    def request_rate(self, speedup: float) -> float | None:
        """Offered requests per second once time is sped up by ``speedup``."""
        if self.length_s is None:
            return None
        return len(self.records) * speedup / self.length_s


def select_window(records: Sequence[TraceRecord], window: TraceWindow) -> WindowSelection:
    """Pick the records a window keeps (``records`` sorted by timestamp)."""
    start_ms = window.start_s * 1000.0
    end_ms = math.inf if window.duration_s is None else start_ms + window.duration_s * 1000.0
    in_time = [r for r in records if start_ms <= r.timestamp_ms < end_ms]
    kept = in_time if window.max_requests is None else in_time[: window.max_requests]
    if not kept:
        raise WorkloadError(
            f"no trace requests arrive in the window starting at {window.start_s} s"
            + ("" if window.duration_s is None else f" lasting {window.duration_s} s")
        )
    last_ms = kept[-1].timestamp_ms
    later_dropped = [r.timestamp_ms for r in in_time[len(kept) :] if r.timestamp_ms > last_ms]
    end: float
    if later_dropped:
        end = later_dropped[0]
    elif window.duration_s is not None and len(kept) == len(in_time):
        end = end_ms
    else:
        after_window = [r.timestamp_ms for r in records if r.timestamp_ms >= end_ms]
        end = min(after_window[0], end_ms) if after_window else last_ms
    length_s = (end - start_ms) / 1000.0
    return WindowSelection(tuple(kept), window.start_s, length_s if length_s > 0 else None)


@dataclass(frozen=True, slots=True)
class ScaleConfig:
    """How trace lengths and time map onto the replay."""

    block_tokens: int = 16
    trace_block_tokens: int = 512
    output_scale: float = 1.0
    max_output_tokens: int | None = None
    max_input_tokens: int | None = None
    speedup: float = 1.0
    spread_ms: float = 0.0  # spread requests sharing a timestamp over this many trace ms

    def __post_init__(self) -> None:
        if self.spread_ms < 0:
            raise WorkloadError(f"spread_ms must be >= 0, got {self.spread_ms}")
        if self.block_tokens < 1 or self.trace_block_tokens < 1:
            raise WorkloadError("block sizes must be >= 1 token")
        if self.output_scale <= 0:
            raise WorkloadError(f"output_scale must be > 0, got {self.output_scale}")
        if self.max_output_tokens is not None and self.max_output_tokens < 1:
            raise WorkloadError(f"max_output_tokens must be >= 1, got {self.max_output_tokens}")
        if self.max_input_tokens is not None and self.max_input_tokens < 1:
            raise WorkloadError(f"max_input_tokens must be >= 1, got {self.max_input_tokens}")
        if self.speedup <= 0:
            raise WorkloadError(f"speedup must be > 0, got {self.speedup}")

    def input_tokens(self, record: TraceRecord) -> int:
        """Scaled prompt length, before any ``max_input_tokens`` cut."""
        scaled = math.ceil(record.input_length * self.block_tokens / self.trace_block_tokens)
        blocks = len(record.hash_ids)
        if not (blocks - 1) * self.block_tokens < scaled <= blocks * self.block_tokens:
            raise WorkloadError(
                f"trace line {record.line}: input_length {record.input_length} does not fit "
                f"{blocks} hash id(s) of {self.trace_block_tokens} tokens; is "
                f"--trace-block-tokens right?"
            )
        return scaled

    def output_tokens(self, record: TraceRecord) -> int:
        """Scaled answer length: rounded half up, at least 1, at most the cap."""
        scaled = max(1, math.floor(record.output_length * self.output_scale + 0.5))
        if self.max_output_tokens is not None:
            scaled = min(scaled, self.max_output_tokens)
        return scaled

    def send_offset_s(self, record: TraceRecord, window_start_s: float, rank: int = 0, ties: int = 1) -> float:
        """When to send `record`, the `rank`-th of `ties` records sharing its timestamp."""
        spread_s = self.spread_ms / 1000.0 * rank / ties
        return (record.timestamp_s + spread_s - window_start_s) / self.speedup


@dataclass(frozen=True, slots=True)
class ReplayRequest:
    """One request as the sender issues it."""

    request_id: str
    trace_line: int
    send_offset_s: float  # from the start of the run
    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    hash_ids: tuple[int, ...]  # the trace blocks the prompt covers (after any cut)


@dataclass(frozen=True, slots=True)
class WorkloadStats:
    """Facts about a workload that do not depend on the serving cluster."""

    prompt_tokens: int
    output_tokens: int
    truncated_prompts: int
    blocks: int
    repeated_blocks: int  # blocks whose hash id appeared earlier in the window

    @property
    def ideal_block_hit_rate(self) -> float | None:
        """Hit rate of an unbounded prefix cache over whole trace blocks."""
        return self.repeated_blocks / self.blocks if self.blocks else None


@dataclass(frozen=True, slots=True)
class Workload:
    requests: tuple[ReplayRequest, ...]
    window_s: float | None  # replay seconds the arrivals span (see WindowSelection)
    stats: WorkloadStats

    @property
    def request_rate(self) -> float | None:
        if self.window_s is None:
            return None
        return len(self.requests) / self.window_s


def build_workload(
    selection: WindowSelection, scale: ScaleConfig, mapper: TokenMapper, id_prefix: str = "r"
) -> Workload:
    """Scale every selected record into a ReplayRequest, in arrival order."""
    if mapper.block_tokens != scale.block_tokens:
        raise WorkloadError(
            f"token mapper makes {mapper.block_tokens}-token blocks but the scale asks "
            f"for {scale.block_tokens}"
        )
    requests: list[ReplayRequest] = []
    seen: set[int] = set()
    blocks = repeated = truncated = prompt_total = output_total = 0
    ties = Counter(r.timestamp_ms for r in selection.records)
    ranks: Counter[int] = Counter()
    for record in selection.records:
        rank = ranks[record.timestamp_ms]
        ranks[record.timestamp_ms] += 1
        length = scale.input_tokens(record)
        hash_ids = record.hash_ids
        if scale.max_input_tokens is not None and length > scale.max_input_tokens:
            length = scale.max_input_tokens
            hash_ids = hash_ids[: math.ceil(length / scale.block_tokens)]
            truncated += 1
        max_tokens = scale.output_tokens(record)
        requests.append(
            ReplayRequest(
                request_id=f"{id_prefix}-{record.line}",
                trace_line=record.line,
                send_offset_s=scale.send_offset_s(record, selection.start_s, rank, ties[record.timestamp_ms]),
                prompt_token_ids=tuple(mapper.prompt(hash_ids, length)),
                max_tokens=max_tokens,
                hash_ids=hash_ids,
            )
        )
        for hash_id in hash_ids:
            repeated += hash_id in seen
            seen.add(hash_id)
        blocks += len(hash_ids)
        prompt_total += length
        output_total += max_tokens
    window_s = None if selection.length_s is None else selection.length_s / scale.speedup
    stats = WorkloadStats(prompt_total, output_total, truncated, blocks, repeated)
    return Workload(tuple(requests), window_s, stats)
