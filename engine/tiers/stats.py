"""What the tiers count: hits by tier, bytes moved between tiers, load latency by tier,
store put failures, occupancy. Counters are updated from the engine thread and the tier I/O
threads under one lock, so a snapshot adds up exactly."""
from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

TIERS = ("device", "host", "disk", "cluster")
LOAD_TIERS = ("host", "disk", "cluster")  # where a block is loaded from (into the device or host)
# upper bounds (seconds) of the load-latency histogram buckets; +Inf is implicit
LATENCY_BUCKETS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


@dataclass(frozen=True, slots=True)
class Histogram:
    buckets: tuple[float, ...]
    counts: tuple[int, ...]  # per bucket, not cumulative; the last is above every bound
    total: float
    count: int


@dataclass(frozen=True, slots=True)
class TierUse:
    capacity_blocks: int
    used_blocks: int
    high_water_blocks: int


@dataclass(frozen=True, slots=True)
class TierStats:
    """A snapshot of one node's tiers."""

    hit_tokens: dict[str, int]  # tier -> prompt tokens served from it at admission
    bytes_moved: dict[str, int]  # "src->dst" -> bytes
    load_latency: dict[str, Histogram]  # tier -> seconds per load (one block from disk, one batch otherwise)
    use: dict[str, TierUse]  # host / disk
    events: dict[str, int] = field(default_factory=dict)  # put_failures, put_dropped, corrupt_blocks, ...
    store_state: str = "off"  # off | connecting | up | down (the cluster tier)
    store_reason: str = ""  # why it is not up


class Recorder:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.hits: Counter[str] = Counter()
        self.moved: Counter[str] = Counter()
        self.events: Counter[str] = Counter()
        self._lat: dict[str, list] = {t: [[0] * (len(LATENCY_BUCKETS) + 1), 0.0, 0] for t in LOAD_TIERS}
        self.on_latency: Callable[[str, float], None] | None = None  # e.g. a Prometheus histogram's observe

    def hit(self, tier: str, tokens: int) -> None:
        if tokens:
            with self._lock:
                self.hits[tier] += tokens

    def move(self, src: str, dst: str, nbytes: int) -> None:
        with self._lock:
            self.moved[f"{src}->{dst}"] += nbytes

    def count(self, event: str, n: int = 1) -> None:
        with self._lock:
            self.events[event] += n

    def latency(self, tier: str, seconds: float) -> None:
        i = next((i for i, b in enumerate(LATENCY_BUCKETS) if seconds <= b), len(LATENCY_BUCKETS))
        with self._lock:
            h = self._lat[tier]
            h[0][i] += 1
            h[1] += seconds
            h[2] += 1
        if self.on_latency is not None:
            self.on_latency(tier, seconds)

    def snapshot(self, use: dict[str, TierUse], store_state: str, store_reason: str) -> TierStats:
        with self._lock:
            return TierStats({t: self.hits[t] for t in TIERS}, dict(self.moved),
                             {t: Histogram(LATENCY_BUCKETS, tuple(h[0]), h[1], h[2]) for t, h in self._lat.items()},
                             use, dict(self.events), store_state, store_reason)
