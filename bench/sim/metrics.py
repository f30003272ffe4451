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
from operator import attrgetter

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


def pooled_gap_percentiles(run: SimRun, on_node: dict[int, list], first_gaps: np.ndarray,
                           qs: tuple[float, ...]) -> tuple[float, ...]:
    """Percentiles (np.percentile's linear interpolation) of every gap of every completed
    request pooled, computed from the decode nodes' segments without one array per step.

    Step `i` of a segment lasts `a + s_t·(T0 + b·i)` and is a gap of each of its `b` requests
    except those that joined at that step (a segment starts at every join; theirs is their
    first gap, counted in `first_gaps`). The gap of rank r is the least x with at least r+1
    gaps <= x, found by bisection on x (count(x) is O(1) per segment)."""
    a_, t0_, b_, k_, j_, st_ = [], [], [], [], [], []
    for d in run.decode:
        if not d.segments:
            continue
        cols = d.segment_columns()
        step0 = cols["step0"]
        joins = np.zeros(step0.size, dtype=np.int64)
        if on_node[id(d)]:
            np.add.at(joins, np.searchsorted(step0, [st.join_step for st in on_node[id(d)]]), 1)
        a_.append(cols["a"])
        t0_.append(cols["T0"])
        b_.append(cols["b"].astype(np.float64))
        k_.append(cols["k"].astype(np.float64))
        j_.append(joins.astype(np.float64))
        st_.append(np.full(step0.size, d.model.s_t))
    if not a_ and not first_gaps.size:
        return tuple(math.nan for _ in qs)
    cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0))  # noqa: E731
    a, t0, b, k, j, s_t = cat(a_), cat(t0_), cat(b_), cat(k_), cat(j_), cat(st_)
    base = a + s_t * t0  # the first step's duration
    slope = s_t * b
    last = base + slope * (k - 1)
    total = float((b * k - j).sum()) + first_gaps.size
    if total <= 0:
        return tuple(math.nan for _ in qs)
    flat = slope <= 0.0
    safe_slope = np.where(flat, 1.0, slope)
    sorted_first = np.sort(first_gaps)

    def steps_within(x: float, seg: np.ndarray) -> np.ndarray:
        """Steps of each segment in `seg` whose duration is <= x (monotone in x)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            n = np.where(flat[seg], np.where(base[seg] <= x, k[seg], 0.0),
                         np.floor((x - base[seg]) / safe_slope[seg]) + 1.0)
        return np.clip(n, 0.0, k[seg])

    def gaps_of(n: np.ndarray, seg: np.ndarray) -> float:
        return float((b[seg] * n - j[seg] * (n >= 1)).sum())

    def first_within(x: float) -> float:
        return float(np.searchsorted(sorted_first, x, side="right"))

    lo_all = min(float(base.min()) if base.size else math.inf, float(first_gaps.min()) if first_gaps.size else math.inf)
    hi_all = max(float(last.max()) if last.size else -math.inf, float(first_gaps.max()) if first_gaps.size else -math.inf)
    every = np.arange(base.size)

    def value_at(rank: int) -> float:
        """The least x (by bisection) with at least rank+1 gaps <= x. Each segment's count
        of steps <= x is monotone in x, so a segment whose count is the same at both ends
        of the bracket keeps it inside: it is summed once and left out of later steps
        (the sums are of whole numbers, exact in any order)."""
        lo, hi = lo_all, hi_all
        seg = every
        n_lo = steps_within(lo, seg)
        if gaps_of(n_lo, seg) + first_within(lo) >= rank + 1:
            return lo
        n_hi = steps_within(hi, seg)
        fixed = 0.0  # gaps of the segments left out
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            if mid <= lo or mid >= hi:
                break
            moving = n_lo != n_hi
            if not moving.all():
                fixed += gaps_of(n_lo[~moving], seg[~moving])
                seg, n_lo, n_hi = seg[moving], n_lo[moving], n_hi[moving]
            n_mid = steps_within(mid, seg)
            if fixed + gaps_of(n_mid, seg) + first_within(mid) >= rank + 1:
                hi, n_hi = mid, n_mid
            else:
                lo, n_lo = mid, n_mid
        return hi

    out = []
    for q in qs:
        pos = q / 100.0 * (total - 1)
        r_lo, r_hi = math.floor(pos), math.ceil(pos)
        v_lo = value_at(r_lo)
        v_hi = v_lo if r_hi == r_lo else value_at(r_hi)
        out.append(v_lo + (v_hi - v_lo) * (pos - r_lo))
    return tuple(out)


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


def tbt_misses(states: list, ends: np.ndarray, durations: np.ndarray, tbt_slo_s: float) -> tuple[np.ndarray, list]:
    """For the requests one decode node ran (`ends`, `durations`: its steps): every one's
    first gap, and those whose TBT (`request_tbt`) is over `tbt_slo_s`.

    A request's TBT is at most its longest gap, so only requests whose longest gap passes
    the SLO need their longest 10% averaged; the longest gaps of all of them come from one
    `np.maximum.reduceat` over the node's step durations. (Exact: a request whose longest
    gap is within a relative 1e-12 of the SLO is judged by `request_tbt` too, so rounding in
    a mean cannot make the two disagree.)"""
    n = len(states)
    join = np.fromiter(map(attrgetter("join_step"), states), dtype=np.int64, count=n)
    finish = np.fromiter(map(attrgetter("finish_step"), states), dtype=np.int64, count=n)
    first = np.fromiter(map(attrgetter("first_token_s"), states), dtype=np.float64, count=n)
    gaps0 = ends[join] - first
    start = join + 1  # a request's later gaps are steps join+1 .. finish-1
    longest = gaps0.copy()
    has_steps = start < finish
    if has_steps.any():
        order = np.argsort(start, kind="stable")  # sorted starts keep reduceat's in-between spans disjoint
        padded = np.append(durations, -np.inf)  # an end may be one past the last step
        idx = np.empty(2 * n, dtype=np.int64)
        idx[0::2] = start[order]
        idx[1::2] = finish[order]
        span_max = np.maximum.reduceat(padded, idx)[0::2]
        step_max = np.full(n, -np.inf)
        step_max[order] = span_max
        longest = np.where(has_steps & (step_max > gaps0), step_max, gaps0)
    suspects = np.flatnonzero(longest > tbt_slo_s * (1.0 - 1e-12))
    missed = [states[i] for i in suspects.tolist()
              if request_tbt(float(gaps0[i]), durations, int(join[i]), int(finish[i])) > tbt_slo_s]
    return gaps0, missed


def slo_met(states, ttft_slo_s: float, tbt_slo_s: float) -> set[int]:
    """Indices of the `states` that completed within both SLOs (TBT as `request_tbt`: each
    request's decode node's steps, one node at a time, as `summarize` counts them)."""
    met: set[int] = set()
    on_node: dict[int, tuple[object, list]] = {}
    for st in states:
        if st.outcome is Outcome.COMPLETED and st.first_token_s - st.req.arrival_s <= ttft_slo_s:
            met.add(st.req.index)
            if st.join_step >= 0:
                on_node.setdefault(id(st.decode), (st.decode, []))[1].append(st)
    for node, joined in on_node.values():
        ends, durations, _ = node.step_arrays()  # type: ignore[attr-defined]
        met.difference_update(st.req.index for st in tbt_misses(joined, ends, durations, tbt_slo_s)[1])
    return met


def summarize(run: SimRun, *, speedup: float, wall_s: float) -> SimSummary:
    """The run's numbers. Decode nodes are taken one at a time (their step times rebuilt,
    their requests' TBT computed, the arrays dropped), so memory stays O(requests + segments)
    however many steps the nodes ran."""
    cfg = run.config
    ttft_slo, tbt_slo = cfg.ttft_slo_s, cfg.tbt_slo_s
    ttfts: list[float] = []
    met_ttft: dict[int, bool] = {}  # request index -> TTFT met (completed requests)
    on_node: dict[int, list] = {id(d): [] for d in run.decode}
    completed = rejected = after_prefill = failed = 0
    hit_blocks = prefilled_blocks = 0
    reasons: dict[str, int] = {}
    isnan, add_ttft = math.isnan, ttfts.append
    REJECTED, COMPLETED = Outcome.REJECTED, Outcome.COMPLETED  # noqa: N806 (locals for the loop)
    for st in run.states:
        req = st.req
        if not isnan(st.prefill_end_s):
            hit_blocks += st.hit_blocks
            prefilled_blocks += len(req.block_hashes)
        outcome = st.outcome
        if outcome is REJECTED:
            rejected += 1
            after_prefill += st.rejected_after_prefill
            key = str(st.rejection.reason) if st.rejection else "unknown"
            reasons[key] = reasons.get(key, 0) + 1
            continue
        if outcome is not COMPLETED:
            failed += 1
            continue
        completed += 1
        ttft = st.first_token_s - req.arrival_s
        add_ttft(ttft)
        met_ttft[req.index] = ttft <= ttft_slo
        if st.join_step >= 0:
            on_node[id(st.decode)].append(st)
    met = sum(met_ttft.values())  # requests that never joined a batch have no gap: TBT met
    first_gaps: list[np.ndarray] = []
    for d in run.decode:
        states = on_node[id(d)]
        if not states:
            continue
        ends, durations, _ = d.step_arrays()
        gaps0, missed = tbt_misses(states, ends, durations, tbt_slo)
        first_gaps.append(gaps0)
        met -= sum(1 for st in missed if met_ttft[st.req.index])
        del ends, durations
    tbt_p90, tbt_p99 = pooled_gap_percentiles(
        run, on_node, np.concatenate(first_gaps) if first_gaps else np.zeros(0), (90.0, 99.0))
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
        tbt_p90_s=tbt_p90,
        tbt_p99_s=tbt_p99,
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
