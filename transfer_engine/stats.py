"""Thread-safe counters behind `TransferEngine.stats()`."""

from __future__ import annotations

import collections
import dataclasses
import threading

from .errors import TransferTimeout
from .handle import TransferHandle
from .records import EngineStats, TransferOp, TransferState

LATENCY_WINDOW = 4096  # recent batches the latency percentiles are computed over
_COUNTERS = tuple(f.name for f in dataclasses.fields(EngineStats)
                  if f.type in ("int", int))


class Counters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._by_transport: dict[str, int] = {}
        self._latency_sum = 0.0
        self._latency_count = 0
        self._latency_max = 0.0
        self._recent: collections.deque[float] = collections.deque(maxlen=LATENCY_WINDOW)

    def add(self, name: str, delta: int = 1) -> None:
        with self._lock:
            self._counts[name] += delta

    def batch_submitted(self) -> None:
        self.add("batches_submitted")

    def batch_ended(self, handle: TransferHandle) -> None:
        """Done-callback of every batch: counts it once, by how it ended."""
        state = handle.poll()
        latency = handle.latency_s or 0.0
        with self._lock:
            counts = self._counts
            if state is TransferState.DONE:
                counts["batches_done"] += 1
                counts["bytes_written" if handle.op is TransferOp.WRITE else "bytes_read"] += handle.nbytes
                self._by_transport[handle.transport] = self._by_transport.get(handle.transport, 0) + 1
            elif state is TransferState.CANCELLED:
                counts["batches_cancelled"] += 1
            else:
                counts["batches_failed"] += 1
                counts["batches_timed_out"] += isinstance(handle.error, TransferTimeout)
            self._latency_sum += latency
            self._latency_count += 1
            self._latency_max = max(self._latency_max, latency)
            self._recent.append(latency)

    def snapshot(self) -> EngineStats:
        with self._lock:
            recent = sorted(self._recent)
            return EngineStats(
                **self._counts,
                latency_mean_s=self._latency_sum / self._latency_count if self._latency_count else 0.0,
                latency_p50_s=_quantile(recent, 0.50),
                latency_p99_s=_quantile(recent, 0.99),
                latency_max_s=self._latency_max,
                done_by_transport=dict(self._by_transport),
            )


def _quantile(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
