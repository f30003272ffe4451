"""Predictions logged next to what happened, so their error is visible in metrics.

The conductor records, per request, what it predicted (queue, prefill, TTFT, TBT) and later
what was measured; `summary()` gives the error per quantity. Bounded (`max_records`) so a
live conductor can keep it forever.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import StrEnum

import numpy as np


class Quantity(StrEnum):
    QUEUE = "queue"
    PREFILL = "prefill"
    TTFT = "ttft"
    TBT = "tbt"


@dataclass(frozen=True, slots=True)
class PredictionRecord:
    request_id: str
    quantity: Quantity
    predicted_s: float
    actual_s: float


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
        self._records: dict[Quantity, deque[PredictionRecord]] = {q: deque(maxlen=max_records) for q in Quantity}

    def record(self, request_id: str, quantity: Quantity, predicted_s: float, actual_s: float) -> None:
        self._records[quantity].append(PredictionRecord(request_id, quantity, predicted_s, actual_s))

    def records(self, quantity: Quantity) -> list[PredictionRecord]:
        return list(self._records[quantity])

    def summary(self, quantity: Quantity) -> ErrorSummary:
        rows = self._records[quantity]
        if not rows:
            return ErrorSummary(quantity, 0, 0.0, 0.0, 0.0, 0.0)
        predicted = np.fromiter((r.predicted_s for r in rows), dtype=np.float64, count=len(rows))
        actual = np.fromiter((r.actual_s for r in rows), dtype=np.float64, count=len(rows))
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
