"""Each policy's decision on small hand-built cluster views (costs in sched_fixtures)."""
from __future__ import annotations

import pytest
from sched_fixtures import BLOCK, costs, request, view

from conductor.decision import LoadBasis
from conductor.modes import PolicyName
from conductor.policies import POLICIES, make_policy
from conductor.request import NodeId
from conductor.settings import SettingsValues
from conductor.view import DecodeNodeView, DecodeResident

NOW = 100.0


def choose(name: PolicyName, v, req=None, network: float = 1e7, now: float = NOW):
    return make_policy(name, costs(network)).choose_prefill(v, req or request(), now)


# A 1,000-token prompt; p0 caches its first 800 tokens and is busy for 0.5 s; p1 is idle, empty.
def busy_cache_vs_idle(queue_s: float):
    return view({"p0": NOW + queue_s, "p1": NOW - 3.0}, cached={"p0": 8})


def test_busy_cache_vs_idle_kv_centric_pulls_to_the_idle_node():
    c = choose(PolicyName.KV_CENTRIC, busy_cache_vs_idle(0.5))
    # p0: 0.5 s queue + 0.2 s prefill = 0.7 s; p1 pulling 800 tokens: 0.08 s + 0.2 s = 0.28 s
    assert (c.node, c.pull_from, c.cached_blocks, c.pulled_blocks, c.reused_tokens) == ("p1", "p0", 0, 8, 800)
    assert c.queue_s == 0.0
    assert c.pull_s == pytest.approx(0.08)
    assert c.prefill_s == pytest.approx(0.2)
    assert c.kv_send_s == pytest.approx(0.1)  # 1,000 tokens to the decode node
    assert c.ttft_s == pytest.approx(0.38)
    assert c.service_s == pytest.approx(0.28)


def test_busy_cache_vs_idle_cache_aware_local_keeps_the_cache():
    c = choose(PolicyName.CACHE_AWARE_LOCAL, busy_cache_vs_idle(0.5))
    # p0: 0.5 + 0.2 = 0.7 s beats recomputing on p1: 1.0 s; no KV moves between prefill nodes
    assert (c.node, c.pull_from, c.cached_blocks, c.reused_tokens) == ("p0", None, 8, 800)
    assert c.ttft_s == pytest.approx(0.5 + 0.2 + 0.1)


def test_very_busy_cache_both_leave_it_but_only_kv_centric_brings_the_prefix():
    v = busy_cache_vs_idle(5.0)
    local = choose(PolicyName.CACHE_AWARE_LOCAL, v)
    assert (local.node, local.reused_tokens, local.ttft_s) == ("p1", 0, pytest.approx(1.0 + 0.1))
    pulled = choose(PolicyName.KV_CENTRIC, v)
    assert (pulled.node, pulled.pull_from, pulled.reused_tokens) == ("p1", "p0", 800)


def test_kv_centric_recomputes_when_pulling_does_not_pay():
    # At 0.5 MB/s a pull of 800 tokens costs 1.6 s > recomputing them (0.8 s): no pull,
    # and kv_centric then decides exactly like cache_aware_local.
    v = busy_cache_vs_idle(0.5)
    c = choose(PolicyName.KV_CENTRIC, v, network=5e5)
    assert (c.node, c.pull_from, c.pulled_blocks) == ("p0", None, 0)
    assert c == choose(PolicyName.CACHE_AWARE_LOCAL, v, network=5e5)


def test_kv_centric_pulls_only_the_missing_part_of_the_longest_prefix():
    # p0 holds 8 blocks (busy 2 s); p1 holds 3 (idle); p2 none (idle longest).
    v = view({"p0": NOW + 2.0, "p1": NOW - 1.0, "p2": NOW - 5.0}, cached={"p0": 8, "p1": 3})
    c = choose(PolicyName.KV_CENTRIC, v)
    # p1: pull 500 tokens (0.05 s) + 0.2 s; p2: pull 800 (0.08 s) + 0.2 s; p0: 2.2 s
    assert (c.node, c.cached_blocks, c.pull_from, c.pulled_blocks) == ("p1", 3, "p0", 5)
    assert c.ttft_s == pytest.approx(0.05 + 0.2 + 0.1)


