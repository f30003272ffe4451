"""Counterfactual runs judge each admission rejection: the fork admits the request where the
scheduler had routed it and says whether it would have met its SLOs. Costs: prefill 1 ms per
uncached token, network 0.1 ms per token, decode step ~12 ms (tests/bench/test_sim.py)."""
from __future__ import annotations

import math
import random

import pytest
from test_sim import COSTS, cfg, req

from bench.sim.cluster import Simulation
from bench.sim.counterfactual import Counterfactual, CounterfactualSimulation, record_decisions
from conductor.cost_model import CostModel, PrefillModel
from conductor.decision import RejectReason
from conductor.modes import AdmissionMode


def burst(n: int = 4):
    return [req(i, 0.0, (10 * i + 1, 10 * i + 2), out=3, tokens=1000) for i in range(n)]


def test_a_rejection_of_a_request_that_would_have_been_late_is_right():
    # One prefill node, TTFT SLO 2 s: r1 waits 1 s (not congested: admitted, late by 0.1 s);
    # r2 and r3 would wait 2 s: rejected, and admitted they would have had their first token at 3.1 s
    sim = CounterfactualSimulation(burst(), cfg(admission=AdmissionMode.EARLY, ttft_slo_s=2.0,
                                                heartbeat_interval_s=0.0), COSTS)
    run = sim.run()
    assert [st.rejection.reason if st.rejection else None for st in run.states] == [
        None, None, RejectReason.PREFILL_OVERLOADED, RejectReason.PREFILL_OVERLOADED]
    assert [(v.request, v.would_meet) for v in sim.verdicts] == [(2, False), (3, False)]
    assert math.isnan(sim.verdicts[0].ttft_s)  # no first token by the deadline: the fork stops there
    p = sim.precision()
    assert (p.rejections, p.judged, p.right, p.precision) == (2, 2, 2, 1.0)


def test_a_rejection_on_a_pessimistic_prediction_is_wrong():
    """The scheduler predicts with a cost model three times too slow: r1's TTFT is predicted
    6.1 s (SLO 2.5 s) but would have been 2.1 s."""
    sim = CounterfactualSimulation(burst(2), cfg(admission=AdmissionMode.EARLY, ttft_slo_s=2.5,
                                                 heartbeat_interval_s=0.0), COSTS)
    p = COSTS.prefill
    sim.scheduler.set_costs(CostModel(PrefillModel(p.c_nn, p.c_np, 3 * p.c_n, 3 * p.c_p, p.c_1), COSTS.decode,
                                      COSTS.transfer))
    run = sim.run()
    assert run.states[1].rejection is not None and "predicted TTFT 6.1 s" in run.states[1].rejection.detail
    (v,) = sim.verdicts
    assert (v.request, v.would_meet) == (1, True)
    assert v.ttft_s == pytest.approx(2.1) and v.tbt_s < 0.1
    assert sim.precision().precision == 0.0


def test_judging_leaves_the_run_as_it_was_and_samples_every_nth():
    trace = [req(i, 0.25 * i, (i + 1, 1000 + i), out=4, tokens=1000) for i in range(40)]
    config = cfg(prefill_nodes=2, admission=AdmissionMode.EARLY, ttft_slo_s=2.0)
    plain = Simulation(trace, config, COSTS).run()
    judged = CounterfactualSimulation(trace, config, COSTS, sample=2)
    run = judged.run()
    key = lambda r: [(st.outcome, st.first_token_s, st.finish_s) for st in r.states]  # noqa: E731
    assert key(run) == key(plain)
    rejected = sum(st.rejection is not None for st in run.states)
    assert rejected >= 4 and judged.precision().rejections == rejected
    assert len(judged.verdicts) == math.ceil(rejected / 2)
    assert all(not v.would_meet for v in judged.verdicts)  # exact costs: every rejection is right


