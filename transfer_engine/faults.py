"""Fault injection for chaos tests: fail or delay a seeded fraction of an engine's batches.

A `FaultPlan` says what fraction of batches to fail, what fraction to delay and by how
long, and the seed of the draws. An engine built with one (the `faults` argument of
`TransferEngine`, or the `HALFMOON_TRANSFER_FAULTS` environment variable when that
argument is not given, which is how node processes started by a launcher get it) draws
one number per submitted batch, in submission order, from `random.Random(seed)`:

- below `fail`: the batch ends FAILED with `InjectedFault` (a `TransferError`) before
  anything is sent;
- below `fail + delay`: the batch is handed to its transport `delay_s` seconds later. Its
  timeout still counts from submission, and a cancel meanwhile ends it at once;
- otherwise it runs untouched.

The same seed and the same sequence of batches give the same faults. The text form is
comma-separated `key=value` pairs::

    HALFMOON_TRANSFER_FAULTS="fail=0.1,delay=0.1:0.2,seed=7"   # 10% failed, 10% delayed 0.2 s

Empty batches (no bytes to move) complete at once and draw nothing.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from enum import Enum
from typing import Callable

from .errors import EngineClosed, TransferError
from .handle import TransferHandle

log = logging.getLogger(__name__)

ENV_VAR = "HALFMOON_TRANSFER_FAULTS"


class InjectedFault(TransferError):
    """A batch failed on purpose, by the engine's fault plan."""


class FaultPlanError(ValueError):
    """A fault plan's text or values are malformed."""


class Fault(Enum):
    NONE = "none"
    FAIL = "fail"
    DELAY = "delay"


@dataclass(frozen=True, slots=True)
class FaultPlan:
    fail: float = 0.0  # fraction of batches failed
    delay: float = 0.0  # fraction of batches delayed
    delay_s: float = 0.0  # by this long
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("fail", "delay"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise FaultPlanError(f"{name}: a fraction of batches must be within [0, 1], got {value}")
        if self.fail + self.delay > 1.0:
            raise FaultPlanError(f"fail + delay must be at most 1, got {self.fail} + {self.delay}")
        if not 0.0 <= self.delay_s <= 3600.0:
            raise FaultPlanError(f"delay: seconds must be within [0, 3600], got {self.delay_s}")
        if self.delay > 0 and self.delay_s == 0:
            raise FaultPlanError("delay: give the delay as FRACTION:SECONDS, e.g. delay=0.1:0.2")

    @property
    def active(self) -> bool:
        return self.fail > 0 or self.delay > 0

    @classmethod
    def parse(cls, text: str) -> FaultPlan:
        """`fail=P,delay=P:SECONDS,seed=N` (every key optional); "" is no faults."""
        values: dict[str, float | int] = {}
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep:
                raise FaultPlanError(f"{item!r}: expected key=value (keys: fail, delay, seed)")
            if key in values:
                raise FaultPlanError(f"{key}: given twice")
            try:
                if key == "fail":
                    values["fail"] = float(value)
                elif key == "delay":
                    fraction, colon, seconds = value.partition(":")
                    if not colon:
                        raise FaultPlanError("delay: give the delay as FRACTION:SECONDS, e.g. delay=0.1:0.2")
                    values["delay"], values["delay_s"] = float(fraction), float(seconds)
                elif key == "seed":
                    values["seed"] = int(value)
                else:
                    raise FaultPlanError(f"{key}: unknown key (keys: fail, delay, seed)")
            except ValueError as e:
                if isinstance(e, FaultPlanError):
                    raise
                raise FaultPlanError(f"{key}: not a number: {value!r}") from None
        return cls(**values)  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> FaultPlan | None:
        """The plan in `HALFMOON_TRANSFER_FAULTS`, or None when it is unset or empty."""
        text = (os.environ if environ is None else environ).get(ENV_VAR, "").strip()
        if not text:
            return None
        try:
            return cls.parse(text)
        except FaultPlanError as e:
            raise FaultPlanError(f"{ENV_VAR}={text!r}: {e}") from None

    def __str__(self) -> str:
        parts = [f"fail={self.fail:g}"] if self.fail else []
        if self.delay:
            parts.append(f"delay={self.delay:g}:{self.delay_s:g}")
        return ",".join(parts + [f"seed={self.seed}"])


@dataclass(frozen=True, slots=True)
class FaultCounts:
    batches: int  # batches that drew a number
    failed: int
    delayed: int


class FaultInjector:
    """One engine's draws and its delayed batches (one thread, started on the first delay)."""

    def __init__(self, plan: FaultPlan, name: str) -> None:
        self.plan = plan
        self.name = name
        self._rng = random.Random(plan.seed)
        self._cond = threading.Condition()
        self._counts = [0, 0, 0]
        self._heap: list[tuple[float, int, TransferHandle, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False
        log.warning("transfer engine %s: fault injection on (%s)", name, plan)

    def draw(self) -> Fault:
        with self._cond:
            u = self._rng.random()
            self._counts[0] += 1
            if u < self.plan.fail:
                self._counts[1] += 1
                return Fault.FAIL
            if u < self.plan.fail + self.plan.delay:
                self._counts[2] += 1
                return Fault.DELAY
            return Fault.NONE

    def counts(self) -> FaultCounts:
        with self._cond:
            return FaultCounts(*self._counts)

    def fail(self, handle: TransferHandle) -> None:
        handle._fail(InjectedFault(
            f"batch #{handle.id} ({handle.op.value}, {handle.nbytes} bytes) to {handle.peer}: "
            f"failed by fault injection ({self.plan})"))

    def later(self, handle: TransferHandle, start: Callable[[], None]) -> None:
        """Call `start()` after the plan's delay, unless the batch has ended by then."""
        with self._cond:
            if self._closed:
                raise EngineClosed(f"engine {self.name!r} is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"{self.name}-faults", daemon=True)
                self._thread.start()
            heapq.heappush(self._heap, (time.monotonic() + self.plan.delay_s, next(self._seq), handle, start))
            self._cond.notify()

    def close(self) -> None:
        """Fail the batches still waiting with EngineClosed and stop the thread."""
        with self._cond:
            self._closed = True
            waiting, self._heap = self._heap, []
            self._cond.notify()
            thread = self._thread
        for _, _, handle, _ in waiting:
            handle._fail(EngineClosed(f"engine {self.name!r} closed while batch #{handle.id} was delayed"))
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._cond.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                if self._closed:
                    return
                _, _, handle, start = heapq.heappop(self._heap)
            if handle.done():  # cancelled or timed out while it waited
                continue
            try:
                start()
            except TransferError as e:
                handle._fail(e)
            except Exception as e:  # a transport bug must not kill the thread or strand the batch
                log.exception("starting delayed batch #%d failed", handle.id)
                handle._fail(TransferError(f"starting delayed batch #{handle.id} failed: {e}"))