def test_least_loaded_ignores_caches_and_ties_go_to_the_node_idle_longest():
    v = view({"p0": NOW + 0.1, "p1": NOW - 1.0, "p2": NOW - 2.0}, cached={"p0": 10, "p1": 5})
    c = choose(PolicyName.LEAST_LOADED, v)
    assert (c.node, c.cached_blocks) == ("p2", 0)  # p1 and p2 both idle; p2 idle longer
    assert c.ttft_s == pytest.approx(1.0 + 0.1)


def test_least_loaded_still_reuses_what_the_chosen_node_caches():
    v = view({"p0": NOW + 3.0, "p1": NOW - 1.0}, cached={"p1": 4})
    c = choose(PolicyName.LEAST_LOADED, v)
    assert (c.node, c.cached_blocks, c.reused_tokens) == ("p1", 4, 400)


def test_longest_prefix_ignores_queues():
    v = view({"p0": NOW + 50.0, "p1": NOW - 1.0, "p2": NOW}, cached={"p0": 9, "p1": 2})
    c = choose(PolicyName.LONGEST_PREFIX, v)
    assert (c.node, c.cached_blocks, c.queue_s) == ("p0", 9, pytest.approx(50.0))


def test_a_fully_cached_prompt_still_computes_its_last_token():
    v = view({"p0": NOW}, cached={"p0": 10})
    c = choose(PolicyName.CACHE_AWARE_LOCAL, v)
    assert (c.cached_blocks, c.reused_tokens) == (10, 10 * BLOCK - 1)
    assert c.prefill_s == pytest.approx(0.001)


def test_round_robin_cycles_over_healthy_nodes_in_view_order():
    v = view({"p0": 0.0, "p1": 0.0, "p2": 0.0})
    v.prefill[1].healthy = False
    policy = make_policy(PolicyName.ROUND_ROBIN, costs())
    assert [policy.choose_prefill(v, request(), NOW).node for _ in range(5)] == ["p0", "p2", "p0", "p2", "p0"]


def test_random_is_reproducible_per_seed_and_reaches_every_node():
    v = view({f"p{i}": 0.0 for i in range(4)})
    policy_a, policy_b = make_policy(PolicyName.RANDOM, costs(), seed=7), make_policy(PolicyName.RANDOM, costs(), seed=7)
    seq_a = [policy_a.choose_prefill(v, request(), NOW).node for _ in range(60)]
    seq_b = [policy_b.choose_prefill(v, request(), NOW).node for _ in range(60)]
    assert seq_a == seq_b
    assert set(seq_a) == {"p0", "p1", "p2", "p3"}
    other = make_policy(PolicyName.RANDOM, costs(), seed=8)
    assert [other.choose_prefill(v, request(), NOW).node for _ in range(60)] != seq_a


@pytest.mark.parametrize("name", list(PolicyName))
def test_every_policy_returns_none_without_a_healthy_prefill_node(name):
    v = view({"p0": 0.0, "p1": 0.0}, cached={"p0": 3})
    for node in v.prefill:
        node.healthy = False
    assert choose(name, v) is None


@pytest.mark.parametrize("name", list(PolicyName))
def test_no_policy_picks_an_unhealthy_node(name):
    v = view({"p0": NOW - 9.0, "p1": NOW + 1.0}, cached={"p0": 10})
    v.prefill[0].healthy = False  # idle and caching everything, but down
    c = choose(name, v)
    assert c.node == "p1" and c.pull_from is None


def test_registry_names_match_policy_names():
    assert set(POLICIES) == set(PolicyName)
    assert all(cls.name is name for name, cls in POLICIES.items())


# -- decode choice ---------------------------------------------------------------------------

