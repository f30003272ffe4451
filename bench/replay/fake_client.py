"""An in-process stand-in for the serving cluster, with simulated latency.

The fake models just enough of a cluster for the replayer's behaviour to show:

- one prefill worker serving prompts first-come first-served, taking
  ``ttft_base_s + ttft_per_token_s * uncached prompt tokens`` each, so TTFT grows with
  queueing under load;
- a prefix cache of whole ``cache_block_tokens`` blocks, keyed by chained hashes and never
  evicted, which shortens prefills and feeds the PREFIX_CACHE_* metrics (in tokens);
- decode at ``tbt_s + tbt_per_running_s * (other running requests)`` per token, one token
  per stream event;
- admission: a prompt over ``max_prompt_tokens``, or a predicted prefill queue wait over
  ``max_queue_s``, is rejected; ``fail_after_tokens`` makes named requests fail after
  that many tokens (0: before the first).

Every call is logged in ``calls`` with its monotonic start time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from bench.replay.client import (
    PREFIX_CACHE_HITS,
    PREFIX_CACHE_QUERIES,
    Rejected,
    RequestFailed,
    StreamEvent,
)


@dataclass(frozen=True, slots=True)
class FakeClientConfig:
    ttft_base_s: float = 0.005
    ttft_per_token_s: float = 0.0001
    tbt_s: float = 0.005
    tbt_per_running_s: float = 0.0
    cache_block_tokens: int = 16
    max_prompt_tokens: int | None = None
    max_queue_s: float | None = None
    fail_after_tokens: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        for name in ("ttft_base_s", "ttft_per_token_s", "tbt_s", "tbt_per_running_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"FakeClientConfig.{name} must be >= 0")
        if self.cache_block_tokens < 1:
            raise ValueError("FakeClientConfig.cache_block_tokens must be >= 1")


@dataclass(frozen=True, slots=True)
class FakeCall:
    request_id: str
    started_at: float  # time.monotonic() when the stream was first polled
    prompt_tokens: int
    max_tokens: int


class _PrefixCache:
    """Chained whole-block keys, as a paged KV cache with prefix hashing would hold them."""

    def __init__(self, block_tokens: int) -> None:
        self.block_tokens = block_tokens
        self._keys: set[int] = set()

    def match_and_insert(self, tokens: Sequence[int]) -> int:
        """Number of leading prompt tokens already cached; caches the prompt's blocks."""
        parent, cached, hit = 0, 0, True
        for end in range(self.block_tokens, len(tokens) + 1, self.block_tokens):
            parent = hash((parent, tuple(tokens[end - self.block_tokens : end])))
            if hit and parent in self._keys:
                cached = end
            else:
                hit = False
                self._keys.add(parent)
        return cached


class FakeClient:
    """A ReplayClient whose latency comes from FakeClientConfig, not from a model."""

    def __init__(self, config: FakeClientConfig | None = None) -> None:
        self.config = config or FakeClientConfig()
        self.calls: list[FakeCall] = []
        self._cache = _PrefixCache(self.config.cache_block_tokens)
        self._prefill_free_at = 0.0
        self._running = 0
        self._hits = 0
        self._queries = 0

    @property
    def running(self) -> int:
        """Requests past prefill whose streams are still open."""
        return self._running

    async def node_metrics(self) -> dict[str, float]:
        return {PREFIX_CACHE_HITS: float(self._hits), PREFIX_CACHE_QUERIES: float(self._queries)}

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], max_tokens: int
    ) -> AsyncIterator[StreamEvent]:
        cfg = self.config
        now = time.monotonic()
        self.calls.append(FakeCall(request_id, now, len(prompt_token_ids), max_tokens))
        if not prompt_token_ids or max_tokens < 1:
            raise RequestFailed(
                f"invalid request: {len(prompt_token_ids)} prompt tokens, max_tokens={max_tokens}"
            )
        if cfg.max_prompt_tokens is not None and len(prompt_token_ids) > cfg.max_prompt_tokens:
            raise Rejected(
                f"prompt of {len(prompt_token_ids)} tokens exceeds {cfg.max_prompt_tokens}"
            )
        start = max(now, self._prefill_free_at)
        if cfg.max_queue_s is not None and start - now > cfg.max_queue_s:
            raise Rejected(
                f"predicted prefill queue wait {start - now:.3f}s exceeds {cfg.max_queue_s}s",
                retry_after_s=start - now,
            )
        cached = self._cache.match_and_insert(prompt_token_ids)
        self._hits += cached
        self._queries += len(prompt_token_ids)
        done = start + cfg.ttft_base_s + cfg.ttft_per_token_s * (len(prompt_token_ids) - cached)
        self._prefill_free_at = done
        fail_after = cfg.fail_after_tokens.get(request_id)
        await asyncio.sleep(done - now)
        self._running += 1
        try:
            for index in range(max_tokens):
                if index == fail_after:
                    raise RequestFailed(f"injected failure after {index} tokens")
                if index:
                    await asyncio.sleep(cfg.tbt_s + cfg.tbt_per_running_s * (self._running - 1))
                yield StreamEvent((100 + index % 1000,))
        finally:
            self._running -= 1
