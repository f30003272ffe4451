"""The scale benchmark on a small run: it replays every request through the core and
reports its phases."""
from __future__ import annotations

import json
import math

import pytest

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


def test_the_run_in_slices_behind_the_progress_bar_is_the_run_in_one_go():
    """`run_with_progress` stops the loop between events 200 times; every request ends as in
    one `run()`, at the same times, on the same nodes."""
    from bench.sim.cluster import SimConfig, Simulation
    from bench.sim.compare import at_load
    from bench.sim.scale import run_with_progress
    from bench.sim.trace import to_sim_requests
    from bench.sim.workloads import GENERATORS
    from conductor.cost_model import gpu_class_default

    costs = gpu_class_default()
    config = SimConfig(prefill_nodes=4, decode_nodes=4, record_events=False)
    requests, _ = at_load(to_sim_requests(GENERATORS["tool_agent"](1500, seed=2)), 1.2, config, costs)

    def ends(run):  # (NaN as None: NaN != NaN unless it is the same float object)
        return [(st.outcome, st.prefill_node, st.decode_node, *(None if math.isnan(v) else v for v in
                                                                 (st.first_token_s, st.finish_s))) for st in run.states]

    whole = Simulation(requests, config, costs).run()
    sliced = run_with_progress(Simulation(requests, config, costs), slices=37)
    assert ends(sliced) == ends(whole)
    assert len({e[0] for e in ends(whole)}) >= 2  # completions and rejections both happen


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
        elif step < 0.75 or not down:
            node = rng.choice(decode)
            (state.node_up if node in down else state.node_down)(node)
            (down.discard if node in down else down.add)(node)
        elif step < 0.8:  # a heartbeat round: most nodes report at once (the heap is rebuilt)
            for node in decode:
                if rng.random() < 0.9:
                    state.heartbeat_decode(node, running=rng.randint(0, 8), waiting=rng.randint(0, 2),
                                           tokens_in_flight=rng.randint(0, 50_000), used_tokens=rng.randint(0, 90_000),
                                           now_s=0.0)
        else:  # back in rotation with nothing else changed
            node = down.pop()
            state.node_up(node)
        assert [v.node_id for _, v in loads.decode_candidates(DECODE_CANDIDATES)] == brute(), k


def test_a_large_clusters_least_busy_prefill_node_and_backlog_are_the_brute_force_ones_through_health_flips():
    """The LoadIndex pushes a changed prefill node at the next query only, and only when its
    busy time moved: the answer must stay the healthy node of earliest busy time (first in
    view order on ties), also when a node left rotation, surfaced at the top while out (its
    entry dropped) and came back with nothing else changed."""
    import random

    from conductor.cluster_state import ClusterState
    from conductor.decision import Decision, DecodeChoice, LoadBasis, PrefillChoice
    from conductor.modes import AdmissionMode, PolicyName
    from conductor.request import NodeId, RequestInfo

    rng = random.Random(5)
    state = ClusterState(512)
    prefill = [NodeId(f"p{i}") for i in range(80)]
    for node in prefill:
        state.add_prefill(node)
    state.add_decode(NodeId("d0"), 10**9)
    loads = state.loads

    def brute():
        ranked = sorted((p.busy_until_s, i, p.node_id) for i, p in enumerate(state.view.prefill) if p.healthy)
        return ranked[0][2] if ranked else None

    down: set[NodeId] = set()
    placed: list[str] = []
    now = 0.0
    for k in range(1500):
        step = rng.random()
        now += rng.choice((0.0, 0.0, 0.05, 0.5))  # ties in time too
        if step < 0.45:  # a request queues on some node (often the least busy one)
            least = loads.least_busy_prefill()
            node = least[1].node_id if least is not None and rng.random() < 0.5 else rng.choice(prefill)
            info = RequestInfo(f"r{k}", 100, ())
            state.dispatched(info, Decision(info.request_id, PolicyName.COST_AWARE, AdmissionMode.NONE, now,
                                            PrefillChoice(node, 0, None, 0, 0, 0.0, 0.0, 0.0,
                                                          rng.choice((0.1, 0.2, 1.0)), 0.0),
                                            DecodeChoice(NodeId("d0"), 0.0, 0.0, now, LoadBasis.COMMITTED)), now)
            placed.append(info.request_id)
        elif step < 0.65 and placed:  # one ends (or is cancelled before its prefill)
            state.finished(placed.pop(rng.randrange(len(placed))), now)
        elif step < 0.8 or not down:
            node = rng.choice(prefill)
            (state.node_up if node in down else state.node_down)(node)
            (down.discard if node in down else down.add)(node)
        elif step < 0.85:  # a heartbeat round: most nodes report at once (the heaps are rebuilt)
            for node in prefill:
                if rng.random() < 0.9:
                    state.heartbeat_prefill(node, rng.choice((0, rng.randint(1, 5_000))), now)
        else:  # back in rotation with nothing else changed
            state.node_up(down.pop())
        least = loads.least_busy_prefill()
        assert (least[1].node_id if least is not None else None) == brute(), k
        if rng.random() < 0.3:  # the backlog (its heap entries are pushed at a query, too)
            healthy = [p for p in state.view.prefill if p.healthy]
            expected = sum(max(0.0, p.busy_until_s - now) for p in healthy) / len(healthy) if healthy else 0.0
            assert loads.backlog_s(now) == pytest.approx(expected, rel=1e-9, abs=1e-9), k