def _decode(node: str, running: int, tokens: int, incoming: int = 0, incoming_tokens: int = 0) -> DecodeNodeView:
    return DecodeNodeView(NodeId(node), 1_000_000, running=running, tokens_in_flight=tokens,
                          reserved_tokens=tokens + running * 100, incoming=incoming, incoming_tokens=incoming_tokens)


def test_decode_choice_counts_requests_still_in_prefill_unless_looking_at_the_node_as_it_is():
    # d0 runs 10 requests; d1 runs 2 but 20 more are on their way to it.
    d0, d1 = _decode("d0", 10, 10_000), _decode("d1", 2, 2_000, incoming=20, incoming_tokens=20_000)
    v = view({"p0": 0.0}, decode=[d0, d1])
    s = SettingsValues(tbt_slo_s=0.1, typical_output_tokens=100)
    policy = make_policy(PolicyName.KV_CENTRIC, costs())
    committed = policy.choose_decode(v, request(), NOW, s, LoadBasis.COMMITTED)
    current = policy.choose_decode(v, request(), NOW, s, LoadBasis.CURRENT)
    assert committed.node == "d0"
    # 11 sequences, 11,000 tokens: 10 + 11 + 11 ms
    assert committed.predicted_tbt_s == pytest.approx(0.032)
    assert current.node == "d1"
    assert current.predicted_tbt_s == pytest.approx(0.010 + 0.003 + 0.003)
    assert (committed.basis, current.basis) == (LoadBasis.COMMITTED, LoadBasis.CURRENT)


def test_projected_decode_choice_drops_residents_that_will_have_finished():
    # d0 is busy now but everything on it started long ago; d1 is idle now but 30 requests
    # will join it just before this request's KV lands at t = 110.
    d0, d1 = _decode("d0", 30, 30_000), _decode("d1", 0, 0, incoming=30, incoming_tokens=30_000)
    for i in range(30):
        d0.residents[f"a{i}"] = DecodeResident(f"a{i}", 1000, ready_at_s=NOW - 60.0, running=True)
        d1.residents[f"b{i}"] = DecodeResident(f"b{i}", 1000, ready_at_s=NOW + 9.0)
    v = view({"p0": 0.0}, decode=[d0, d1])
    s = SettingsValues(tbt_slo_s=0.1, typical_output_tokens=100)
    policy = make_policy(PolicyName.KV_CENTRIC, costs())
    projected = policy.choose_decode(v, request(), NOW + 10.0, s, LoadBasis.PROJECTED)
    assert projected.node == "d0" and projected.projected
    # only this request, grown by half of its 100 typical tokens over its life
    assert projected.predicted_tbt_s == pytest.approx(0.010 + 0.001 + 1e-6 * (1000 + 50))
    assert policy.choose_decode(v, request(), NOW, s, LoadBasis.CURRENT).node == "d1"


# -- cost_aware: TTFT plus what the choice costs the rest of the cluster ---------------------------

def cost_aware(v, req=None, network: float = 1e7, slo: float | None = None, now: float = NOW):
    policy = make_policy(PolicyName.COST_AWARE, costs(network))
    if slo is not None:
        policy.settings = SettingsValues(ttft_slo_s=slo)
    return policy.choose_prefill(v, req or request(), now)


def test_cost_aware_on_a_quiet_cluster_decides_as_kv_centric():
    # backlog 0.25 s over a typical service of 0.2 s: weight 1.25 on the 0.08 s the pull adds
    v = busy_cache_vs_idle(0.5)
    c = cost_aware(v)
    assert (c.node, c.pull_from, c.pulled_blocks) == ("p1", "p0", 8)
    assert c == choose(PolicyName.KV_CENTRIC, v)