def test_a_replay_fork_keeps_every_later_decision_and_a_free_fork_does_not():
    """One prefill node, TTFT SLO 2.5 s, 1,000-token prompts (1 s prefill + 0.1 s KV send):
    r0 and r1 arrive at 0 (TTFT 1.1 and 2.1 s: admitted), r2 at 0 is rejected (3.1 s), r3 at
    1.0 s is admitted (it starts when r1 ends at 2.0: TTFT 2.1 s). Admitting r2 in a fork puts
    it before r3: a free fork's scheduler then rejects r3 (predicted 3.1 s) in its place; a
    replay fork admits r3 as the real run did. r2 misses its SLO either way (first token 3.1 s)."""
    trace = burst(3) + [req(3, 1.0, (31, 32), out=3, tokens=1000)]
    config = cfg(admission=AdmissionMode.EARLY, ttft_slo_s=2.5, heartbeat_interval_s=0.0)
    verdicts = {}
    for mode in Counterfactual:
        sim = CounterfactualSimulation(trace, config, COSTS, mode=mode)
        run = sim.run()
        assert [st.rejection is None for st in run.states] == [True, True, False, True]
        verdicts[mode] = sim.verdicts
    (free,), (replayed,) = verdicts[Counterfactual.FREE], verdicts[Counterfactual.REPLAY]
    assert (free.request, free.would_meet, free.displaced) == (2, False, 1)
    assert (replayed.request, replayed.would_meet, replayed.displaced) == (2, False, 0)
    assert math.isnan(free.ttft_s) and math.isnan(replayed.ttft_s)  # no first token by 2.5 s


def test_record_decisions_is_the_run_and_replaying_them_is_the_same_run():
    trace = [req(i, 0.1 * i, (i % 3 + 1, 100 + i), out=5, tokens=900) for i in range(30)]
    config = cfg(prefill_nodes=2, decode_nodes=2, admission=AdmissionMode.PER_STAGE, ttft_slo_s=1.5)
    plain = Simulation(trace, config, COSTS)
    decisions = record_decisions(plain)
    run = plain.run()
    assert decisions.arrival == {st.req.index: st.decision for st in run.states
                                 if not st.rejected_after_prefill}
    assert decisions.refused == {st.req.index for st in run.states if st.rejection is not None}
    replay = Simulation(trace, config, COSTS)
    replay.forced, replay.forced_after = decisions.arrival, decisions.after_prefill

    def never(*args):
        raise AssertionError("a replay asks the scheduler nothing")

    replay.scheduler.decide = replay.scheduler.decide_after_prefill = never
    again = replay.run()
    key = lambda r: [(st.outcome, st.first_token_s, st.finish_s, st.prefill_node, st.decode_node)  # noqa: E731
                     for st in r.states]
    assert key(again) == key(run) and len(decisions.refused) >= 10 and len(decisions.after_prefill) >= 10


def tbt_bound():
    """120 requests on 12 prefill nodes and one decode node, TBT SLO 40 ms: the decode batch
    binds, so admission rejects on predicted TBT."""
    rng = random.Random(0)
    trace = [req(i, 0.12 * i + rng.random() * 0.05, (1000 + i,), out=rng.randint(5, 120), tokens=rng.randint(300, 1500))
             for i in range(120)]
    config = cfg(prefill_nodes=12, admission=AdmissionMode.EARLY, ttft_slo_s=5.0, tbt_slo_s=0.04,
                 heartbeat_interval_s=0.5)
    return trace, config


