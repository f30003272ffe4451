"""The interface the replayer drives: one streaming call per request, plus node metrics.

A client implementation (the in-process ``FakeClient`` now; gRPC and HTTP clients of
the conductor's API later) writes ``generate`` as an async generator::

    async def generate(self, request_id, prompt_token_ids, max_tokens):
        ...                      # send the request
        yield StreamEvent((tok,))  # once per streamed message, as it arrives

The replayer takes each event's arrival time itself, so clients carry no clocks. The
cluster decodes greedily and ignores EOS, so ``max_tokens`` is the answer's length.

A stream ends normally when the answer is complete. It ends abnormally by raising
``Rejected`` (the conductor refused the request before doing work: gRPC
``RESOURCE_EXHAUSTED`` / HTTP 429) or ``RequestFailed`` (anything else that stopped the
request, with the reason the server gave). The replayer closes the stream (``aclose``)
when it gives up on a request, so a client should cancel the call in a ``finally``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

# Keys of node_metrics(): cumulative counters summed over the cluster's nodes. They are
# the Prometheus names of conductor/metrics.py's catalog (counted in prompt tokens), so a
# client can pass scraped samples through. The replayer reports the prefix-cache hit
# rate over a run as delta(hits) / delta(queries).
PREFIX_CACHE_HITS = "halfmoon:prefix_cache_hits_total"
PREFIX_CACHE_QUERIES = "halfmoon:prefix_cache_queries_total"


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One streamed message carrying one or more newly generated token ids."""

    token_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.token_ids:
            raise ValueError("a StreamEvent carries at least one token id")


class ClientError(Exception):
    """A request did not complete; ``reason`` says why, in the server's words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Rejected(ClientError):
    """Admission control refused the request before any work was spent on it."""

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


class RequestFailed(ClientError):
    """The request was admitted (or the call was attempted) but did not complete."""


@runtime_checkable
class ReplayClient(Protocol):
    """What the replayer needs from a serving cluster."""

    def generate(
        self, request_id: str, prompt_token_ids: list[int], max_tokens: int
    ) -> AsyncIterator[StreamEvent]:
        """Stream the answer to one prompt; raise Rejected / RequestFailed to end early."""
        ...

    async def node_metrics(self) -> dict[str, float]:
        """Cumulative cluster counters, e.g. PREFIX_CACHE_HITS; {} if none are exposed."""
        ...
