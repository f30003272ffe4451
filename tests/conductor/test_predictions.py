"""Prediction error bookkeeping."""
from __future__ import annotations

import pytest

from conductor.predictions import PredictionLog, Quantity


def test_summary_of_prediction_errors():
    log = PredictionLog()
    for predicted, actual in ((1.0, 2.0), (3.0, 2.0), (2.0, 2.0), (0.5, 0.0)):
        log.record("r", Quantity.TTFT, predicted, actual)
    s = log.summary(Quantity.TTFT)
    assert s.count == 4
    assert s.mean_abs_error_s == pytest.approx((1 + 1 + 0 + 0.5) / 4)
    assert s.bias_s == pytest.approx((-1 + 1 + 0 + 0.5) / 4)
    assert s.mean_rel_error == pytest.approx((0.5 + 0.5 + 0.0) / 3)  # actual 0 left out
    assert log.summary(Quantity.TBT).count == 0


def test_the_log_is_bounded():
    log = PredictionLog(max_records=3)
    for i in range(10):
        log.record(str(i), Quantity.PREFILL, float(i), 0.0)
    assert [r.request_id for r in log.records(Quantity.PREFILL)] == ["7", "8", "9"]
