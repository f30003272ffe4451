"""Judging one run against SLOs: per-request metrics, attainment, goodput, hit rate.

A request meets the SLOs when it completed, its TTFT is within the TTFT SLO and its
Mooncake TBT (mean of its longest 10% of gaps) is within the TBT SLO; a one-token answer
has no gaps and passes the TBT SLO. Rejected and failed requests miss every SLO.
Attainment is over *all* requests of the run; goodput is the number of requests meeting
both SLOs divided by the run's arrival window (replay seconds), so at light load goodput
approaches the offered request rate.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bench.replay.client import PREFIX_CACHE_HITS, PREFIX_CACHE_QUERIES
from bench.replay.metrics import Distribution, mooncake_tbt, token_gaps, tpot
from bench.replay.sender import Outcome, ReplayRun, RequestRecord
from bench.replay.workload import Workload


@dataclass(frozen=True, slots=True)
class SLO:
    ttft_s: float
    tbt_s: float

    def __post_init__(self) -> None:
        if self.ttft_s <= 0 or self.tbt_s <= 0:
            raise ValueError(f"SLOs must be > 0 s, got TTFT {self.ttft_s}, TBT {self.tbt_s}")

    def judge(self, completed: bool, ttft_s: float | None, tbt_mooncake_s: float | None) -> tuple[bool, bool]:
        """(meets the TTFT SLO, meets the TBT SLO) for one request. A request that did not
        complete misses the TBT SLO; one with a single token has no gaps and meets it."""
        return (ttft_s is not None and ttft_s <= self.ttft_s,
                completed and (tbt_mooncake_s is None or tbt_mooncake_s <= self.tbt_s))


@dataclass(frozen=True, slots=True)
class RequestMetrics:
    """One request's client-side latencies (seconds; None where undefined)."""

    request_id: str
    outcome: Outcome
    reason: str | None
    input_tokens: int
    output_tokens: int
    send_lag_s: float
    ttft_s: float | None
    e2e_s: float | None
    tpot_s: float | None
    tbt_mooncake_s: float | None
    tbt_gaps_s: tuple[float, ...]
    meets_ttft: bool
    meets_tbt: bool

    @property
    def meets_slo(self) -> bool:
        return self.meets_ttft and self.meets_tbt


def request_metrics(record: RequestRecord, slo: SLO) -> RequestMetrics:
    completed = record.outcome is Outcome.COMPLETED
    ttft_s = e2e_s = tpot_s = tbt_s = None
    gaps: list[float] = []
    if completed:
        ttft_s = record.token_times_s[0] - record.sent_s
        e2e_s = record.token_times_s[-1] - record.sent_s
        tpot_s = tpot(ttft_s, e2e_s, record.output_tokens)
        gaps = token_gaps(record.token_times_s)
        tbt_s = mooncake_tbt(gaps)
    meets_ttft, meets_tbt = slo.judge(completed, ttft_s, tbt_s)
    return RequestMetrics(
        request_id=record.request_id,
        outcome=record.outcome,
        reason=record.reason,
        input_tokens=record.input_tokens,
        output_tokens=record.output_tokens,
        send_lag_s=record.send_lag_s,
        ttft_s=ttft_s,
        e2e_s=e2e_s,
        tpot_s=tpot_s,
        tbt_mooncake_s=tbt_s,
        tbt_gaps_s=tuple(gaps),
        meets_ttft=meets_ttft,
        meets_tbt=meets_tbt,
    )


def prefix_hit_rate(before: Mapping[str, float], after: Mapping[str, float]) -> float | None:
    """Prefix-cache hit rate over a run from cumulative counters; None if not exposed."""
    keys = (PREFIX_CACHE_HITS, PREFIX_CACHE_QUERIES)
    if not all(key in before and key in after for key in keys):
        return None
    queries = after[PREFIX_CACHE_QUERIES] - before[PREFIX_CACHE_QUERIES]
    if queries <= 0:
        return None
    return (after[PREFIX_CACHE_HITS] - before[PREFIX_CACHE_HITS]) / queries


@dataclass(frozen=True, slots=True)
class RunSummary:
    label: str
    speedup: float
    requests: int
    completed: int
    rejected: int
    failed: int
    rejection_reasons: dict[str, int]
    failure_reasons: dict[str, int]
    window_s: float | None
    request_rate: float | None  # offered requests/s
    wall_s: float
    ttft: Distribution | None
    tbt_gaps: Distribution | None  # every gap of every completed request
    tbt_mooncake: Distribution | None  # one value per completed request
    tpot: Distribution | None
    e2e: Distribution | None
    ttft_attainment: float
    tbt_attainment: float
    slo_attainment: float
    goodput: float | None  # requests/s meeting both SLOs
    output_tokens_per_s: float
    max_send_lag_s: float
    prefix_hit_rate: float | None  # measured by the cluster over this run
    ideal_block_hit_rate: float | None  # an unbounded cache over the workload's blocks
    metrics_error: str | None

    @property
    def accounted(self) -> bool:
        return self.completed + self.rejected + self.failed == self.requests


def summarize(
    run: ReplayRun, workload: Workload, slo: SLO, *, label: str, speedup: float
) -> tuple[RunSummary, list[RequestMetrics]]:
    per_request = [request_metrics(record, slo) for record in run.records]
    if len(per_request) != len(workload.requests):
        raise ValueError(
            f"run holds {len(per_request)} records for {len(workload.requests)} requests"
        )
    done = [m for m in per_request if m.outcome is Outcome.COMPLETED]
    count = len(per_request)
    met = sum(m.meets_slo for m in per_request)

    def share(flag: Sequence[bool]) -> float:
        return sum(flag) / count if count else 0.0

    def values(name: str) -> list[float]:
        return [v for m in done if (v := getattr(m, name)) is not None]

    reasons = {
        outcome: dict(Counter(m.reason or "" for m in per_request if m.outcome is outcome))
        for outcome in (Outcome.REJECTED, Outcome.FAILED)
    }
    summary = RunSummary(
        label=label,
        speedup=speedup,
        requests=count,
        completed=len(done),
        rejected=sum(m.outcome is Outcome.REJECTED for m in per_request),
        failed=sum(m.outcome is Outcome.FAILED for m in per_request),
        rejection_reasons=reasons[Outcome.REJECTED],
        failure_reasons=reasons[Outcome.FAILED],
        window_s=workload.window_s,
        request_rate=workload.request_rate,
        wall_s=run.wall_s,
        ttft=Distribution.of(values("ttft_s")),
        tbt_gaps=Distribution.of([gap for m in done for gap in m.tbt_gaps_s]),
        tbt_mooncake=Distribution.of(values("tbt_mooncake_s")),
        tpot=Distribution.of(values("tpot_s")),
        e2e=Distribution.of(values("e2e_s")),
        ttft_attainment=share([m.meets_ttft for m in per_request]),
        tbt_attainment=share([m.meets_tbt for m in per_request]),
        slo_attainment=share([m.meets_slo for m in per_request]),
        goodput=None if workload.window_s is None else met / workload.window_s,
        output_tokens_per_s=sum(m.output_tokens for m in per_request) / run.wall_s
        if run.wall_s > 0
        else 0.0,
        max_send_lag_s=max((m.send_lag_s for m in per_request), default=0.0),
        prefix_hit_rate=prefix_hit_rate(run.metrics_before, run.metrics_after),
        ideal_block_hit_rate=workload.stats.ideal_block_hit_rate,
        metrics_error=run.metrics_error,
    )
    return summary, per_request
