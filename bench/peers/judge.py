"""One SLO rule for every system, re-judging saved requests, the JSON rows and capacity.

**SLO rule** (per workload, the same for every system): each system's unloaded latencies
are measured first (single requests of the workload's median shape, one at a time); the
TTFT SLO is ``ttft_x`` (5) times the *slowest* system's unloaded median TTFT and the TBT
SLO is ``tbt_x`` (3) times the slowest system's unloaded median Mooncake TBT (the mean of
a request's longest 10% of token gaps). Taking the slowest system's values means every
system meets the SLOs when idle, so effective capacity measures how much load each takes
before it misses, not which one is faster when idle. Since the systems run in turn, the
sweeps are judged after all of them ran (``rejudge``), from per-request data.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from bench.replay.metrics import Distribution
from bench.replay.runner import RunResult
from bench.replay.summary import SLO, RequestMetrics
from bench.replay.sweep import CAPACITY_THRESHOLD, Capacity, SweepPoint, effective_capacity


@dataclass(frozen=True, slots=True)
class Unloaded:
    ttft_s: float  # median over single requests
    tbt_s: float  # median Mooncake TBT


def slo_rule(unloaded: Sequence[Unloaded], ttft_x: float = 5.0, tbt_x: float = 3.0) -> SLO:
    if not unloaded:
        raise ValueError("the SLO rule needs at least one system's unloaded latencies")
    return SLO(ttft_x * max(u.ttft_s for u in unloaded), tbt_x * max(u.tbt_s for u in unloaded))


def rejudge(requests: Sequence[RequestMetrics], slo: SLO) -> list[RequestMetrics]:
    out = []
    for m in requests:
        ttft, tbt = slo.judge(m.outcome.value == "completed", m.ttft_s, m.tbt_mooncake_s)
        out.append(dataclasses.replace(m, meets_ttft=ttft, meets_tbt=tbt))
    return out


@dataclass(frozen=True, slots=True)
class Row:
    """One system at one load of one workload (the issue's JSON row)."""

    system: str
    workload: str
    rate_rps: float
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    tbt_p99_s: float | None  # p99 over every token gap of the completed requests
    output_tok_s: float
    goodput_rps: float
    slo_attainment: float
    requests: int
    completed: int


def row(system: str, workload: str, run: RunResult, slo: SLO) -> Row:
    """Judge one saved run under ``slo``."""
    reqs = rejudge(run.requests, slo)
    s = run.summary
    ttft = Distribution.of([m.ttft_s for m in reqs if m.ttft_s is not None])
    gaps = Distribution.of([g for m in reqs for g in m.tbt_gaps_s])
    met = sum(m.meets_slo for m in reqs)
    window = s.window_s or 0.0
    return Row(system=system, workload=workload, rate_rps=s.request_rate or 0.0,
               ttft_p50_s=ttft.p50 if ttft else None, ttft_p99_s=ttft.p99 if ttft else None,
               tbt_p99_s=gaps.p99 if gaps else None, output_tok_s=s.output_tokens_per_s,
               goodput_rps=met / window if window > 0 else 0.0,
               slo_attainment=met / len(reqs) if reqs else 0.0, requests=len(reqs), completed=s.completed)


def capacity(rows: Sequence[Row], threshold: float = CAPACITY_THRESHOLD) -> Capacity:
    """The highest offered rate at which >= ``threshold`` of the requests met both SLOs."""
    return effective_capacity([SweepPoint(r.rate_rps, r.rate_rps, r.slo_attainment) for r in rows], threshold)
