"""Runs an `LLMEngine` on its own thread so a server's event loop never waits on a forward pass.

Everything that touches the engine runs on that thread: `call(fn)` queues `fn(engine)`
between steps and returns a future; step outputs go to per-request sinks; `on_step` hooks
run after every step (a prefill node ships finished KV blocks from one). A step that raises
ends the requests it touched at once: each one's sink gets a finished output whose `error`
says why (`_fail_step`), and the engine carries on with the next request.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable, TypeVar

from engine.engine import LLMEngine, RequestOutput
from engine.request import FinishReason

log = logging.getLogger(__name__)
T = TypeVar("T")
Sink = Callable[[RequestOutput], None]
StepHook = Callable[[LLMEngine, list[RequestOutput]], None]


class StepFailed(Exception):
    """A request was ended by a failed engine step (the text of `RequestOutput.error`)."""


class EngineWorker:
    def __init__(self, engine: LLMEngine, name: str = "engine") -> None:
        self.engine = engine
        self._cmds: queue.SimpleQueue[tuple[Callable[[LLMEngine], object], Future]] = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
        self._hooks: list[StepHook] = []
        self._stop = threading.Event()
        self.step_started_at = 0.0  # monotonic time the current/last step began
        self.steps = 0
        self.step_failures = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[LLMEngine], T]) -> "Future[T]":
        fut: Future = Future()
        self._cmds.put((fn, fut))
        return fut

    async def run(self, fn: Callable[[LLMEngine], T],
                  undo: Callable[[LLMEngine, T], object] | None = None) -> T:
        """`call(fn)` awaited from an event loop. If the awaiting task is cancelled before
        `fn` started, `fn` never runs; if it already ran (or is running), `undo(engine,
        result)` runs right after it on the engine thread, so nothing it took leaks."""
        import asyncio

        fut = self.call(fn)
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            if undo is not None:
                def follow_up(eng: LLMEngine) -> None:  # queued after fn: fn has finished by now
                    if fut.done() and not fut.cancelled() and fut.exception() is None:
                        undo(eng, fut.result())
                self.call(follow_up)
            raise

    def set_sink(self, request_id: str, sink: Sink | None) -> None:
        """Route `request_id`'s outputs to `sink` (called on the engine thread); None removes it."""
        if sink is None:
            self._sinks.pop(request_id, None)
        else:
            self._sinks[request_id] = sink

    def add_hook(self, hook: StepHook) -> None:
        self._hooks.append(hook)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._cmds.put((lambda e: None, Future()))
        self._thread.join(timeout)

    def _run_commands(self, block: bool) -> None:
        try:
            fn, fut = self._cmds.get(timeout=0.5) if block else self._cmds.get_nowait()
        except queue.Empty:
            return
        while True:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(self.engine))
                except BaseException as e:  # handed to the caller through the future
                    fut.set_exception(e)
            try:
                fn, fut = self._cmds.get_nowait()
            except queue.Empty:
                return

    def _fail_step(self, error: Exception) -> None:
        """A step raised: end every request it may have touched, at once, with the error.

        The running requests (each holds blocks the failed step may have half written) are
        aborted, which frees their blocks, and each one's sink gets a finished output carrying
        `error`. Waiting requests hold no blocks and were not in the step: they stay queued,
        unless nothing was running, in which case admitting them is what failed and they
        end too, so a failure that repeats cannot spin the loop."""
        reason = f"engine step failed: {type(error).__name__}: {error}"
        sched = self.engine.scheduler
        victims = list(sched.running) or list(sched.waiting)
        log.error("%s; ending %d request(s): %s", reason, len(victims), ", ".join(r.request_id for r in victims),
                  exc_info=error)
        self.step_failures += 1
        for req in victims:
            self.engine.abort(req.request_id)
            sink = self._sinks.pop(req.request_id, None)
            if sink is not None:
                sink(RequestOutput(req.request_id, (), "", True, FinishReason.ABORT, len(req.prompt_token_ids),
                                   req.num_cached_tokens, len(req.output_token_ids), error=reason))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._run_commands(block=not self.engine.has_unfinished())
            if self._stop.is_set() or not self.engine.has_unfinished():
                continue
            self.step_started_at = time.monotonic()
            try:
                outputs = self.engine.step()
            except Exception as e:
                self._fail_step(e)
                continue
            self.steps += 1
            for out in outputs:
                sink = self._sinks.get(out.request_id)
                if sink is not None:
                    sink(out)
                    if out.finished:
                        self._sinks.pop(out.request_id, None)
            for hook in self._hooks:
                try:
                    hook(self.engine, outputs)
                except Exception:
                    log.exception("step hook failed")
