"""KV tiers in the simulator (bench.sim.tiers): demotion device -> host -> disk, store puts with
ancestors, lower-tier hits priced by the cost model, and the conductor's index kept exact by
the same tier-tagged events the live nodes publish."""
from __future__ import annotations

import json

import pytest

from bench.sim.cluster import SimConfig, SimRequest
from bench.sim.tiers import TierSizes, TieredSimulation, main
from bench.sim.trace import DEFAULT_TRACE
from conductor.cost_model import gpu_class_default
from conductor.modes import PolicyName
from conductor.prefix_index import STORE_NODE
from conductor.request import NodeId

BT = 512


def req(i: int, t: float, chain: tuple[int, ...]) -> SimRequest:
    return SimRequest(i, t, len(chain) * BT + 1, 2, chain)  # every block usable (+1: the last token)


A, B, C = (1, 2, 3), (10, 11, 12), (20, 21, 22)


def simulate(requests, tiers: TierSizes, *, prefill=1, device=3, policy=PolicyName.COST_AWARE):
    cfg = SimConfig(prefill_nodes=prefill, decode_nodes=1, cache_blocks=device, policy=policy, heartbeat_interval_s=0)
    sim = TieredSimulation(requests, cfg, gpu_class_default(), tiers)
    return sim, sim.run()


def check_index(sim: TieredSimulation) -> None:
    """The conductor's per-tier index holds exactly what each simulated tier holds."""
    idx = sim.state.index
    for node_id in sim.prefill_by_id:
        for name, tier in (("host", sim.host[node_id]), ("disk", sim.disk[node_id])):
            held = idx.tier(name).snapshot().get(NodeId(node_id), frozenset()) if name in idx.tiers else frozenset()
            assert held == frozenset(tier.blocks), (node_id, name)
            assert len(tier) <= tier.capacity
    store = idx.tier("cluster").snapshot().get(STORE_NODE, frozenset()) if "cluster" in idx.tiers else frozenset()
    if sim.tiers.index_bounds_store:  # the index models the store's LRU: at most its capacity, maybe wrong ones
        assert len(store) <= sim.store.capacity
        assert frozenset(sim.store.blocks) - store == sim.lost_store_hints()
    else:
        assert frozenset(sim.store.blocks) <= store  # the store evicts silently: the index may hold stale hints
        assert not sim.lost_store_hints()
    assert store - frozenset(sim.store.blocks) == sim.stale_store_hints()
    assert len(sim.stale_store_hints()) <= sim.store_evictions
    assert len(sim.store) <= max(0, sim.store.capacity)


def test_evicted_blocks_are_demoted_and_a_later_request_loads_them_from_host():
    reqs = [req(0, 0.0, A), req(1, 10.0, B), req(2, 20.0, A)]
    plain, plain_run = simulate(reqs, TierSizes())
    sim, run = simulate(reqs, TierSizes(host_blocks=3))
    assert plain_run.states[2].hit_blocks == 0  # B pushed A off the 3-block device
    assert run.states[2].hit_blocks == 3 and sim.hits == {"host": 3, "disk": 0, "cluster": 0}
    costs = gpu_class_default()
    load = costs.tier_load_s("host", 3 * BT)
    assert load == pytest.approx(3 * BT * costs.transfer.kv_bytes_per_token / 128e9)
    saved = plain_run.states[2].service_s - run.states[2].service_s
    assert saved == pytest.approx(costs.prefill_s(3 * BT + 1) - costs.prefill_s(3 * BT + 1, 3 * BT) - load)
    check_index(sim)


def test_host_displaces_to_disk_and_disk_hits_come_back_through_host():
    reqs = [req(0, 0.0, A), req(1, 10.0, B), req(2, 20.0, C), req(3, 30.0, A)]
    sim, run = simulate(reqs, TierSizes(host_blocks=3, disk_blocks=6))
    # the device holds C; the host B (A was displaced to disk); A loads from disk
    assert run.states[3].hit_blocks == 3 and sim.hits == {"host": 0, "disk": 3, "cluster": 0}
    # A came back through the host tier (B went to disk), then A on the device pushed C into
    # the host tier, which sent A down again: disk keeps both, no block is lost or duplicated
    assert set(sim.host["p0"].blocks) == set(C)
    assert set(sim.disk["p0"].blocks) == set(A) | set(B)
    assert set(sim.prefill_by_id["p0"].cache) == set(A)
    check_index(sim)


def test_the_store_serves_another_node_and_holds_whole_chains():
    sim2, run2 = simulate([req(0, 0.0, A), req(1, 10.0, A)], TierSizes(store_blocks=100), prefill=2,
                          policy=PolicyName.ROUND_ROBIN)  # round robin: the repeat goes to p1
    # write-back on finish put A's chain to the store: p1 loads it though p0 computed it
    assert run2.states[1].prefill_node == "p1" and run2.states[1].hit_blocks == 3
    assert sim2.hits["cluster"] == 3
    assert set(sim2.store.blocks) == set(A)
    check_index(sim2)


