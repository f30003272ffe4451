"""Metric math against hand-computed examples."""

import pytest

from bench.replay.client import PREFIX_CACHE_HITS, PREFIX_CACHE_QUERIES
from bench.replay.metrics import Distribution, mooncake_tbt, percentile, token_gaps, tpot
from bench.replay.sender import Outcome, ReplayRun, RequestRecord
from bench.replay.summary import SLO, prefix_hit_rate, request_metrics, summarize
from bench.replay.workload import ReplayRequest, Workload, WorkloadStats


def test_gaps_between_consecutive_tokens():
    assert token_gaps([1.0, 1.5, 1.75, 2.75]) == [0.5, 0.25, 1.0]
    assert token_gaps([1.0]) == []


def test_tokens_in_one_message_have_zero_gaps():
    assert token_gaps([1.0, 1.0, 1.5]) == [0.0, 0.5]


def test_mooncake_tbt_is_the_mean_of_the_longest_tenth():
    # 20 gaps -> the 2 longest (0.9 and 0.7) -> 0.8
    gaps = [0.1] * 18 + [0.7, 0.9]
    assert mooncake_tbt(gaps) == pytest.approx(0.8, abs=1e-12)
    # 11 gaps -> ceil(1.1) = 2 longest: (0.5 + 0.25) / 2
    assert mooncake_tbt([0.5, 0.25] + [0.125] * 9) == 0.375
    # 10 gaps -> exactly 1
    assert mooncake_tbt([0.5] + [0.25] * 9) == 0.5
    # 30 gaps -> the 3 longest
    assert mooncake_tbt([1.0, 1.0, 1.0, 0.5] + [0.0] * 26) == 1.0
    # 3 gaps -> at least one gap
    assert mooncake_tbt([0.5, 0.25, 1.0]) == 1.0
    assert mooncake_tbt([]) is None


def test_tpot_excludes_the_first_token():
    assert tpot(ttft_s=0.5, e2e_s=2.5, output_tokens=5) == 0.5
    assert tpot(ttft_s=0.5, e2e_s=0.5, output_tokens=1) is None


def test_percentile_interpolates_linearly():
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 90) == pytest.approx(3.7)
    assert percentile(values, 100) == 4.0
    assert percentile([7.0], 99) == 7.0


def test_distribution_summary():
    dist = Distribution.of([0.1 * i for i in range(1, 11)])
    assert dist.count == 10
    assert dist.mean == pytest.approx(0.55)
    assert dist.p50 == pytest.approx(0.55)
    assert dist.p90 == pytest.approx(0.91)
    assert dist.p99 == pytest.approx(0.991)
    assert dist.max == pytest.approx(1.0)
    assert Distribution.of([]) is None


def completed(request_id, sent, times):
    return RequestRecord(
        request_id, sent, sent, times[-1], Outcome.COMPLETED, None, 10, len(times), tuple(times)
    )


def ended(request_id, outcome, reason):
    return RequestRecord(request_id, 0.0, 0.0, 0.25, outcome, reason, 10, 4, ())


SLO_1S = SLO(ttft_s=1.0, tbt_s=0.5)


def test_request_metrics_of_a_completed_request():
    m = request_metrics(completed("a", 0.5, [1.0, 1.5, 1.75, 2.75]), SLO_1S)
    assert (m.ttft_s, m.e2e_s, m.tbt_gaps_s, m.tbt_mooncake_s) == (0.5, 2.25, (0.5, 0.25, 1.0), 1.0)
    assert m.tpot_s == pytest.approx(1.75 / 3)
    assert m.meets_ttft and not m.meets_tbt and not m.meets_slo


def test_one_token_answer_has_no_tbt_and_passes_the_tbt_slo():
    m = request_metrics(completed("a", 0.0, [0.75]), SLO_1S)
    assert (m.ttft_s, m.tpot_s, m.tbt_mooncake_s) == (0.75, None, None)
    assert m.meets_slo


def test_rejected_request_misses_every_slo():
    m = request_metrics(ended("r", Outcome.REJECTED, "busy"), SLO_1S)
    assert m.ttft_s is None and not m.meets_ttft and not m.meets_tbt


def test_summary_counts_attainment_and_goodput_with_rejections_as_misses():
    records = [
        completed("ok1", 0.0, [0.5, 0.75, 1.0]),  # ttft .5, tbt .25: meets both
        completed("ok2", 1.0, [1.25, 1.5]),  # ttft .25, tbt .25: meets both
        completed("slow", 2.0, [4.0, 4.25]),  # ttft 2.0: misses TTFT
        completed("jerky", 3.0, [3.5, 4.5]),  # tbt 1.0: misses TBT
        ended("rej", Outcome.REJECTED, "queue full"),
        ended("rej2", Outcome.REJECTED, "queue full"),
        ended("boom", Outcome.FAILED, "node died"),
        ended("late", Outcome.FAILED, "timed out"),
    ]
    requests = tuple(ReplayRequest(r.request_id, 0, 0.0, (1,) * 10, 4, (0,)) for r in records)
    workload = Workload(requests, window_s=4.0, stats=WorkloadStats(80, 32, 0, 8, 7))
    run = ReplayRun(
        tuple(records),
        wall_s=5.0,
        metrics_before={PREFIX_CACHE_HITS: 10, PREFIX_CACHE_QUERIES: 100},
        metrics_after={PREFIX_CACHE_HITS: 40, PREFIX_CACHE_QUERIES: 200},
    )
    summary, per_request = summarize(run, workload, SLO_1S, label="t", speedup=1.0)
    assert (summary.requests, summary.completed, summary.rejected, summary.failed) == (8, 4, 2, 2)
    assert summary.accounted
    assert summary.rejection_reasons == {"queue full": 2}
    assert summary.failure_reasons == {"node died": 1, "timed out": 1}
    assert summary.ttft_attainment == 3 / 8
    assert summary.tbt_attainment == 3 / 8
    assert summary.slo_attainment == 2 / 8
    assert summary.goodput == 2 / 4.0
    assert summary.request_rate == 2.0
    assert summary.ttft.mean == (0.5 + 0.25 + 2.0 + 0.5) / 4
    assert summary.ttft.max == 2.0
    assert summary.tbt_gaps.count == 5  # 2 + 1 + 1 + 1 gaps
    assert summary.tbt_mooncake.max == 1.0
    assert summary.output_tokens_per_s == 9 / 5.0
    assert summary.prefix_hit_rate == 0.3
    assert summary.ideal_block_hit_rate == 7 / 8
    assert [m.meets_slo for m in per_request] == [True, True] + [False] * 6


def test_prefix_hit_rate_needs_both_counters_and_some_queries():
    assert prefix_hit_rate({}, {}) is None
    counters = {PREFIX_CACHE_HITS: 5.0, PREFIX_CACHE_QUERIES: 10.0}
    assert prefix_hit_rate(counters, counters) is None
