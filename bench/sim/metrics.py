"""Turning a finished simulation into the numbers `halfmoon bench sim` reports.

Definitions (DESIGN.md §5): TTFT = arrival -> first token (completed requests); TBT
percentiles pool every gap between consecutive tokens of every completed request; a
request meets the TBT SLO when the mean of its longest 10% of gaps (at least one) is within
it; SLO attainment and goodput count rejected and failed requests as misses; prefix hit
rate = prompt blocks not recomputed (own cache or pulled) / prompt blocks of every request
that ran its prefill.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from bench.sim.cluster import SimRun
from bench.sim.events import Outcome
from conductor.predictions import Quantity

TBT_WORST_FRACTION = 0.1

# The keys every JSON row carries, in this order (issue 6).
ROW_KEYS = (
    "policy", "admission", "requests", "completed", "rejected", "rejected_after_prefill",
    "ttft_mean_s", "ttft_p90_s", "ttft_p99_s", "tbt_p90_s", "tbt_p99_s",
    "slo_attainment", "goodput_rps", "prefix_hit_rate",
)


@dataclass(frozen=True, slots=True)
class SimSummary:
    policy: str
    admission: str
    requests: int
    completed: int
    rejected: int
    rejected_after_prefill: int
    ttft_mean_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    tbt_p90_s: float
    tbt_p99_s: float
    slo_attainment: float
    goodput_rps: float
    prefix_hit_rate: float
    # Context beyond the issue's row: the run's shape and the predictors' error.
    failed: int
    prefill_nodes: int
    decode_nodes: int
    speedup: float
    cache_blocks: int
    ttft_slo_s: float
    tbt_slo_s: float
    ttft_prediction_mae_s: float
    prefill_prediction_mae_s: float
    tbt_prediction_mae_s: float  # predicted step time vs the request's mean token gap
    rejections_by_reason: dict[str, int]
    wall_s: float

    def row(self) -> dict[str, object]:
        data = asdict(self)
        return {**{k: data[k] for k in ROW_KEYS}, **{k: v for k, v in data.items() if k not in ROW_KEYS}}


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if values.size else math.nan


def weighted_percentile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    """`np.percentile(np.repeat(values, weights), q)` (linear interpolation) without
    building the repeated array: `weights` are whole counts."""
    keep = weights > 0
    values, weights = values[keep], weights[keep]
    if not values.size:
        return math.nan
    order = np.argsort(values, kind="stable")
    v, w = values[order], np.cumsum(weights[order])
    pos = q / 100.0 * (w[-1] - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    v_lo = v[np.searchsorted(w, lo, side="right")]
    v_hi = v[np.searchsorted(w, hi, side="right")]
    return float(v_lo + (v_hi - v_lo) * (pos - lo))


def request_tbt(first_gap: float, durations: np.ndarray, join: int, finish: int) -> float:
    """Mean of a request's longest 10% of token gaps (at least one): its first gap (KV landed
    -> end of the step it joined) and the steps after that one until it finished."""
    gaps = durations[join + 1 : finish]
    count = gaps.size + 1
    worst = max(1, math.ceil(TBT_WORST_FRACTION * count - 1e-9))
    if worst == 1:
        top = gaps.max() if gaps.size else first_gap
        return float(top if top > first_gap else first_gap)
    all_gaps = np.append(gaps, first_gap)
    return float(np.partition(all_gaps, count - worst)[count - worst:].mean())


def summarize(run: SimRun, *, speedup: float, wall_s: float) -> SimSummary:
    cfg = run.config
    ttft_slo, tbt_slo = cfg.ttft_slo_s, cfg.tbt_slo_s
    arrays = {id(d): d.step_arrays() for d in run.decode}
    ttfts: list[float] = []
    first_gaps: list[float] = []
    joins_at: dict[int, np.ndarray] = {id(d): np.zeros(arrays[id(d)][0].size, dtype=np.int64) for d in run.decode}
    met = completed = rejected = after_prefill = failed = 0
    hit_blocks = prefilled_blocks = 0
    reasons: dict[str, int] = {}
    for st in run.states:
        if not math.isnan(st.prefill_end_s):
            hit_blocks += st.hit_blocks
            prefilled_blocks += len(st.req.block_hashes)
        if st.outcome is Outcome.REJECTED:
            rejected += 1
            after_prefill += st.rejected_after_prefill
            key = str(st.rejection.reason) if st.rejection else "unknown"
            reasons[key] = reasons.get(key, 0) + 1
            continue
        if st.outcome is not Outcome.COMPLETED:
            failed += 1
            continue
        completed += 1
        ttft = st.first_token_s - st.req.arrival_s
        ttfts.append(ttft)
        tbt = 0.0
        if st.join_step >= 0:
            ends, durations, _ = arrays[id(st.decode)]
            first_gap = float(ends[st.join_step]) - st.first_token_s
            first_gaps.append(first_gap)
            joins_at[id(st.decode)][st.join_step] += 1
            tbt = request_tbt(first_gap, durations, st.join_step, st.finish_step)
        met += ttft <= ttft_slo and tbt <= tbt_slo
    # Every gap of every request, pooled: a step's duration is a gap of each request in its
    # batch except those that joined at it (theirs is their first gap).
    values = [np.asarray(first_gaps, dtype=np.float64)]
    weights = [np.ones(len(first_gaps), dtype=np.int64)]
    for d in run.decode:
        _, durations, batch = arrays[id(d)]
        values.append(durations)
        weights.append(batch - joins_at[id(d)])
    gap_values, gap_weights = np.concatenate(values), np.concatenate(weights)
    ttft_arr = np.asarray(ttfts, dtype=np.float64)
    requests = len(run.states)
    span = run.span_s if run.span_s > 0 else math.nan
    return SimSummary(
        policy=str(cfg.policy),
        admission=str(cfg.admission),
        requests=requests,
        completed=completed,
        rejected=rejected,
        rejected_after_prefill=after_prefill,
        ttft_mean_s=float(ttft_arr.mean()) if ttft_arr.size else math.nan,
        ttft_p90_s=_pct(ttft_arr, 90),
        ttft_p99_s=_pct(ttft_arr, 99),
        tbt_p90_s=weighted_percentile(gap_values, gap_weights, 90),
        tbt_p99_s=weighted_percentile(gap_values, gap_weights, 99),
        slo_attainment=met / requests if requests else math.nan,
        goodput_rps=met / span,
        prefix_hit_rate=hit_blocks / prefilled_blocks if prefilled_blocks else 0.0,
        failed=failed,
        prefill_nodes=cfg.prefill_nodes,
        decode_nodes=cfg.decode_nodes,
        speedup=speedup,
        cache_blocks=cfg.cache_blocks,
        ttft_slo_s=ttft_slo,
        tbt_slo_s=tbt_slo,
        ttft_prediction_mae_s=run.predictions.summary(Quantity.TTFT).mean_abs_error_s,
        prefill_prediction_mae_s=run.predictions.summary(Quantity.PREFILL).mean_abs_error_s,
        tbt_prediction_mae_s=run.predictions.summary(Quantity.TBT).mean_abs_error_s,
        rejections_by_reason=reasons,
        wall_s=wall_s,
    )