def test_a_tail_evicted_alone_goes_to_the_store_with_its_ancestors():
    reqs = [req(0, 0.0, A), req(1, 10.0, (1, 2, 30))]  # shares A's head; evicts only block 3
    sim, run = simulate(reqs, TierSizes(host_blocks=0, store_blocks=100, write_back_on_finish=False), device=3)
    assert set(sim.store.blocks) == {1, 2, 3}  # 3 was evicted, 1 and 2 are still on the device
    check_index(sim)


def test_the_store_evicts_silently_and_a_lookup_that_misses_corrects_the_index():
    # a 3-block store: B's put evicts A, C's evicts B; nobody is told until A is looked up
    reqs = [req(0, 0.0, A), req(1, 10.0, B), req(2, 20.0, C), req(3, 30.0, A)]
    sim, run = simulate(reqs, TierSizes(store_blocks=3, write_back_on_finish=False), device=3)
    assert run.states[3].hit_blocks == 0  # A is gone from the store
    assert sim.store_evictions == 6 and set(sim.store.blocks) == set(C)  # A, then B (when C went in)
    # A's lookup found A gone and removed it from the index; B's eviction no lookup has seen yet
    assert sim.stale_store_hints() == set(B)
    check_index(sim)


def test_an_index_that_models_the_store_lru_drops_the_hints_the_store_evicted():
    # as above, but the conductor bounds the cluster tier to the store's 3 blocks
    reqs = [req(0, 0.0, A), req(1, 10.0, B), req(2, 20.0, C), req(3, 30.0, A)]
    sim, run = simulate(reqs, TierSizes(store_blocks=3, write_back_on_finish=False, index_bounds_store=True), device=3)
    assert run.states[3].hit_blocks == 0 and sim.store_evictions == 6 and set(sim.store.blocks) == set(C)
    assert not sim.stale_store_hints() and not sim.lost_store_hints()  # B's silent eviction was modelled
    assert sim.state.index.store_dropped == 6
    check_index(sim)


def test_a_store_hit_refreshes_the_block_in_the_conductors_model_too():
    # a 6-block store: A then B go in; A is loaded back from it (a hit refreshes A), then the
    # device's eviction of C puts C, which must push out B, not A, in the store and the model
    reqs = [req(0, 0.0, A), req(1, 10.0, B), req(2, 20.0, C), req(3, 30.0, A)]
    sim, run = simulate(reqs, TierSizes(store_blocks=6, write_back_on_finish=False, index_bounds_store=True), device=3)
    assert run.states[3].hit_blocks == 3 and sim.hits["cluster"] == 3
    assert set(sim.store.blocks) == set(A) | set(C)
    assert not sim.stale_store_hints() and not sim.lost_store_hints()
    check_index(sim)


def test_the_cost_aware_policy_sends_a_repeat_to_the_node_whose_host_tier_holds_it():
    # p0 computes A and then B (A goes to its host tier); A again at t=20 must go to p0
    reqs = [req(0, 0.0, A), req(1, 10.0, C), req(2, 10.0, B), req(3, 20.0, A)]
    sim, run = simulate(reqs, TierSizes(host_blocks=3), prefill=2)
    holders = [st.prefill_node for st in run.states]
    assert holders[3] == holders[0] and run.states[3].hit_blocks == 3
    assert sim.hits["host"] == 3
    check_index(sim)


@pytest.mark.slow
@pytest.mark.skipif(not DEFAULT_TRACE.is_file(), reason="needs ../shared/traces/conversation_trace.jsonl")
def test_on_the_trace_tiers_raise_the_hit_rate_to_the_repeat_fraction(tmp_path):
    out = tmp_path / "t.json"
    assert main(["--limit", "3000", "--json", str(out), "--plot", str(tmp_path / "t.png")]) == 0
    rows = {r["tiers"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["device", "host", "host+disk", "host+disk+store", "host+disk+store+lru",
                          "host+disk+store+events"]
    best = rows["host+disk+store+events"]  # the index told of every store eviction
    assert best["hit_rate"] > rows["device"]["hit_rate"] + 0.03
    assert best["hit_rate"] >= best["repeat_fraction"] - 0.03
    assert best["ttft_mean_s"] < rows["device"]["ttft_mean_s"]
    assert best["stale_store_hints"] == 0
    silent = rows["host+disk+store"]  # evictions found out by lookups, as live
    assert silent["hit_rate"] > rows["device"]["hit_rate"] and silent["ttft_mean_s"] < rows["device"]["ttft_mean_s"]
    assert (tmp_path / "t.png").stat().st_size > 0
