"""The elastic-roles planner: the split it wants, and when it moves (hysteresis, cooldown,
limits); which node it drains."""
from __future__ import annotations

import math

import pytest
from sched_fixtures import view

from conductor.request import NodeId
from conductor.role_planner import PlannerSettings, PoolObservation, Role, RolePlanner, pick_drain
from conductor.view import DecodeNodeView, DecodeResident

QUIET = dict(interval_s=10.0, smoothing=1.0, lookahead_s=0.0, deadband=0.75, patience=2, cooldown_s=20.0,
             max_switching=4)


def obs(t: float, p_work: float, d_work: float, prefill: int = 8, decode: int = 8, to_p: int = 0, to_d: int = 0,
        ttft: float = math.nan, tbt: float = math.nan) -> PoolObservation:
    return PoolObservation(t, prefill, decode, to_p, to_d, p_work, d_work, ttft, tbt)


def test_the_split_follows_the_demand_after_patience_and_within_limits():
    planner = RolePlanner(PlannerSettings(**QUIET))
    assert planner.observe(obs(0.0, 0.0, 0.0)) is None  # the first observation only starts the clock
    # 10 s of 120 node-s of prefill and 40 of decode: 12 : 4 of 16 nodes is the split that loads both alike
    assert planner.observe(obs(10.0, 120.0, 40.0)) is None  # one observation is not a trend
    assert planner.desired_prefill == pytest.approx(12.0)
    move = planner.observe(obs(20.0, 120.0, 40.0))
    assert (move.to, move.count) == (Role.PREFILL, 4) and "desired 12.0 prefill of 16 nodes" in move.reason
    # 4 in transition now: nothing else moves (max_switching), and the cooldown holds anyway
    assert planner.observe(obs(30.0, 120.0, 40.0, decode=4, to_p=4)) is None
    assert planner.observe(obs(40.0, 120.0, 40.0, decode=4, to_p=4)) is None


def test_a_blip_does_not_move_nodes_and_a_small_gap_never_does():
    planner = RolePlanner(PlannerSettings(**QUIET))
    planner.observe(obs(0.0, 0.0, 0.0))
    assert planner.observe(obs(10.0, 150.0, 10.0)) is None  # one busy interval
    assert planner.observe(obs(20.0, 80.0, 80.0)) is None  # back to even: the streak is gone
    assert planner.observe(obs(30.0, 150.0, 10.0)) is None
    for t in (40.0, 50.0, 60.0):  # 8.5 : 7.5 wanted, 8 : 8 held: inside the deadband
        assert planner.observe(obs(t, 85.0, 75.0)) is None


def test_cooldown_and_pool_minimums():
    planner = RolePlanner(PlannerSettings(**{**QUIET, "max_switching": 8}))
    planner.observe(obs(0.0, 0.0, 0.0, prefill=14, decode=2))
    planner.observe(obs(10.0, 0.0, 160.0, prefill=14, decode=2))
    move = planner.observe(obs(20.0, 0.0, 160.0, prefill=14, decode=2))
    assert (move.to, move.count) == (Role.DECODE, 8)  # room for 8 in transition
    planner.observe(obs(30.0, 0.0, 160.0, prefill=6, decode=2, to_d=8))
    assert planner.observe(obs(35.0, 0.0, 160.0, prefill=6, decode=2, to_d=8)) is None  # cooldown (20 s)
    move = planner.observe(obs(45.0, 0.0, 160.0, prefill=6, decode=10))
    assert (move.to, move.count) == (Role.DECODE, 5)  # down to the one prefill node a pool keeps


def test_a_pool_grows_ahead_of_a_rising_demand_but_never_shrinks_ahead_of_a_falling_one():
    settings = PlannerSettings(**{**QUIET, "lookahead_s": 30.0, "trend_points": 3, "patience": 1})
    rising, falling = RolePlanner(settings), RolePlanner(settings)
    rising.observe(obs(0.0, 0.0, 0.0))
    falling.observe(obs(0.0, 0.0, 0.0))
    for t, p in ((10.0, 80.0), (20.0, 90.0), (30.0, 100.0)):  # prefill +1 node-s/s every 10 s
        r = rising.observe(obs(t, p, 80.0))
        f = falling.observe(obs(t, 160.0 - p, 80.0))
    assert rising.desired_prefill == pytest.approx(16 * 13 / 21)  # 10 + 3 ahead against 8
    assert (r.to, r.count) == (Role.PREFILL, 2)
    assert falling.desired_prefill == pytest.approx(16 * 6 / 14)  # 6 now (not the 3 it heads for) against 8
    assert f.to is Role.DECODE


def test_a_missed_slo_on_one_side_gets_that_side_a_node():
    planner = RolePlanner(PlannerSettings(**{**QUIET, "patience": 1}))
    planner.observe(obs(0.0, 0.0, 0.0))
    move = planner.observe(obs(10.0, 80.0, 80.0, ttft=1.4, tbt=0.6))  # even demand, TTFT over its SLO
    assert (move.to, move.count) == (Role.PREFILL, 1)
    planner = RolePlanner(PlannerSettings(**{**QUIET, "patience": 1}))
    planner.observe(obs(0.0, 0.0, 0.0))
    assert planner.observe(obs(10.0, 80.0, 80.0, ttft=1.4, tbt=1.2)) is None  # both missed: demand decides


def test_settings_are_validated():
    with pytest.raises(ValueError, match="interval_s > 0"):
        PlannerSettings(interval_s=0.0)
    with pytest.raises(ValueError, match="pool minimums"):
        PlannerSettings(min_prefill=0)


def test_the_node_drained_is_the_one_with_the_least_work():
    v = view({"p0": 105.0, "p1": 101.0, "p2": 99.0, "p3": 90.0}, cached={"p2": 5})
    assert pick_drain(v, Role.PREFILL, 100.0) == "p3"  # idle, nothing cached (p2 idle too, caches 5 blocks)
    assert pick_drain(v, Role.PREFILL, 100.0, frozenset({NodeId("p3")})) == "p2"
    busy, quiet = DecodeNodeView(NodeId("d0"), 1000), DecodeNodeView(NodeId("d1"), 1000)
    busy.residents = {f"r{i}": DecodeResident(f"r{i}", 10, 0.0) for i in range(3)}
    quiet.residents = {"q": DecodeResident("q", 10, 0.0)}
    v.decode = [busy, quiet]
    assert pick_drain(v, Role.DECODE, 100.0) == "d1"
    quiet.healthy = False
    assert pick_drain(v, Role.DECODE, 100.0) == "d0"
