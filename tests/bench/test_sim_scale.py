"""The scale benchmark on a small run: it replays every request through the core and
reports its phases."""
from __future__ import annotations

import json

from bench.sim.scale import main


def test_the_scale_run_replays_every_request_and_reports_each_phase(tmp_path, capsys):
    out = tmp_path / "scale.json"
    assert main(["--requests", "3000", "--nodes", "64", "--json", str(out)]) == 0
    row = json.loads(out.read_text())
    assert (row["requests"], row["nodes"], row["prefill_nodes"], row["decode_nodes"]) == (3000, 64, 32, 32)
    s = row["summary"]
    assert s["requests"] == 3000 and s["completed"] + s["rejected"] + s["failed"] == 3000
    assert s["completed"] > 2700  # load 0.8: nearly everything is served
    assert s["prefill_nodes"] == 32 and s["admission"] == "early" and s["policy"] == "cost_aware"
    for phase in ("generate", "simulate", "summarize", "total"):
        assert row[f"{phase}_s"] > 0 and row[f"{phase}_cpu_s"] > 0
    assert row["total_s"] >= row["generate_s"] + row["simulate_s"] + row["summarize_s"] - 1e-6
    assert row["total_cpu_s"] >= row["generate_cpu_s"] + row["simulate_cpu_s"] + row["summarize_cpu_s"] - 1e-6
    assert "requests on 32P+32D" in capsys.readouterr().out


def test_a_large_clusters_decode_candidates_are_the_lowest_committed_loads_through_health_flips():
    """What keeps a decision on 4,096 nodes cheap must not change it: the LoadIndex's decode
    candidates are exactly the healthy nodes of lowest committed load, also after a node went
    out of rotation and came back unchanged (its heap entry was dropped meanwhile)."""
    import random

    from conductor.cluster_state import ClusterState
    from conductor.cost_model import gpu_class_default
    from conductor.decision import Decision, DecodeChoice, LoadBasis, PrefillChoice
    from conductor.modes import AdmissionMode, PolicyName
    from conductor.policies import DECODE_CANDIDATES, committed_load_key
    from conductor.request import NodeId, RequestInfo
    from conductor.settings import SettingsValues

    rng = random.Random(3)
    settings, costs = SettingsValues(), gpu_class_default()
    state = ClusterState(512)
    state.add_prefill(NodeId("p0"))
    decode = [NodeId(f"d{i}") for i in range(80)]
    for node in decode:
        state.add_decode(node, 1_000_000)
    loads = state.loads
    key = committed_load_key(settings, costs)
    loads.set_decode_key(key, state.view.decode, (settings, costs))

    def brute() -> list[str]:
        ranked = sorted((key(d), i, d.node_id) for i, d in enumerate(state.view.decode) if d.healthy)
        return [n for _, _, n in ranked[:DECODE_CANDIDATES]]

    down: set[NodeId] = set()
    for k in range(400):
        step = rng.random()
        if step < 0.6:  # a request lands somewhere
            node = rng.choice(decode)
            info = RequestInfo(f"r{k}", rng.randint(100, 20_000), ())
            state.dispatched(info, Decision(info.request_id, PolicyName.COST_AWARE, AdmissionMode.NONE, 0.0,
                                            PrefillChoice(NodeId("p0"), 0, None, 0, 0, 0.0, 0.0, 0.0, 0.1, 0.0),
                                            DecodeChoice(node, 0.0, 0.0, 0.0, LoadBasis.COMMITTED)), 0.0)
        elif step < 0.8 or not down:
            node = rng.choice(decode)
            (state.node_up if node in down else state.node_down)(node)
            (down.discard if node in down else down.add)(node)
        else:  # back in rotation with nothing else changed
            node = down.pop()
            state.node_up(node)
        assert [v.node_id for _, v in loads.decode_candidates(DECODE_CANDIDATES)] == brute(), k
