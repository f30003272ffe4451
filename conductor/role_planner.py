"""Elastic prefill/decode roles: a planner that moves nodes between the two pools as the load
mix shifts. Pure: an adapter (the simulator now, the live conductor later) observes, asks,
and carries the moves out: drain the node (out of rotation, its work finishes), switch its
role, rejoin the other pool.

Each `observe` gets what the cluster was asked to do since the last one, as work in
node-seconds: prefill = the predicted service of every dispatched prefill; decode = the
output tokens dispatched over what one decode node generates per second within the TBT SLO
(`CostModel.decode_tokens_per_s`). Smoothed demand rates give the split that loads both
pools alike,

    desired prefill nodes = N × prefill rate / (prefill rate + decode rate)

with each rate extrapolated `lookahead_s` ahead along its recent trend when it grows (a
move takes a drain and a switch to land: the split should fit the load it will meet; a
pool never shrinks on a decline it has not seen yet), and observed
TTFT/TBT against their SLOs nudge it (a pool missing its SLO while the other
meets its own gets at least one more node). Hysteresis: a move starts only when the desired
split is at least `deadband` nodes away for `patience` consecutive observations and
`cooldown_s` has passed since the last move; at most `max_switching` nodes are in transition
at once; each pool keeps its minimum. Nodes in transition count toward the pool they join.
`pick_drain` chooses which node leaves a pool: the one with the least work on it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from conductor.request import NodeId
from conductor.view import ClusterView


class Role(StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(frozen=True, slots=True)
class PlannerSettings:
    interval_s: float = 10.0  # how often the adapter observes
    smoothing: float = 0.4  # weight of the newest interval in the demand rates
    lookahead_s: float = 60.0  # extrapolate the demand this far along its trend (0: no trend)
    trend_points: int = 6  # smoothed rates the trend is fitted on
    deadband: float = 0.75  # nodes the desired split must be away before a move
    patience: int = 2  # consecutive observations wanting the same direction
    cooldown_s: float = 20.0  # after a move starts
    max_switching: int = 4  # nodes draining or switching at once
    min_prefill: int = 1
    min_decode: int = 1

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or not 0 < self.smoothing <= 1 or self.deadband < 0 or self.patience < 1:
            raise ValueError("planner: interval_s > 0, 0 < smoothing <= 1, deadband >= 0, patience >= 1 required")
        if self.lookahead_s < 0 or self.trend_points < 2:
            raise ValueError("planner: lookahead_s >= 0 and trend_points >= 2 required")
        if self.cooldown_s < 0 or self.max_switching < 1 or self.min_prefill < 1 or self.min_decode < 1:
            raise ValueError("planner: cooldown_s >= 0, max_switching >= 1 and pool minimums >= 1 required")


@dataclass(frozen=True, slots=True)
class PoolObservation:
    now_s: float
    prefill_nodes: int  # serving as prefill (not draining)
    decode_nodes: int
    to_prefill: int  # draining or switching towards prefill
    to_decode: int
    prefill_work_s: float  # node-seconds of prefill dispatched since the last observation
    decode_work_s: float  # node-seconds of decode dispatched since the last observation
    ttft_ratio: float = math.nan  # observed TTFT (p90) / TTFT SLO over the interval
    tbt_ratio: float = math.nan  # observed TBT (p90) / TBT SLO over the interval


@dataclass(frozen=True, slots=True)
class RoleMove:
    to: Role
    count: int
    reason: str


class RolePlanner:
    def __init__(self, settings: PlannerSettings | None = None) -> None:
        self.settings = settings or PlannerSettings()
        self._last_s: float | None = None
        self._prefill_rate: float | None = None
        self._decode_rate = 0.0
        self._streak = 0  # > 0: consecutive wishes for more prefill; < 0: for more decode
        self._moved_s = -math.inf
        self._history: list[tuple[float, float, float]] = []  # (t, prefill rate, decode rate), smoothed
        self.desired_prefill: float = math.nan  # the last computed split (for logs and plots)

    def observe(self, obs: PoolObservation) -> RoleMove | None:
        s = self.settings
        last, self._last_s = self._last_s, obs.now_s
        if last is None or obs.now_s <= last:
            return None
        dt = obs.now_s - last
        p_rate, d_rate = obs.prefill_work_s / dt, obs.decode_work_s / dt
        if self._prefill_rate is None:
            self._prefill_rate, self._decode_rate = p_rate, d_rate
        else:
            a = s.smoothing
            self._prefill_rate += a * (p_rate - self._prefill_rate)
            self._decode_rate += a * (d_rate - self._decode_rate)
        self._history.append((obs.now_s, self._prefill_rate, self._decode_rate))
        del self._history[: -s.trend_points]
        p_ahead, d_ahead = self._ahead(obs.now_s)
        # a pool grows on the demand it is heading for, and shrinks only on the demand it has now
        p_ahead, d_ahead = max(p_ahead, self._prefill_rate), max(d_ahead, self._decode_rate)
        total = obs.prefill_nodes + obs.decode_nodes + obs.to_prefill + obs.to_decode
        have = obs.prefill_nodes + obs.to_prefill  # what prefill will have once moves land
        demand = p_ahead + d_ahead
        desired = total * p_ahead / demand if demand > 0 else float(have)
        # an SLO missed on one side only: that side gets at least one more node
        ttft_bad = obs.ttft_ratio > 1.0 and not obs.tbt_ratio > 1.0
        tbt_bad = obs.tbt_ratio > 1.0 and not obs.ttft_ratio > 1.0
        if ttft_bad and desired < have + 1:
            desired = have + 1.0
        elif tbt_bad and desired > have - 1:
            desired = have - 1.0
        desired = min(max(desired, s.min_prefill), total - s.min_decode)
        self.desired_prefill = desired
        gap = desired - have
        direction = 1 if gap >= s.deadband else -1 if gap <= -s.deadband else 0
        if direction == 0 or (direction > 0) != (self._streak > 0):
            self._streak = direction
        else:
            self._streak += direction
        if abs(self._streak) < s.patience or obs.now_s - self._moved_s < s.cooldown_s:
            return None
        room = s.max_switching - obs.to_prefill - obs.to_decode
        if direction > 0:
            count = min(round(gap), obs.decode_nodes - s.min_decode, room)
        else:
            count = min(round(-gap), obs.prefill_nodes - s.min_prefill, room)
        if count < 1:
            return None
        self._moved_s = obs.now_s
        self._streak = 0
        to = Role.PREFILL if direction > 0 else Role.DECODE
        why = (f"desired {desired:.1f} prefill of {total} nodes (prefill {p_ahead:.2f} / decode {d_ahead:.2f} "
               f"node-s/s {s.lookahead_s:g} s ahead; TTFT {obs.ttft_ratio:.2f} / TBT {obs.tbt_ratio:.2f} of SLO), "
               f"have {have}")
        return RoleMove(to, count, why)


    def _ahead(self, now_s: float) -> tuple[float, float]:
        """The smoothed rates `lookahead_s` from now along their least-squares trend."""
        s, h = self.settings, self._history
        p_now, d_now = self._prefill_rate or 0.0, self._decode_rate
        if s.lookahead_s == 0 or len(h) < s.trend_points:
            return p_now, d_now
        t = [x[0] for x in h]
        mean_t = sum(t) / len(t)
        var = sum((x - mean_t) ** 2 for x in t)
        if var == 0:
            return p_now, d_now

        def slope(k: int) -> float:
            ys = [x[k] for x in h]
            mean_y = sum(ys) / len(ys)
            return sum((a - mean_t) * (b - mean_y) for a, b in zip(t, ys)) / var

        return max(0.0, p_now + slope(1) * s.lookahead_s), max(0.0, d_now + slope(2) * s.lookahead_s)


def pick_drain(view: ClusterView, role: Role, now_s: float, exclude: frozenset[NodeId] = frozenset()) -> NodeId | None:
    """The healthy node of `role` with the least work on it: a prefill node's queue (then the
    fewest cached blocks: the least cache lost), a decode node's residents (then its KV)."""
    if role is Role.PREFILL:
        index = view.index
        best = min(((max(0.0, p.busy_until_s - now_s), getattr(index, "blocks_on", lambda n: 0)(p.node_id), i, p.node_id)
                    for i, p in enumerate(view.prefill) if p.healthy and p.node_id not in exclude), default=None)
    else:
        best = min(((len(d.residents), d.reserved_tokens + d.pending_kv_tokens, i, d.node_id)
                    for i, d in enumerate(view.decode) if d.healthy and d.node_id not in exclude), default=None)
    return best[3] if best is not None else None
