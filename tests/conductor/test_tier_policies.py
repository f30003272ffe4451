"""The cache-aware policies score a prefix held below the device (a node's host or disk tier,
or the cluster store) as cached at its load time (`CostModel.tier_load_s`), not as recomputed.

Costs as in sched_fixtures (prefill 1 ms per uncached token, 100-token blocks, the local
device prefix free) plus tier rates at 1,000 B/token: host 100 MB/s (1 ms a block), disk
20 MB/s (5 ms a block, + 1 ms through host), cluster store 10 MB/s (10 ms, + 1 ms).
"""
from __future__ import annotations

from dataclasses import replace

import pytest
from sched_fixtures import chain, costs, request, view

from conductor.modes import PolicyName
from conductor.policies import SCAN_LIMIT, LowerTiers, make_policy
from conductor.request import NodeId
from conductor.settings import SettingsValues
from conductor.view import LoadIndex
from engine.block_pool import STORED, KVEvent

NOW = 100.0
CACHE_AWARE = (PolicyName.CACHE_AWARE_LOCAL, PolicyName.KV_CENTRIC, PolicyName.COST_AWARE)
RATES = {"host": 1e8, "disk": 2e7, "cluster": 1e7}


def tier_costs(rates=RATES):
    base = costs()
    return replace(base, transfer=replace(base.transfer, tier_bytes_per_s=dict(rates)))


def choose(name, v, req=None, rates=RATES):
    policy = make_policy(name, tier_costs(rates))
    policy.settings = SettingsValues()
    return policy.choose_prefill(v, req or request(), NOW)


def put(v, tier: str, node: str, blocks: range):
    """`node` holds blocks `blocks` (0-based positions of the request's chain) in `tier`."""
    hashes = chain(10)
    v.index.apply(KVEvent(STORED, tuple(hashes[i] for i in blocks), tier=tier, seq=v.index.next_seq(NodeId(node)),
                          node=node))


@pytest.mark.parametrize("name", CACHE_AWARE)
def test_a_host_tier_hit_beats_recomputing(name):
    # p0 evicted the prefix from its device into its host tier; p1 (idle longer) has nothing
    v = view({"p0": NOW - 1.0, "p1": NOW - 3.0})
    assert choose(name, v).node == "p1"  # nothing cached anywhere: the node idle longest
    put(v, "host", "p0", range(8))
    c = choose(name, v)
    # p0: 8 host blocks (8 ms) + 200 tokens (0.2 s); p1: 1,000 tokens (1.0 s)
    assert (c.node, c.cached_blocks, c.pull_from, c.reused_tokens) == ("p0", 0, None, 800)
    assert c.load_s == pytest.approx(0.008)
    assert c.prefill_s == pytest.approx(0.2)
    assert c.service_s == pytest.approx(0.208)


@pytest.mark.parametrize("name", CACHE_AWARE)
def test_a_device_hit_beats_the_same_prefix_in_a_host_tier(name):
    # both hold 8 blocks, p0 on its device (free), p1 in host memory (8 ms); p1 idle longer
    v = view({"p0": NOW - 1.0, "p1": NOW - 3.0}, cached={"p0": 8})
    put(v, "host", "p1", range(8))
    c = choose(name, v)
    assert (c.node, c.cached_blocks, c.reused_tokens, c.load_s) == ("p0", 8, 800, 0.0)


@pytest.mark.parametrize("name", CACHE_AWARE)
def test_the_host_run_continues_the_device_prefix(name):
    # p0: blocks 0-3 on the device, 4-8 in host memory; p1: blocks 0-5 on the device
    v = view({"p0": NOW - 1.0, "p1": NOW - 3.0}, cached={"p0": 4, "p1": 6})
    put(v, "host", "p0", range(4, 9))
    c = choose(name, v)
    assert (c.node, c.cached_blocks, c.reused_tokens) == ("p0", 4, 900)
    assert c.load_s == pytest.approx(0.005)


