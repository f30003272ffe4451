"""Thread-safe counters behind `TransferEngine.stats()`."""

from __future__ import annotations

import collections
import threading
from dataclasses import replace

from .errors import TransferTimeout
from .handle import TransferHandle
from .records import EngineStats, TransferOp, TransferState

LATENCY_WINDOW = 4096  # recent batches the latency percentiles are computed over


class Counters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats = EngineStats(done_by_transport={})
        self._latency_sum = 0.0
        self._latency_count = 0
        self._latency_max = 0.0
        self._recent: collections.deque[float] = collections.deque(maxlen=LATENCY_WINDOW)

    def add(self, **deltas: int) -> None:
        with self._lock:
            self._stats = replace(self._stats, **{k: getattr(self._stats, k) + v for k, v in deltas.items()})

    def batch_submitted(self) -> None:
        self.add(batches_submitted=1)

    def batch_ended(self, handle: TransferHandle) -> None:
        """Done-callback of every batch: counts it once, by how it ended."""
        state = handle.poll()
        if state is TransferState.DONE:
            moved = {"bytes_written" if handle.op is TransferOp.WRITE else "bytes_read": handle.nbytes}
            self.add(batches_done=1, **moved)
            with self._lock:
                by = self._stats.done_by_transport
                by[handle.transport] = by.get(handle.transport, 0) + 1
        elif state is TransferState.CANCELLED:
            self.add(batches_cancelled=1)
        else:
            self.add(batches_failed=1, batches_timed_out=int(isinstance(handle.error, TransferTimeout)))
        latency = handle.latency_s or 0.0
        with self._lock:
            self._latency_sum += latency
            self._latency_count += 1
            self._latency_max = max(self._latency_max, latency)
            self._recent.append(latency)

    def snapshot(self) -> EngineStats:
        with self._lock:
            recent = sorted(self._recent)
            mean = self._latency_sum / self._latency_count if self._latency_count else 0.0
            return replace(
                self._stats,
                latency_mean_s=mean,
                latency_p50_s=_quantile(recent, 0.50),
                latency_p99_s=_quantile(recent, 0.99),
                latency_max_s=self._latency_max,
                done_by_transport=dict(self._stats.done_by_transport),
            )


def _quantile(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
