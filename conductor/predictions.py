"""Predictions logged next to what happened, so their error is visible in metrics, and a
calibration learned from them.

The conductor records, per request, what it predicted (queue, prefill, TTFT, TBT) and later
what was measured; `summary()` gives the error per quantity. Bounded (`max_records`) so a
live conductor can keep it forever. `Calibration` keeps a running ratio of measured to
predicted per quantity, which admission multiplies its predictions by before it judges
them: a cluster that runs faster than its cost model says stops being over-rejected.
TTFT is calibrated on requests' measured TTFT; TBT on decode steps (`DecodeSteps`, from
decode nodes' heartbeats) against the cost model's step for the same batch and contexts,
so the factor corrects the model and not the load: a request's measured TBT also holds
every change of its batch after it joined, which the estimate predicts itself.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from enum import StrEnum
from operator import itemgetter

import numpy as np


class Quantity(StrEnum):
    QUEUE = "queue"
    PREFILL = "prefill"
    TTFT = "ttft"
    TBT = "tbt"


@dataclass(frozen=True, slots=True, init=False)
class DecodeSteps:
    """Decode steps a node ran: how many, their seconds, and the batch rows and context
    tokens they ran on, summed. A node reports its totals since it started (heartbeats);
    `since` makes the window between two reports, which the TBT calibration learns from."""

    steps: int
    seconds: float
    rows: int
    tokens: int

    # Written out (the fields, in order): a compiled dataclass's generated __init__ runs
    # interpreted. tests/bench/test_record_inits.py holds it to the fields.
    def __init__(self, steps: int, seconds: float, rows: int, tokens: int) -> None:
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "seconds", seconds)
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "tokens", tokens)

    def since(self, earlier: DecodeSteps | None) -> DecodeSteps | None:
        """The steps between `earlier` and this report; None without an earlier report (the
        first one is only where the window starts), when none ran, or when a counter went
        back (the node restarted: its totals began again)."""
        if earlier is None:
            return None
        steps = self.steps - earlier.steps
        if steps <= 0 or self.seconds < earlier.seconds or self.rows < earlier.rows or self.tokens < earlier.tokens:
            return None
        return DecodeSteps(steps, self.seconds - earlier.seconds, self.rows - earlier.rows, self.tokens - earlier.tokens)


@dataclass(frozen=True, slots=True, init=False)
class PredictionRecord:
    request_id: str
    quantity: Quantity
    predicted_s: float
    actual_s: float

    # Written out (the fields, in order): a compiled dataclass's generated __init__ runs
    # interpreted. tests/bench/test_record_inits.py holds it to the fields.
    def __init__(self, request_id: str, quantity: Quantity, predicted_s: float, actual_s: float) -> None:
        object.__setattr__(self, "request_id", request_id)
        object.__setattr__(self, "quantity", quantity)
        object.__setattr__(self, "predicted_s", predicted_s)
        object.__setattr__(self, "actual_s", actual_s)


@dataclass(frozen=True, slots=True)
class ErrorSummary:
    quantity: Quantity
    count: int
    mean_abs_error_s: float
    bias_s: float  # mean of predicted − actual: > 0 means we over-predict
    p90_abs_error_s: float
    mean_rel_error: float  # mean |predicted − actual| / actual over actual > 0


class PredictionLog:
    def __init__(self, max_records: int | None = 100_000) -> None:
        # (request id, predicted s, actual s) per quantity: plain tuples, since a simulator
        # logs several per request; `records` dresses them up
        self._records: dict[Quantity, deque[tuple[str, float, float]]] = {
            q: deque(maxlen=max_records) for q in Quantity}

    def record(self, request_id: str, quantity: Quantity, predicted_s: float, actual_s: float) -> None:
        self._records[quantity].append((request_id, predicted_s, actual_s))

    def records(self, quantity: Quantity) -> list[PredictionRecord]:
        return [PredictionRecord(rid, quantity, predicted, actual) for rid, predicted, actual in self._records[quantity]]

    def summary(self, quantity: Quantity) -> ErrorSummary:
        rows = self._records[quantity]
        if not rows:
            return ErrorSummary(quantity, 0, 0.0, 0.0, 0.0, 0.0)
        predicted = np.fromiter(map(itemgetter(1), rows), dtype=np.float64, count=len(rows))
        actual = np.fromiter(map(itemgetter(2), rows), dtype=np.float64, count=len(rows))
        err = predicted - actual
        positive = actual > 0
        rel = np.abs(err[positive]) / actual[positive] if positive.any() else np.zeros(1)
        return ErrorSummary(
            quantity=quantity,
            count=len(rows),
            mean_abs_error_s=float(np.abs(err).mean()),
            bias_s=float(err.mean()),
            p90_abs_error_s=float(np.percentile(np.abs(err), 90)),
            mean_rel_error=float(rel.mean()),
        )


class Calibration:
    """Running measured/predicted ratio per quantity (a geometric mean, exponentially
    weighted: each observation weighs `alpha`), applied once `min_samples` were seen and
    kept within [`low`, `high`]. 1.0 before that, and for a quantity never observed."""

    def __init__(self, alpha: float = 0.05, min_samples: int = 20, low: float = 0.5, high: float = 2.0) -> None:
        if not 0.0 < alpha <= 1.0 or min_samples < 1 or not 0.0 < low <= 1.0 <= high:
            raise ValueError("calibration: need 0 < alpha <= 1, min_samples >= 1 and 0 < low <= 1 <= high")
        self.alpha, self.min_samples, self.low, self.high = alpha, min_samples, low, high
        self._log_ratio: dict[Quantity, float] = {}
        self._count: dict[Quantity, int] = {}

    def observe(self, quantity: Quantity, predicted_s: float, actual_s: float) -> None:
        if not (predicted_s > 0.0 and actual_s > 0.0) or not (math.isfinite(predicted_s) and math.isfinite(actual_s)):
            return
        r = math.log(actual_s / predicted_s)
        n = self._count.get(quantity, 0) + 1
        self._count[quantity] = n
        prev = self._log_ratio.get(quantity)
        # the plain mean while there are few samples, then the exponential one
        w = max(self.alpha, 1.0 / n)
        self._log_ratio[quantity] = r if prev is None else prev + w * (r - prev)

    def factor(self, quantity: Quantity) -> float:
        if self._count.get(quantity, 0) < self.min_samples:
            return 1.0
        f = math.exp(self._log_ratio[quantity])
        return self.low if f < self.low else self.high if f > self.high else f

    def samples(self, quantity: Quantity) -> int:
        return self._count.get(quantity, 0)