@pytest.mark.parametrize("name", CACHE_AWARE)
def test_the_store_run_is_usable_from_any_node_also_after_its_writer_left(name):
    # p0 put the prefix to the cluster store and is busy for 5 s; p1 is idle
    v = view({"p0": NOW + 5.0, "p1": NOW - 1.0})
    put(v, "cluster", "p0", range(8))
    c = choose(name, v)
    # p1: 8 store blocks (8 x 11 ms) + 0.2 s, against p0's 5 s queue
    assert (c.node, c.cached_blocks, c.reused_tokens) == ("p1", 0, 800)
    assert c.load_s == pytest.approx(0.088)
    v.index.remove_node(NodeId("p0"))
    v.prefill = [p for p in v.prefill if p.node_id != "p0"]
    again = choose(name, v)
    assert (again.node, again.reused_tokens, again.load_s) == ("p1", 800, pytest.approx(0.088))


def test_a_host_hit_beats_a_store_hit_and_a_store_hit_beats_recomputing():
    # p0: host 8 blocks; p1: nothing of its own, the store holds the 8 blocks; p2 sees the same store
    v = view({"p0": NOW - 1.0, "p1": NOW - 2.0})
    put(v, "host", "p0", range(8))
    put(v, "cluster", "p0", range(8))
    tiers = LowerTiers(v, request(), tier_costs())
    assert tiers.run(NodeId("p0"), 0) == (8, pytest.approx(0.008))  # a block in both counts for the host
    assert tiers.run(NodeId("p1"), 0) == (8, pytest.approx(0.088))
    assert tiers.run(NodeId("p1"), 8) == (0, 0.0)
    for name in CACHE_AWARE:
        assert choose(name, v).node == "p0"


def test_a_tier_without_a_rate_ends_the_run_and_is_recomputed():
    # p0: host 0-1, disk 2-3, host 4-5; the cost model knows no disk rate
    v = view({"p0": NOW - 1.0})
    put(v, "host", "p0", range(2))
    put(v, "disk", "p0", range(2, 4))
    put(v, "host", "p0", range(4, 6))
    full = choose(PolicyName.CACHE_AWARE_LOCAL, v)
    assert (full.reused_tokens, full.load_s) == (600, pytest.approx(0.004 + 2 * 0.006))
    cut = choose(PolicyName.CACHE_AWARE_LOCAL, v, rates={"host": 1e8, "cluster": 1e7})
    assert (cut.reused_tokens, cut.load_s) == (200, pytest.approx(0.002))


def test_every_policys_estimate_counts_the_chosen_nodes_lower_tiers():
    # least_loaded ignores caches when it chooses, but the node still loads its host run
    v = view({"p0": NOW - 1.0, "p1": NOW - 3.0})
    put(v, "host", "p1", range(5))
    c = choose(PolicyName.LEAST_LOADED, v)
    assert (c.node, c.reused_tokens, c.load_s, c.prefill_s) == ("p1", 500, pytest.approx(0.005), pytest.approx(0.5))


def test_a_pull_is_weighed_against_the_nodes_own_lower_tiers():
    # p0 holds 8 device blocks and is busy 5 s; p1 holds them in host memory: loading them
    # (8 ms) beats pulling them from p0 (80 ms), so kv_centric pulls nothing
    v = view({"p0": NOW + 5.0, "p1": NOW - 1.0}, cached={"p0": 8})
    put(v, "host", "p1", range(8))
    c = choose(PolicyName.KV_CENTRIC, v)
    assert (c.node, c.pull_from, c.pulled_blocks, c.reused_tokens) == ("p1", None, 0, 800)
    assert c.load_s == pytest.approx(0.008)


@pytest.mark.parametrize("name", CACHE_AWARE)
def test_on_a_large_cluster_a_node_with_only_a_host_tier_prefix_is_a_candidate(name):
    # more nodes than SCAN_LIMIT: candidates come from the indexes, not a scan of every node
    n = SCAN_LIMIT + 6
    v = view({f"p{i}": NOW - 1.0 - (i == 3) for i in range(n)})  # p3 the least busy
    put(v, "host", "p42", range(9))
    v.loads = LoadIndex()
    for i, p in enumerate(v.prefill):
        v.loads.add_prefill(p, i)
    c = choose(name, v)
    assert (c.node, c.cached_blocks, c.reused_tokens) == ("p42", 0, 900)
