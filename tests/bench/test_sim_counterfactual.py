"""Counterfactual runs judge each admission rejection: the fork admits the request where the
scheduler had routed it and says whether it would have met its SLOs. Costs: prefill 1 ms per
uncached token, network 0.1 ms per token, decode step ~12 ms (tests/bench/test_sim.py)."""
from __future__ import annotations

import math

import pytest
from test_sim import COSTS, cfg, req

from bench.sim.cluster import Simulation
from bench.sim.counterfactual import CounterfactualSimulation
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