def test_cost_aware_keeps_a_backlogged_clusters_request_where_its_prefix_is():
    # p0 caches 800 of 1,000 tokens behind a 3 s queue; p1 has 2 s of queue and nothing cached;
    # pulling at 0.5 MB/s costs more than recomputing. kv_centric: p1 (2 + 1.0 s < 3 + 0.2 s).
    # cost_aware: a backlog of 3.25 s per node is 16 typical services: the 0.8 s recomputed on p1
    # delays everyone queued behind it (p1: 2 + 1.0 + 16 x 0.8 = 15.8 s against 3.2 s)
    v = view({"p0": NOW + 3.0, "p1": NOW + 2.0, "p2": NOW + 4.0, "p3": NOW + 4.0}, cached={"p0": 8})
    assert choose(PolicyName.KV_CENTRIC, v, network=5e5).node == "p1"
    c = cost_aware(v, network=5e5)
    assert (c.node, c.cached_blocks, c.queue_s) == ("p0", 8, pytest.approx(3.0))


def test_cost_aware_finds_a_sessions_previous_turn_where_it_is_queued():
    """The previous turn (8 blocks) is queued on p1, not computed yet: no KV event has told
    the index; p1 will have cached it by the time this turn starts there."""
    from conductor.prefix_index import PendingPrefixes

    v = view({"p0": NOW - 1.0, "p1": NOW + 1.0})
    v.pending = PendingPrefixes()
    v.pending.add(NodeId("p1"), request(blocks=8).block_hashes)
    assert choose(PolicyName.KV_CENTRIC, v).node == "p0"  # recomputes 1,000 tokens on the idle node
    c = cost_aware(v)
    assert (c.node, c.cached_blocks, c.reused_tokens, c.pull_from) == ("p1", 8, 800, None)


def test_cost_aware_sends_a_request_late_everywhere_to_a_queue_already_late():
    # TTFT SLO 2 s; 1,000 uncached tokens take 1.0 s + 0.1 s to send: no node makes it in time.
    # p1's queue (3 s) is already past the SLO: those behind it miss theirs anyway; p0 (1.5 s)
    # can still take requests that fit, so this one goes to p1.
    v = view({"p0": NOW + 1.5, "p1": NOW + 3.0})
    assert choose(PolicyName.KV_CENTRIC, v).node == "p0"
    assert cost_aware(v, slo=2.0).node == "p1"
    assert cost_aware(v, slo=10.0).node == "p0"  # it fits on p0: the lowest score wins


def test_cost_aware_routes_a_request_too_big_for_the_slo_normally_on_a_quiet_cluster():
    # 3,000 tokens take 3.0 s even on an idle node (SLO 2 s): it is late by its size, not by
    # the queues, and the backlog (0.83 s per node) is small: it goes to an idle node
    v = view({"p0": NOW - 1.0, "p1": NOW + 2.5, "p2": NOW - 2.0})
    c = cost_aware(v, req=request(blocks=30), slo=2.0)
    assert (c.node, c.queue_s) == ("p2", 0.0)


def test_large_clusters_search_their_load_index_and_choose_as_a_full_scan():
    """Above SCAN_LIMIT nodes a ClusterState's view is searched through its LoadIndex (the
    prefix holders plus the least busy node); every policy chooses as if it scanned them all."""
    import random
    from dataclasses import replace as dc_replace

    from conductor.cluster_state import ClusterState
    from conductor.decision import Decision, DecodeChoice, PrefillChoice
    from conductor.modes import AdmissionMode
    from sched_fixtures import chain

    rng = random.Random(5)
    state = ClusterState(BLOCK)
    for i in range(200):
        state.add_prefill(NodeId(f"p{i}"))
    state.add_decode(NodeId("d0"), 1_000_000)
    for k in range(400):  # queued work of random size on random nodes
        node = NodeId(f"p{rng.randrange(200)}")
        pc = PrefillChoice(node, 0, None, 0, 0, 0.0, 0.0, 0.0, rng.uniform(0.1, 3.0), 0.1)
        dc = DecodeChoice(NodeId("d0"), 0.02, 0.01, 0.0, LoadBasis.COMMITTED)
        state.dispatched(request(rid=f"q{k}", start=10_000 + 50 * k), Decision(f"q{k}", PolicyName.KV_CENTRIC,
                         AdmissionMode.NONE, 0.0, pc, dc), rng.uniform(0.0, 5.0))
    for k in range(30):  # prefixes of 12 chains cached on a few nodes each
        state.index.store(NodeId(f"p{rng.randrange(200)}"), chain(rng.randint(1, 12), start=1 + 100 * (k % 12)))
    scan = dc_replace(state.view, loads=None)
    for name in (PolicyName.KV_CENTRIC, PolicyName.CACHE_AWARE_LOCAL, PolicyName.LONGEST_PREFIX,
                 PolicyName.LEAST_LOADED, PolicyName.COST_AWARE):
        fast, full = make_policy(name, costs()), make_policy(name, costs())
        for j in range(60):
            req = request(blocks=12, rid=f"r{j}", start=1 + 100 * (j % 12))
            assert fast.choose_prefill(state.view, req, 4.0) == full.choose_prefill(scan, req, 4.0), (name, j)


