"""A batch's handle: its state, how to wait for it (blocking or `await`), how to cancel it.

The first terminal state a batch reaches is final: a batch reported DONE is never
reported FAILED afterwards, and the other way round."""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from typing import Callable, Generator

from .errors import TransferCancelled, TransferError, WaitTimeout
from .records import TransferOp, TransferState

log = logging.getLogger(__name__)

_ids = itertools.count(1)


class TransferHandle:
    """Tracks one submitted batch; thread-safe."""

    def __init__(self, op: TransferOp, peer: str, nbytes: int, entries: int) -> None:
        self.id = next(_ids)
        self.op = op
        self.peer = peer
        self.nbytes = nbytes
        self.entries = entries
        self.transport = ""  # set when the batch is routed
        self.submitted_at = time.monotonic()
        self.finished_at: float | None = None
        self._lock = threading.Lock()
        self._event: threading.Event | None = None  # made by the first waiter (Events are not free)
        self._state = TransferState.PENDING
        self._error: TransferError | None = None
        self._parts = 1
        self._parts_done = 0
        self._callbacks: list[Callable[[TransferHandle], None]] = []

    def __repr__(self) -> str:
        return f"<TransferHandle #{self.id} {self.op.value} {self.nbytes}B to {self.peer} {self._state.name}>"

    # --- public ---

    def poll(self) -> TransferState:
        return self._state

    @property
    def state(self) -> TransferState:
        return self._state

    def done(self) -> bool:
        return self._state.terminal

    @property
    def error(self) -> TransferError | None:
        return self._error

    @property
    def latency_s(self) -> float | None:
        return None if self.finished_at is None else self.finished_at - self.submitted_at

    def wait(self, timeout: float | None = None) -> None:
        """Block until the batch ends; return if DONE, raise its error otherwise.

        Raises WaitTimeout (and leaves the batch running) if `timeout` passes first."""
        with self._lock:
            if not self._state.terminal and self._event is None:
                self._event = threading.Event()
            event = None if self._state.terminal else self._event
        if event is not None and not event.wait(timeout):
            raise WaitTimeout(f"batch #{self.id} to {self.peer} still {self._state.name} after waiting {timeout}s")
        self._raise_if_failed()

    def cancel(self) -> bool:
        """Stop the batch. True if this call cancelled it, False if it had already ended.

        Bytes already sent may have landed; the batch's destination range is undefined."""
        return self._finish(TransferState.CANCELLED, TransferCancelled(f"batch #{self.id} to {self.peer} was cancelled"))

    def add_done_callback(self, fn: Callable[[TransferHandle], None]) -> None:
        """Call fn(handle) once the batch ends (at once if it already has), from the
        thread that ended it."""
        with self._lock:
            if not self._state.terminal:
                self._callbacks.append(fn)
                return
        self._run_callback(fn)

    def __await__(self) -> Generator[object, None, None]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def settle(_: TransferHandle) -> None:
            try:
                loop.call_soon_threadsafe(_settle_future, future)
            except RuntimeError:
                log.debug("batch #%d ended after its event loop closed", self.id)

        self.add_done_callback(settle)
        try:
            yield from future.__await__()
        except asyncio.CancelledError:
            self.cancel()
            raise
        self._raise_if_failed()

    # --- for transports ---

    def _set_parts(self, parts: int) -> None:
        """The batch is DONE once `parts` parts have completed."""
        with self._lock:
            self._parts = parts

    def _start(self) -> bool:
        """Mark RUNNING; False if the batch already ended (skip the work)."""
        with self._lock:
            if self._state.terminal:
                return False
            self._state = TransferState.RUNNING
            return True

    def _part_done(self) -> None:
        with self._lock:
            self._parts_done += 1
            complete = self._parts_done >= self._parts
        if complete:
            self._finish(TransferState.DONE, None)

    def _fail(self, error: TransferError) -> bool:
        return self._finish(TransferState.FAILED, error)

    def _finish(self, state: TransferState, error: TransferError | None) -> bool:
        with self._lock:
            if self._state.terminal:
                return False
            self._state = state
            self._error = error
            self.finished_at = time.monotonic()
            callbacks, self._callbacks = self._callbacks, []
            event = self._event
        if event is not None:
            event.set()
        for fn in callbacks:
            self._run_callback(fn)
        return True

    def _run_callback(self, fn: Callable[[TransferHandle], None]) -> None:
        try:
            fn(self)
        except Exception:
            log.exception("done-callback of batch #%d raised", self.id)

    def _raise_if_failed(self) -> None:
        if self._state is not TransferState.DONE:
            raise self._error if self._error is not None else TransferError(f"batch #{self.id} ended {self._state.name}")


def _settle_future(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def completed_handle(op: TransferOp, peer: str) -> TransferHandle:
    """A handle for an empty batch: DONE at once."""
    handle = TransferHandle(op, peer, 0, 0)
    handle._finish(TransferState.DONE, None)
    return handle
