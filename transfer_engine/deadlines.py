"""One thread per engine that fails batches whose timeout has passed."""

from __future__ import annotations

import heapq
import itertools
import math
import threading
import time

from .errors import TransferTimeout
from .handle import TransferHandle


COMPACT_MIN = 64


class DeadlineWatch:
    def __init__(self, name: str) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, TransferHandle, float]] = []
        self._seq = itertools.count()
        self._closed = False
        self._wakes_at = math.inf  # when the thread's current wait ends
        self._compact_at = COMPACT_MIN  # heap size at which ended batches are swept out
        self._thread = threading.Thread(target=self._run, name=f"{name}-deadlines", daemon=True)
        self._thread.start()

    def watch(self, handle: TransferHandle, timeout_s: float) -> None:
        deadline = handle.submitted_at + timeout_s
        with self._cond:
            heap = self._heap
            while heap and heap[0][2].done():  # batches mostly end in order: drop the ended ones
                heapq.heappop(heap)  # so the heap stays the size of what is in flight
            if len(heap) >= self._compact_at:  # an old batch still in flight holds the top
                heap[:] = [entry for entry in heap if not entry[2].done()]
                heapq.heapify(heap)
                self._compact_at = max(COMPACT_MIN, 2 * len(heap))
            heapq.heappush(heap, (deadline, next(self._seq), handle, timeout_s))
            if deadline < self._wakes_at:  # the thread sleeps past this deadline: wake it
                self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._heap.clear()
            self._cond.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._wakes_at = self._heap[0][0] if self._heap else math.inf
                    self._cond.wait(self._wakes_at - time.monotonic() if self._heap else None)
                self._wakes_at = -math.inf  # awake: nobody needs to notify
                if self._closed:
                    return
                _, _, handle, timeout_s = heapq.heappop(self._heap)
            if not handle.done():
                handle._fail(TransferTimeout(
                    f"batch #{handle.id} ({handle.op.value}, {handle.nbytes} bytes, via {handle.transport or 'no transport'}) "
                    f"to {handle.peer} did not complete within its {timeout_s:g}s timeout"
                ))