def test_the_least_busy_prefill_node_is_the_brute_force_one_as_nodes_join_and_leave():
    """The order grows as nodes join (past its tree's capacity, also after queries) and is
    rebuilt as they leave: the answer stays the healthy node of earliest busy time, first in
    view order on ties, with busy times tied at inf too."""
    import random

    from conductor.cluster_state import ClusterState
    from conductor.request import NodeId

    rng = random.Random(11)
    state = ClusterState(512)
    loads = state.loads
    names = iter(NodeId(f"p{i}") for i in range(10_000))
    live: list[NodeId] = []

    def brute():
        ranked = sorted((p.busy_until_s, i, p.node_id) for i, p in enumerate(state.view.prefill) if p.healthy)
        return ranked[0][2] if ranked else None

    for k in range(3000):
        step = rng.random()
        if step < 0.25 or len(live) < 3:  # a node joins
            node = next(names)
            state.add_prefill(node)
            live.append(node)
        elif step < 0.35:  # one leaves
            state.remove_node(live.pop(rng.randrange(len(live))))
        elif step < 0.5:
            node = rng.choice(live)
            (state.node_down if rng.random() < 0.5 else state.node_up)(node)
        else:  # its predicted queue moves (ties, and inf, on purpose)
            view = state.view.prefill[rng.randrange(len(state.view.prefill))]
            view.busy_until_s = rng.choice((0.0, 1.0, 2.0, float("inf"), rng.random()))
            loads.changed_prefill(view)
        if rng.random() < 0.7:
            least = loads.least_busy_prefill()
            assert (least[1].node_id if least is not None else None) == brute(), k
            if least is not None:
                assert state.view.prefill[least[0]] is least[1]


def test_the_min_tree_is_the_least_key_and_lowest_position():
    import random

    from conductor.view import _MinTree

    rng = random.Random(3)
    for n in (1, 2, 3, 7, 64, 100):
        keys = [rng.choice((0.0, 1.0, float("inf"), rng.random())) for _ in range(n)]
        tree = _MinTree(keys)
        for _ in range(400):
            i = rng.randrange(n)
            keys[i] = rng.choice((0.0, 1.0, 2.0, float("inf"), rng.random()))
            tree.set(i, keys[i])
            least = min(keys)
            value, position = tree.top()
            assert value == least
            if least != float("inf"):  # (every key inf: no winner is promised)
                assert position == keys.index(least)
