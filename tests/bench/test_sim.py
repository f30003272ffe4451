"""The trace-driven simulator on tiny hand-made traces, where every number is worked out by hand.

Costs: prefill 1 ms per uncached token, local prefix free, network 0.1 ms per token, decode
step 10 ms + 1 ms per sequence + 1 µs per token in flight; blocks of 512 tokens.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from bench.sim import main
from bench.sim.cluster import SimConfig, SimRequest, Simulation, simulate
from bench.sim.events import EventKind, Outcome, RequestEvent, check_event_log
from bench.sim.metrics import ROW_KEYS, summarize
from conductor.cost_model import CostModel, DecodeModel, PrefillModel, TransferModel
from conductor.decision import RejectReason, Stage
from conductor.modes import AdmissionMode, PolicyName
from conductor.predictions import Quantity

COSTS = CostModel(
    prefill=PrefillModel(c_nn=0.0, c_np=0.0, c_n=0.001, c_p=-0.001, c_1=0.0),
    decode=DecodeModel(s_1=0.010, s_b=0.001, s_t=1e-6),
    transfer=TransferModel(kv_bytes_per_token=1000, network_bytes_per_s=1e7),
)


def req(i: int, at: float, blocks: tuple[int, ...], out: int, tokens: int | None = None) -> SimRequest:
    return SimRequest(i, at, tokens if tokens is not None else 512 * len(blocks), out, blocks)


def cfg(**kw) -> SimConfig:
    base = dict(prefill_nodes=1, decode_nodes=1, policy=PolicyName.KV_CENTRIC, admission=AdmissionMode.NONE,
                cache_blocks=100, decode_kv_tokens=1_000_000, ttft_slo_s=30.0, tbt_slo_s=0.1, typical_output_tokens=100)
    base.update(kw)
    return SimConfig(**base)


def test_one_request_end_to_end_timing():
    run = simulate([req(0, 0.0, (1, 2), out=3)], cfg(), COSTS)
    st = run.states[0]
    assert st.outcome is Outcome.COMPLETED
    assert st.prefill_end_s == pytest.approx(1.024)  # 1,024 tokens at 1 ms
    assert st.first_token_s == pytest.approx(1.024 + 0.1024)  # + KV sent to the decode node
    step1 = 0.010 + 0.001 + 1025e-6  # prompt + first token in flight
    step2 = 0.010 + 0.001 + 1026e-6
    assert st.finish_s == pytest.approx(1.1264 + step1 + step2)
    assert [e.kind for e in run.events] == [EventKind.ARRIVED, EventKind.PREFILL_STARTED, EventKind.PREFILL_DONE,
                                           EventKind.FIRST_TOKEN, EventKind.COMPLETED]
    s = summarize(run, speedup=1.0, wall_s=0.0)
    assert (s.requests, s.completed, s.rejected, s.prefix_hit_rate) == (1, 1, 0, 0.0)
    assert s.ttft_mean_s == pytest.approx(1.1264)
    assert s.tbt_p99_s == pytest.approx(step1 + 0.99 * (step2 - step1))
    assert s.slo_attainment == 1.0
    d0 = run.state.decode_view("d0")
    assert d0.residents == {} and (d0.reserved_tokens, d0.running, d0.tokens_in_flight) == (0, 0, 0)
    assert len(run.state) == 0  # the cluster state holds nothing once every request finished


def test_a_later_turn_reuses_the_cached_prefix():
    trace = [req(0, 0.0, (1, 2), out=2), req(1, 5.0, (1, 2, 3), out=2, tokens=1300)]
    run = simulate(trace, cfg(), COSTS)
    second = run.states[1]
    assert second.hit_blocks == 2
    assert second.prefill_end_s - second.prefill_start_s == pytest.approx((1300 - 1024) * 0.001)
    assert summarize(run, speedup=1.0, wall_s=0.0).prefix_hit_rate == pytest.approx(2 / 5)


def test_a_fully_cached_prompt_recomputes_only_its_last_token():
    run = simulate([req(0, 0.0, (1, 2), out=2), req(1, 5.0, (1, 2), out=2)], cfg(), COSTS)
    st = run.states[1]
    assert st.hit_blocks == 2
    assert st.prefill_end_s - st.prefill_start_s == pytest.approx(0.001)


def test_lru_eviction_is_published_and_the_index_mirrors_every_cache():
    trace = [req(0, 0.0, (1, 2), 2), req(1, 3.0, (3, 4), 2), req(2, 6.0, (1, 5), 2), req(3, 9.0, (6,), 2)]
    run = simulate(trace, cfg(prefill_nodes=2, cache_blocks=2), COSTS)
    # p0 serves (1, 2) then (1, 5): block 2 is least recent; p1 serves (3, 4) then (6,): block 4
    # goes (a chain is evicted from its tail: its head stays most recent).
    assert [list(n.cache) for n in run.prefill] == [[5, 1], [3, 6]]
    assert run.index.snapshot() == {"p0": frozenset({1, 5}), "p1": frozenset({3, 6})}
    assert run.index.gaps_detected == 0
    assert [run.index.next_seq(n) for n in ("p0", "p1")] == [3, 3]  # stored, stored, removed
    assert check_event_log(run) == []


def test_kv_centric_pulls_a_busy_nodes_prefix_and_replicates_it():
    blocks_a = tuple(range(100, 110))  # 5,120 tokens
    trace = [
        req(0, 0.0, blocks_a, 2),  # p0 (both idle: first in view order), done at 5.12
        req(1, 0.1, tuple(range(200, 210)), 2),  # p1 (p0 busy), done at 5.22
        req(2, 5.2, tuple(range(300, 320)), 2),  # p0 (idle), busy until 15.44
        req(3, 5.3, blocks_a + (999,), 2, tokens=5632),  # p1 pulls blocks_a from p0
    ]
    run = simulate(trace, cfg(prefill_nodes=2), COSTS)
    st = run.states[3]
    d = st.decision.prefill
    assert (d.node, d.pull_from, d.pulled_blocks, d.cached_blocks) == ("p1", "p0", 10, 0)
    assert st.hit_blocks == 10
    assert st.prefill_end_s - st.prefill_start_s == pytest.approx(5120 * 1e-4 + 512 * 1e-3)
    assert run.index.holders(100) == {"p0", "p1"}  # the hot prefix now lives on both nodes
    # cache_aware_local also avoids the busy owner (10.6 s vs 5.6 s) but recomputes everything
    local = simulate(trace, cfg(prefill_nodes=2, policy=PolicyName.CACHE_AWARE_LOCAL), COSTS)
    assert (local.states[3].decision.prefill.node, local.states[3].hit_blocks) == ("p1", 0)
    assert local.index.holders(100) == {"p0", "p1"}


def test_a_full_decode_node_rejects_the_next_request_before_its_prefill():
    # As the live decode node's Reserve: KV is reserved on dispatch (prompt + answer here),
    # and a request that does not fit is rejected before any prefill work is spent.
    trace = [req(0, 0.0, (1, 2), out=976), req(1, 0.5, (3, 4), out=10), req(2, 20.0, (5, 6), out=10)]
    run = simulate(trace, cfg(prefill_nodes=2, decode_kv_tokens=3000), COSTS)
    first, second, third = run.states
    assert first.outcome is Outcome.COMPLETED and third.outcome is Outcome.COMPLETED  # room again at t = 20
    assert second.outcome is Outcome.REJECTED and not second.rejected_after_prefill
    assert (second.rejection.reason, second.rejection.stage) == (RejectReason.DECODE_OUT_OF_BLOCKS, Stage.ARRIVAL)
    assert "d0: 1034 tokens of KV do not fit in 1000 free" in second.rejection.detail
    assert math.isnan(second.prefill_start_s)
    assert check_event_log(run) == []
    assert len(run.state) == 0 and run.state.prefill_view("p1").queued_requests == 0


def test_a_prompt_that_can_never_fit_the_decode_node_fails_with_a_reason():
    run = simulate([req(0, 0.0, (1, 2, 3), out=10)], cfg(decode_kv_tokens=1000), COSTS)
    st = run.states[0]
    assert st.outcome is Outcome.FAILED and "exceed decode KV capacity 1000" in st.failure
    assert check_event_log(run) == []
    assert summarize(run, speedup=1.0, wall_s=0.0).failed == 1


def _burst():
    """Five long-output requests at t = 0 on one prefill and one decode node; with a 20 ms TBT
    SLO the decode node holds four of them (step(5, ~5,120) = 20.1 ms)."""
    return [req(i, 0.0, (10 * i + 1, 10 * i + 2), out=2000) for i in range(5)]


def test_per_stage_drops_the_fifth_request_after_its_prefill_ran():
    run = simulate(_burst(), cfg(admission=AdmissionMode.PER_STAGE, tbt_slo_s=0.02, typical_output_tokens=2000), COSTS)
    outcomes = [st.outcome for st in run.states]
    assert outcomes == [Outcome.COMPLETED] * 4 + [Outcome.REJECTED]
    last = run.states[4]
    assert last.rejected_after_prefill and last.rejection.stage is Stage.AFTER_PREFILL
    assert last.rejection.reason is RejectReason.DECODE_OVERLOADED
    assert last.prefill_end_s == pytest.approx(5 * 1.024)  # its prefill was spent for nothing
    s = summarize(run, speedup=1.0, wall_s=0.0)
    assert (s.rejected, s.rejected_after_prefill) == (1, 1)
    assert check_event_log(run) == []


def test_early_admits_what_the_decode_node_holds_over_the_requests_lives():
    # Request k arrives with k admitted ones still in prefill (committed: they count) and
    # 2000 tokens each still to generate: its step over its life is
    # 10 + (k + 1) ms + 1e-6 x (k + 1) x (1024 + 2000 / 2) = 13.0, 16.0, 19.1, 22.1 ms for
    # k = 0..3, so the fourth and fifth are rejected on arrival (SLO 20 ms), and the three
    # admitted keep their mean gap within it (a batch of four would end at 26 ms a step).
    run = simulate(_burst(), cfg(admission=AdmissionMode.EARLY, tbt_slo_s=0.02, typical_output_tokens=2000), COSTS)
    assert [st.outcome for st in run.states] == [Outcome.COMPLETED] * 3 + [Outcome.REJECTED] * 2
    fourth = run.states[3]
    assert (fourth.rejection.reason, fourth.rejection.stage) == (RejectReason.DECODE_OVERLOADED, Stage.ARRIVAL)
    assert fourth.decision.decode.predicted_tbt_s == pytest.approx(0.010 + 0.004 + 1e-6 * 4 * 2024)
    for st in run.states[:3]:
        assert (st.finish_s - st.first_token_s) / 1999 <= 0.02
    assert summarize(run, speedup=1.0, wall_s=0.0).rejected_after_prefill == 0
    assert check_event_log(run) == []


def test_predictive_rejects_on_arrival_what_the_decode_node_could_not_hold_over_their_lives():
    # Projected to when its KV lands (the prompts before it are through their prefills and
    # have barely started decoding), then grown as early's estimate is: the fourth and fifth
    # are rejected on arrival, never run, and the three admitted keep their mean gap <= 20 ms.
    run = simulate(_burst(), cfg(admission=AdmissionMode.PREDICTIVE, tbt_slo_s=0.02, typical_output_tokens=2000), COSTS)
    assert [st.outcome for st in run.states] == [Outcome.COMPLETED] * 3 + [Outcome.REJECTED] * 2
    for st in run.states[3:]:
        assert (st.rejection.reason, st.rejection.stage) == (RejectReason.DECODE_OVERLOADED_PROJECTED, Stage.ARRIVAL)
        assert not st.rejected_after_prefill and st.prefill_start_s != st.prefill_start_s  # never ran (NaN)
    for st in run.states[:3]:
        assert (st.finish_s - st.first_token_s) / 1999 <= 0.02
    assert check_event_log(run) == []


def test_the_event_log_check_catches_inconsistent_trails():
    run = simulate([req(0, 0.0, (1,), 3), req(1, 0.1, (2,), 3)], cfg(), COSTS)
    assert check_event_log(run) == []
    run.events.append(RequestEvent(9.0, 0, EventKind.REJECTED, "late"))
    run.events[:] = [e for e in run.events if not (e.request == 1 and e.kind is EventKind.COMPLETED)]
    problems = check_event_log(run)
    assert len(problems) == 2
    assert "request 0: expected exactly one terminal event" in problems[0]
    assert "request 1: expected exactly one terminal event" in problems[1]


def test_noise_makes_the_logged_prediction_error_visible():
    trace = [req(i, 2.0 * i, (i + 1,), 2) for i in range(20)]
    exact = summarize(simulate(trace, cfg(), COSTS), speedup=1.0, wall_s=0.0)
    noisy = summarize(simulate(trace, cfg(service_noise=0.3), COSTS), speedup=1.0, wall_s=0.0)
    assert exact.prefill_prediction_mae_s == 0.0
    assert noisy.prefill_prediction_mae_s > 0.01


# -- the CLI -------------------------------------------------------------------------------------

def test_cli_compares_policies_and_writes_rows_and_a_plot(tmp_path, capsys):
    out = tmp_path / "sim.json"
    rc = main(["--limit", "300", "--compare", "--policies", "kv_centric,random", "--json", str(out), "--check"])
    assert rc == 0
    rows = json.loads(out.read_text())
    assert [r["policy"] for r in rows] == ["kv_centric", "random"]
    assert all(list(r)[: len(ROW_KEYS)] == list(ROW_KEYS) for r in rows)
    assert all(r["requests"] == 300 and r["completed"] + r["rejected"] == 300 for r in rows)
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "kv_centric" in capsys.readouterr().out


def test_cli_compares_admission_modes(tmp_path):
    out = tmp_path / "adm.json"
    assert main(["--limit", "300", "--speedup", "4", "--decode", "1", "--compare-admission", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["admission"] for r in rows] == ["none", "per_stage", "early", "predictive"]
    # `none` never rejects on a prediction; a decode node out of KV still refuses the
    # reservation (as live, in every mode), and 8 prefill nodes at 4x fill one decode node's KV
    assert set(rows[0]["rejections_by_reason"]) == {"decode_out_of_blocks"}
    assert "decode_out_of_blocks" in rows[2]["rejections_by_reason"]
    assert set(rows[2]["rejections_by_reason"]) <= {"prefill_overloaded", "decode_overloaded", "decode_out_of_blocks"}
    assert rows[2]["rejected_after_prefill"] == rows[3]["rejected_after_prefill"] == 0


def test_cli_runs_the_smallest_cluster(tmp_path):
    out = tmp_path / "one.json"
    assert main(["--prefill", "1", "--decode", "1", "--limit", "60", "--json", str(out), "--check"]) == 0
    row = json.loads(out.read_text())[0]
    assert (row["prefill_nodes"], row["decode_nodes"], row["completed"], row["rejected"]) == (1, 1, 60, 0)
    # 200 requests overload one prefill node: those queued behind it hold decode KV reserved
    # for them (as live), and the decode node refuses reservations once they fill it
    assert main(["--prefill", "1", "--decode", "1", "--limit", "200", "--json", str(out), "--check"]) == 0
    row = json.loads(out.read_text())[0]
    assert row["completed"] + row["rejected"] == 200
    assert row["rejected"] > 0 and set(row["rejections_by_reason"]) == {"decode_out_of_blocks"}


def test_cli_refuses_bad_input_with_a_message(capsys, tmp_path):
    assert main(["--policy", "fastest", "--limit", "10"]) == 2
    assert "unknown policy 'fastest'" in capsys.readouterr().err
    assert main(["--trace", str(tmp_path / "none.jsonl")]) == 2
    assert "trace file not found" in capsys.readouterr().err


def test_cli_loads_another_cost_model(tmp_path):
    path = tmp_path / "costs.json"
    replace(COSTS, description="hand-made").save(path)
    out = tmp_path / "x.json"
    assert main(["--limit", "50", "--cost-model", str(path), "--json", str(out)]) == 0
    fast = json.loads(out.read_text())[0]
    assert main(["--limit", "50", "--json", str(out)]) == 0
    gpu = json.loads(out.read_text())[0]
    assert fast["ttft_mean_s"] != gpu["ttft_mean_s"]


def test_the_simulator_writes_the_view_only_through_the_cluster_state():
    """Record every call the simulation makes into its ClusterState, replay them into a fresh
    one: the two views are equal field by field (nothing else wrote to the view)."""
    from dataclasses import asdict

    from bench.sim.cluster import Simulation
    from conductor.cluster_state import ClusterState

    calls = []
    methods = ("add_prefill", "add_decode", "dispatched", "reserved", "prefill_started", "prefill_done",
               "decode_joined", "finished", "heartbeat_prefill", "heartbeat_decode", "kv_event")

    class Recording(ClusterState):
        pass

    for name in methods:
        def recorded(self, *args, _name=name, **kwargs):
            calls.append((_name, args, kwargs))
            return getattr(ClusterState, _name)(self, *args, **kwargs)
        setattr(Recording, name, recorded)

    trace = [req(i, 0.3 * i, (i % 3 + 1, 100 + i), out=5 + i) for i in range(12)]
    import bench.sim.cluster as sim_cluster

    original = sim_cluster.ClusterState
    sim_cluster.ClusterState = Recording
    try:
        sim = Simulation(trace, cfg(prefill_nodes=2, decode_nodes=2, heartbeat_interval_s=0.5), COSTS)
        views = []
        while sim._events or sim._next_arrival < len(trace):  # one event at a time, then a snapshot
            sim.run_until(math.inf, until=lambda: True)
            views.append((len(calls), asdict(sim.view.decode[0]), asdict(sim.view.prefill[1])))
    finally:
        sim_cluster.ClusterState = original
    assert {name for name, _, _ in calls} == set(methods)
    replay = ClusterState(cfg().block_tokens)
    done = 0
    for upto, decode0, prefill1 in views:
        for name, args, kwargs in calls[done:upto]:
            getattr(replay, name)(*args, **kwargs)
        done = upto
        assert asdict(replay.view.decode[0]) == decode0 and asdict(replay.view.prefill[1]) == prefill1
    assert replay.index.snapshot() == sim.state.index.snapshot()


def test_pooled_tbt_percentiles_equal_numpys_over_every_gap():
    """The summary pools gaps from segments (no array per step); the same numbers as
    np.percentile over every gap of every completed request, listed one by one."""
    import numpy as np

    trace = [req(i, 0.05 * i, (i + 1,), out=3 + (7 * i) % 40, tokens=200 + (37 * i) % 900) for i in range(150)]
    run = simulate(trace, cfg(prefill_nodes=3, decode_nodes=2), COSTS)
    gaps = []
    arrays = {id(d): d.step_arrays() for d in run.decode}
    for st in run.states:
        if st.outcome is Outcome.COMPLETED and st.join_step >= 0:
            ends, durations, _ = arrays[id(st.decode)]
            gaps.append(ends[st.join_step] - st.first_token_s)
            gaps.extend(durations[st.join_step + 1 : st.finish_step])
    s = summarize(run, speedup=1.0, wall_s=0.0)
    assert len(gaps) > 2000
    assert s.tbt_p90_s == pytest.approx(float(np.percentile(gaps, 90)), rel=1e-9)
    assert s.tbt_p99_s == pytest.approx(float(np.percentile(gaps, 99)), rel=1e-9)


def test_decode_heartbeats_calibrate_tbt_by_how_much_slower_the_steps_ran_than_modelled():
    trace = [req(i, 0.5 * i, (i + 1,), out=200) for i in range(60)]
    for scale in (1.0, 1.5, 0.8):
        sim = Simulation(trace, cfg(decode_time_scale=scale), COSTS)
        run = sim.run()
        cal = sim.scheduler.calibration
        assert cal.samples(Quantity.TBT) >= 25  # one window a heartbeat (1 s) while steps ran
        assert cal.factor(Quantity.TBT) == pytest.approx(scale, rel=1e-9)
        gaps = [(st.finish_s - st.first_token_s) / 199 for st in run.states]
        assert min(gaps) >= scale * 0.011 - 1e-12  # every step took scale x the model's


def test_decode_time_scale_is_checked():
    with pytest.raises(ValueError, match="decode_time_scale"):
        cfg(decode_time_scale=0.0)


def test_events_due_at_one_time_run_in_push_order_also_those_pushed_while_it_runs():
    """The event queue keeps a heap of times and, per time, its events in push order: ties
    run as pushed, an event pushed for the time being processed runs after those already due
    then and before any later time, and arrivals at that time come after the events."""
    from bench.sim.cluster import _TICK

    ran: list[tuple[float, str]] = []

    class Ticks(Simulation):
        def _tick(self, payload, t):
            ran.append((t, payload))
            if payload == "b":
                self._push(t, _TICK, "b-again")  # due now: after "c", before 2.0
                self._push(1.5, _TICK, "late-push")

        def _arrive(self, st, t):
            ran.append((t, f"arrival {st.req.index}"))

    sim = Ticks([req(0, 1.0, (1,), out=2)], cfg(heartbeat_interval_s=0), COSTS)
    for t, name in [(2.0, "d"), (1.0, "a"), (1.0, "b"), (0.5, "first"), (1.0, "c")]:
        sim._push(t, _TICK, name)
    sim.run_until(math.inf)
    assert ran == [(0.5, "first"), (1.0, "a"), (1.0, "b"), (1.0, "c"), (1.0, "b-again"), (1.0, "arrival 0"),
                   (1.5, "late-push"), (2.0, "d")]
