"""Elastic roles in the simulator: nodes drain, switch and rejoin through the cluster state,
and no request is lost on the way (costs in tests/bench/test_sim.py)."""
from __future__ import annotations

import json

from test_sim import COSTS, cfg, req

from bench.sim.elastic import ElasticConfig, ElasticSimulation, main
from bench.sim.events import Outcome, check_event_log
from conductor.modes import AdmissionMode
from conductor.role_planner import PlannerSettings, Role

PLANNER = PlannerSettings(interval_s=1.0, smoothing=1.0, lookahead_s=0.0, patience=2, cooldown_s=2.0, max_switching=2)


def test_a_prefill_bound_cluster_takes_decode_nodes_into_prefill_and_loses_no_request():
    # 2:2 to start; 120 requests of 2,000 uncached tokens (2 s of prefill each) at 4/s: prefill
    # wants nearly every node, decode (3 tokens each) almost none
    trace = [req(i, 0.25 * i, (2 * i + 1, 2 * i + 2, 2 * i + 3, 2 * i + 4), out=3, tokens=2000) for i in range(120)]
    sim = ElasticSimulation(trace, cfg(admission=AdmissionMode.NONE, heartbeat_interval_s=0.5), COSTS,
                            ElasticConfig(nodes=4, initial_prefill=2, switch_s=1.5, planner=PLANNER))
    run = sim.run()
    # one of the two decode nodes (the first, both as busy) moves; a pool keeps one node: 3 : 1
    assert [(m[1], m[2]) for m in sim.moves] == [("n2", Role.PREFILL)]
    assert [v.node_id for v in run.state.view.prefill] == ["n0", "n1", "n2"]
    assert [v.node_id for v in run.state.view.decode] == ["n3"]
    assert all(st.outcome is Outcome.COMPLETED for st in run.states) and check_event_log(run) == []
    assert len(run.state) == 0 and not sim.draining and not sim.switching
    moved_at = sim.moves[0][0]
    (gone_at, gone), = sim.drained
    served = [st for st in run.states if st.decode_node == "n2"]
    assert gone == "n2" and served and all(st.finish_s <= gone_at for st in served)  # drained, then removed
    later = [st for st in run.states if st.req.arrival_s > moved_at + 1.5 + 1.0]
    assert any(st.prefill_node == "n2" for st in later)  # it serves prefills now
    assert not any(st.decode_node == "n2" for st in later)


def test_a_draining_prefill_node_takes_nothing_new_and_finishes_its_queue_first():
    # decode-bound: long answers on 3 prefill + 1 decode nodes; the planner wants decode nodes,
    # drains a prefill node, which first finishes its queue
    trace = [req(i, 0.05 * i, (i + 1,), out=400, tokens=100) for i in range(200)]
    sim = ElasticSimulation(trace, cfg(admission=AdmissionMode.NONE, heartbeat_interval_s=0.5), COSTS,
                            ElasticConfig(nodes=4, initial_prefill=3, switch_s=1.0, planner=PLANNER))
    run = sim.run()
    assert sim.moves and all(m[2] is Role.DECODE for m in sim.moves)
    gone = dict((node, t) for t, node in sim.drained)
    for t, node, _, _ in sim.moves:
        # nothing was dispatched to a draining node, and it left only once its queue was done
        assert not any(st.prefill_node == node and t < st.enqueued_s < gone[node] for st in run.states)
        assert all(st.prefill_end_s <= gone[node] for st in run.states if st.prefill_node == node and st.enqueued_s < t)
    assert all(st.outcome is Outcome.COMPLETED for st in run.states) and len(run.state) == 0
    assert len(run.state.view.decode) > 1


def test_the_comparison_program_runs_fixed_splits_and_the_elastic_cluster(tmp_path, capsys):
    out = tmp_path / "elastic.json"
    assert main(["--requests", "1500", "--nodes", "4", "--splits", "1,2,3", "--period", "120", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["label"] for r in data["results"]] == ["fixed 1:3", "fixed 2:2", "fixed 3:1", "elastic"]
    assert all(r["requests"] == 1500 for r in data["results"]) and data["timeline"]
    assert data["best_fixed"].startswith("fixed") and data["gain"] > 0
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "elastic / best fixed" in capsys.readouterr().out