def test_large_clusters_choose_as_a_full_scan_when_a_prefix_is_cached_everywhere():
    """A prefix every prefill node holds (a shared system prompt) makes the holders the whole
    cluster: the LoadIndex path groups them by depth in one pass. With nested depths, idle
    nodes tied on busy time, unhealthy holders (the deepest ones among them) and a node just
    back up, every policy still chooses as a full scan does."""
    import random
    from dataclasses import replace as dc_replace

    from conductor.cluster_state import ClusterState
    from conductor.decision import Decision, DecodeChoice, PrefillChoice
    from conductor.modes import AdmissionMode
    from sched_fixtures import chain

    rng = random.Random(11)
    state = ClusterState(BLOCK)
    nodes = [NodeId(f"p{i}") for i in range(150)]
    for n in nodes:
        state.add_prefill(n)
    state.add_decode(NodeId("d0"), 1_000_000)
    for n in nodes:  # everyone: 4 blocks; a third: 8; a few: 12 (a second chain on some)
        state.index.store(n, chain(rng.choice((4, 4, 4, 8, 12)), start=1))
        if rng.random() < 0.2:
            state.index.store(n, chain(6, start=501))
    for k in range(60):  # queued work on some nodes; the rest stay idle, tied at 0
        node = rng.choice(nodes[:100])
        pc = PrefillChoice(node, 0, None, 0, 0, 0.0, 0.0, 0.0, rng.choice((0.5, 1.0, 2.0)), 0.1)
        dc = DecodeChoice(NodeId("d0"), 0.02, 0.01, 0.0, LoadBasis.COMMITTED)
        state.dispatched(request(rid=f"q{k}", start=10_000 + 50 * k), Decision(f"q{k}", PolicyName.KV_CENTRIC,
                         AdmissionMode.NONE, 0.0, pc, dc), 3.0)
    deep = [n for n in nodes if state.view.index.longest_prefix(chain(12))[n] == 12]
    for n in deep[: len(deep) // 2] + rng.sample(nodes, 20):
        state.node_down(n)
    state.node_up(nodes[7])
    scan = dc_replace(state.view, loads=None)
    for name in (PolicyName.KV_CENTRIC, PolicyName.CACHE_AWARE_LOCAL, PolicyName.LONGEST_PREFIX,
                 PolicyName.LEAST_LOADED, PolicyName.COST_AWARE):
        fast, full = make_policy(name, costs()), make_policy(name, costs())
        for j, req in enumerate([request(blocks=12, rid="a"), request(blocks=16, rid="b"),
                                 request(blocks=6, rid="c", start=501), request(blocks=3, rid="d"),
                                 request(blocks=9, rid="e", start=9000)]):
            for now in (2.0, 3.5, 6.0):
                assert fast.choose_prefill(state.view, req, now) == full.choose_prefill(scan, req, now), (name, j, now)