def test_a_verdict_counts_what_the_admission_would_have_cost_the_other_requests():
    """A TBT-bound run (12 prefill nodes, one decode node, TBT SLO 40 ms, exact costs): some
    rejected requests would have met their SLOs and cost nobody theirs (net: wrong), others
    would have met theirs and pushed residents of the shared batch over the TBT SLO (net:
    right). Each fork's harmed / helped counts equal those of the whole run replayed to its
    end with that one request admitted."""
    from dataclasses import replace

    from bench.sim.metrics import slo_met

    trace, config = tbt_bound()
    sim = CounterfactualSimulation(trace, config, COSTS)
    sim.run()
    met = sim.decisions.met
    checked = 0
    for v in sim.verdicts:
        if not v.would_meet:
            assert (v.harmed, v.helped, v.net_right) == (0, 0, True)
            continue
        whole = Simulation(trace, config, COSTS)
        whole.forced = {**sim.decisions.arrival, v.request: replace(sim.decisions.arrival[v.request], rejection=None)}
        whole.forced_after = {**sim.decisions.after_prefill, v.request: None}
        run = whole.run()
        twin = run.states[v.request]
        assert v.request in slo_met([twin], 5.0, 0.04)
        overlapped = [st for st in run.states if st.req.index > v.request and st.req.arrival_s <= twin.finish_s]
        met_whole = slo_met(run.states, 5.0, 0.04)
        harmed = sum(st.req.index in met and st.req.index not in met_whole for st in overlapped)
        helped = sum(st.req.index in met_whole and st.req.index not in met for st in overlapped)
        assert (v.harmed, v.helped) == (harmed, helped), v
        checked += 1
    p = sim.precision()
    own_wrong = sum(v.would_meet for v in sim.verdicts)
    net_wrong = sum(not v.net_right for v in sim.verdicts)
    assert checked == own_wrong >= 10 and 0 < net_wrong < own_wrong  # the net view differs, both ways occur
    assert p.precision == pytest.approx(1 - own_wrong / p.judged)
    assert p.net_precision == pytest.approx(1 - net_wrong / p.judged) and p.net_precision > p.precision


def test_precision_splits_by_stage_and_the_decode_margin_is_that_of_the_wrong_decode_rejections():
    """The TBT-bound run above, and a TTFT-bound burst: each stage's precision counts its own
    verdicts and rejections; the decode margin is the median slack to the TBT SLO of the
    decode rejections judged wrong and what one such request adds to a step."""
    import statistics

    from bench.sim.counterfactual import DECODE_REASONS, PREFILL_REASONS

    trace, config = tbt_bound()
    sim = CounterfactualSimulation(trace, config, COSTS)
    run = sim.run()
    decode = sim.precision(DECODE_REASONS)
    prefill = sim.precision(PREFILL_REASONS)
    assert decode.judged == len(sim.verdicts) and prefill.judged == 0  # every rejection here is on TBT
    assert decode.rejections == sum(st.rejection is not None and st.rejection.reason in DECODE_REASONS
                                    for st in run.states) == sim.precision().rejections
    assert (decode.right, decode.net_right) == (sim.precision().right, sim.precision().net_right)
    wrong = [v for v in sim.verdicts if v.would_meet]
    m = COSTS.decode
    for v in sim.verdicts:
        r = trace[v.request]
        assert v.own_step_s == pytest.approx(m.s_b + m.s_t * (r.input_tokens + r.output_tokens))
    margin = sim.decode_margin()
    assert margin.wrong == len(wrong) >= 10
    assert margin.slack == pytest.approx(statistics.median(1 - v.tbt_s / 0.04 for v in wrong))
    assert margin.own_step == pytest.approx(statistics.median(v.own_step_s / 0.04 for v in wrong))
    assert 0 < margin.slack < 1

    burst_sim = CounterfactualSimulation(burst(), cfg(admission=AdmissionMode.EARLY, ttft_slo_s=2.0,
                                                      heartbeat_interval_s=0.0), COSTS)
    burst_sim.run()
    p = burst_sim.precision(PREFILL_REASONS)
    assert (p.rejections, p.judged, p.right) == (2, 2, 2)
    assert burst_sim.precision(DECODE_REASONS).judged == 0 and math.isnan(burst_sim.precision(DECODE_REASONS).precision)
    assert burst_sim.decode_margin().wrong == 0 and math.isnan(burst_sim.decode_margin().slack)
