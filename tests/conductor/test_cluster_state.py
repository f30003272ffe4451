"""The cluster-state object: every transition of a request and every node event, with the
view fields each one leaves (costs in sched_fixtures: prefill 1 ms per uncached token,
network 0.1 ms per token)."""
from __future__ import annotations

from dataclasses import asdict

import pytest
from sched_fixtures import BLOCK, chain, costs, request

from conductor import lifecycle
from conductor.cluster_state import TRANSITIONS, ClusterState, LifecycleError
from conductor.decision import Decision, DecodeChoice, LoadBasis, PrefillChoice
from conductor.lifecycle import Phase
from conductor.modes import AdmissionMode, PolicyName
from conductor.predictions import DecodeSteps
from conductor.policies import make_policy
from conductor.request import NodeId
from conductor.settings import SettingsValues
from engine.block_pool import STORED, KVEvent

P, D = NodeId("p0"), NodeId("d0")


def state(prefill=("p0",), decode=("d0",), kv: int = 100_000, lag: float = 0.0) -> ClusterState:
    s = ClusterState(BLOCK, heartbeat_lag_s=lag)
    for p in prefill:
        s.add_prefill(NodeId(p))
    for d in decode:
        s.add_decode(NodeId(d), kv)
    return s


def decision(rid: str, service_s: float, *, node: str = "p0", dec: str = "d0", reused: int = 0,
             send_s: float = 0.1) -> Decision:
    pc = PrefillChoice(NodeId(node), reused // BLOCK, None, 0, reused, 0.0, 0.0, 0.0, service_s, send_s)
    dc = DecodeChoice(NodeId(dec), 0.02, 0.01, 0.0, LoadBasis.COMMITTED)
    return Decision(rid, PolicyName.KV_CENTRIC, AdmissionMode.NONE, 0.0, pc, dc)


def place(s: ClusterState, rid: str, tokens: int, service_s: float, now: float, **kw):
    info = request(tokens=tokens, blocks=tokens // BLOCK, rid=rid)
    return s.dispatched(info, decision(rid, service_s, **kw), now)


def decode_fields(s: ClusterState, node: NodeId = D) -> dict:
    v = asdict(s.decode_view(node))
    del v["residents"], v["node_id"], v["kv_capacity_tokens"], v["healthy"]
    return v


def test_the_transition_table_is_the_live_lifecycles():
    assert {p: set(n) for p, n in TRANSITIONS.items()} == {p: set(n) for p, n in lifecycle._NEXT.items()}


def test_one_request_walks_every_phase_and_leaves_nothing_behind():
    s = state()
    t = place(s, "r1", 1000, 1.0, now=10.0)
    pv = s.prefill_view(P)
    assert t.phase is Phase.PLACED
    assert (pv.busy_until_s, pv.queued_requests) == (11.0, 1)
    assert decode_fields(s) == dict(running=0, tokens_in_flight=0, reserved_tokens=0, waiting=0, waiting_tokens=0,
                                    incoming=1, incoming_tokens=1000, pending_kv_tokens=1000,
                                    expected_output_tokens=0, unsized_residents=1, joined_prompt_tokens=0)
    assert s.decode_view(D).residents["r1"].ready_at_s == pytest.approx(11.1)  # predicted TTFT: 1.0 + 0.1
    s.reserved("r1", 1300)  # the decode node set aside prompt + answer
    assert t.phase is Phase.RESERVED and s.decode_view(D).pending_kv_tokens == 1300
    s.prefill_started("r1", 10.0)
    assert t.phase is Phase.PREFILLING
    s.prefill_done("r1", 10.8)  # faster than predicted: the node is free at once
    assert (pv.busy_until_s, pv.queued_requests) == (10.8, 0)
    assert decode_fields(s) == dict(running=0, tokens_in_flight=0, reserved_tokens=0, waiting=1, waiting_tokens=1000,
                                    incoming=0, incoming_tokens=0, pending_kv_tokens=1300,
                                    expected_output_tokens=0, unsized_residents=1, joined_prompt_tokens=0)
    s.decode_joined("r1", 10.9)
    assert t.phase is Phase.DECODING
    assert decode_fields(s) == dict(running=1, tokens_in_flight=1001, reserved_tokens=1300, waiting=0, waiting_tokens=0,
                                    incoming=0, incoming_tokens=0, pending_kv_tokens=0,
                                    expected_output_tokens=0, unsized_residents=1, joined_prompt_tokens=1000)
    res = s.decode_view(D).residents["r1"]
    assert res.running and res.ready_at_s == 10.9
    done = s.finished("r1", 20.0, generated_tokens=299)
    assert done.phase is Phase.FINISHED and len(s) == 0
    assert decode_fields(s) == dict(running=0, tokens_in_flight=0, reserved_tokens=0, waiting=0, waiting_tokens=0,
                                    incoming=0, incoming_tokens=0, pending_kv_tokens=0,
                                    expected_output_tokens=0, unsized_residents=0, joined_prompt_tokens=0)
    assert s.decode_view(D).residents == {}


def test_expected_outputs_are_summed_over_the_residents_until_they_finish():
    s = state()
    s.dispatched(request(tokens=1000, blocks=1000 // BLOCK, rid="a", output=300), decision("a", 1.0), 0.0)
    s.dispatched(request(tokens=500, blocks=500 // BLOCK, rid="b", output=40), decision("b", 0.5), 0.0)
    s.dispatched(request(tokens=200, blocks=200 // BLOCK, rid="c"), decision("c", 0.2), 0.0)  # size unknown
    dv = s.decode_view(D)
    assert (dv.expected_output_tokens, dv.unsized_residents, dv.joined_prompt_tokens) == (340, 1, 0)
    for rid in ("a", "b"):
        s.reserved(rid, 100)
        s.prefill_started(rid, 0.1)
        s.prefill_done(rid, 1.0)
        s.decode_joined(rid, 1.1)
    assert (dv.expected_output_tokens, dv.unsized_residents, dv.joined_prompt_tokens) == (340, 1, 1500)
    s.finished("b", 2.0, generated_tokens=39)
    assert (dv.expected_output_tokens, dv.unsized_residents, dv.joined_prompt_tokens) == (300, 1, 1000)
    s.finished("c", 2.0)  # still incoming
    s.finished("a", 3.0, generated_tokens=299)
    assert (dv.expected_output_tokens, dv.unsized_residents, dv.joined_prompt_tokens) == (0, 0, 0)


def test_a_decode_heartbeat_answers_the_steps_run_since_the_last_one():
    s = state()
    beat = dict(running=2, waiting=0, tokens_in_flight=2000, used_tokens=2000)
    assert s.heartbeat_decode(D, **beat, now_s=1.0, steps=DecodeSteps(10, 0.5, 20, 20_000)) is None  # where it starts
    assert s.heartbeat_decode(D, **beat, now_s=2.0, steps=DecodeSteps(30, 1.5, 60, 61_000)) == DecodeSteps(
        20, 1.0, 40, 41_000)
    assert s.heartbeat_decode(D, **beat, now_s=3.0, steps=DecodeSteps(30, 1.5, 60, 61_000)) is None  # none ran
    assert s.heartbeat_decode(D, **beat, now_s=4.0, steps=DecodeSteps(5, 0.2, 5, 5_000)) is None  # it restarted
    assert s.heartbeat_decode(D, **beat, now_s=5.0, steps=DecodeSteps(7, 0.5, 9, 9_000)) == DecodeSteps(2, 0.3, 4, 4_000)
    assert s.heartbeat_decode(D, **beat, now_s=6.0) is None  # a node that reports no totals


def _walk(s: ClusterState, rid: str, upto: str) -> None:
    steps = [("reserved", lambda: s.reserved(rid, 1200)), ("prefilling", lambda: s.prefill_started(rid, 1.0)),
             ("prefill_done", lambda: s.prefill_done(rid, 2.0)), ("decoding", lambda: s.decode_joined(rid, 2.1))]
    for name, step in steps:
        if name == upto:
            return
        step()


@pytest.mark.parametrize("upto", ["reserved", "prefilling", "prefill_done", "decoding", "end"])
def test_finished_from_any_phase_is_the_one_cleanup_path(upto):
    s = state()
    place(s, "keep", 500, 0.5, now=0.0)  # stays: its counts must survive the other's cleanup
    before_prefill = (s.prefill_view(P).queued_requests, s.prefill_view(P).busy_until_s)
    before = decode_fields(s)
    place(s, "gone", 1000, 1.0, now=0.0)
    _walk(s, "gone", upto)
    s.finished("gone", 3.0, generated_tokens=5)
    assert decode_fields(s) == before
    assert s.prefill_view(P).queued_requests == before_prefill[0]
    assert s.requests_on(D) == ["keep"] and s.request("gone") is None


@pytest.mark.parametrize(("steps", "event", "message"), [
    ([], "prefill_started", "r1: placed -> prefilling is not a transition"),
    ([], "prefill_done", "r1: prefill_done in phase placed"),
    (["reserved"], "decode_joined", "r1: decode_joined before its prefill is done"),
    (["reserved", "prefill_started", "prefill_done"], "prefill_done", "(prefill already done)"),
    (["reserved", "prefill_started", "prefill_done", "decode_joined"], "reserved", "decoding -> reserved"),
    (["reserved", "prefill_started", "prefill_done", "decode_joined", "finished"], "finished", "r1 is not placed"),
])
def test_an_event_out_of_order_is_refused_with_the_phases_named(steps, event, message):
    s = state()
    place(s, "r1", 1000, 1.0, now=0.0)
    calls = {"reserved": lambda: s.reserved("r1", 1000), "prefill_started": lambda: s.prefill_started("r1", 1.0),
             "prefill_done": lambda: s.prefill_done("r1", 2.0), "decode_joined": lambda: s.decode_joined("r1", 2.0),
             "finished": lambda: s.finished("r1", 3.0)}
    for step in steps:
        calls[step]()
    with pytest.raises(LifecycleError, match=message.replace("(", r"\(").replace(")", r"\)")):
        calls[event]()


def test_a_placement_on_an_unknown_node_or_twice_is_refused():
    s = state()
    with pytest.raises(LifecycleError, match="prefill node p9 is not in the view"):
        place(s, "r1", 1000, 1.0, now=0.0, node="p9")
    place(s, "r1", 1000, 1.0, now=0.0)
    with pytest.raises(LifecycleError, match="request r1 is already placed"):
        place(s, "r1", 1000, 1.0, now=0.0)
    assert s.prefill_view(P).queued_requests == 1


def test_a_prefill_that_ends_resets_the_queue_to_what_is_left_fifo():
    s = state()
    for i, service in enumerate((2.0, 3.0, 4.0)):
        place(s, f"r{i}", 1000, service, now=0.0)
        s.reserved(f"r{i}", 1000)
        s.prefill_started(f"r{i}", 0.0)
    assert s.prefill_view(P).busy_until_s == 9.0
    s.prefill_done("r0", 2.5)  # late by 0.5 s: the rest starts now
    assert s.prefill_view(P).busy_until_s == 2.5 + 7.0
    s.finished("r2", 3.0)  # cancelled while queued: its predicted time leaves the queue
    assert s.prefill_view(P).busy_until_s == 2.5 + 3.0
    assert s.prefill_view(P).queued_requests == 1


def test_a_prefill_heartbeat_corrects_the_queue_to_the_tokens_the_node_reports():
    s = state()
    place(s, "a", 1000, 1.0, now=0.0)  # 1 ms per token: 1,000 tokens, 1.0 s
    place(s, "b", 2000, 2.0, now=0.0)
    pv = s.prefill_view(P)
    # exactly as predicted at t = 0.5: half of a left, all of b: nothing moves
    s.heartbeat_prefill(P, 500 + 2000, 0.5)
    assert pv.busy_until_s == pytest.approx(3.0)
    # the node is slower than predicted: at t = 1.0 it still has 400 tokens of a
    s.heartbeat_prefill(P, 400 + 2000, 1.0)
    assert pv.busy_until_s == pytest.approx(1.0 + 0.4 + 2.0)
    # and a request dispatched just now is not in the report yet: it keeps its prediction
    s.heartbeat_lag_s = 0.2
    place(s, "c", 1000, 1.0, now=1.1)
    s.heartbeat_prefill(P, 300 + 2000, 1.2)
    assert pv.busy_until_s == pytest.approx(1.2 + 0.3 + 2.0 + 1.0)


def test_a_prefill_heartbeat_keeps_an_idle_nodes_idle_time_and_prices_unknown_work():
    s = state()
    place(s, "a", 1000, 1.0, now=0.0)
    s.reserved("a", 1000)
    s.prefill_started("a", 0.0)
    s.prefill_done("a", 1.0)
    s.heartbeat_prefill(P, 0, 5.0)
    assert s.prefill_view(P).busy_until_s == 1.0  # ties go to the node idle longest
    s.heartbeat_prefill(P, 3000, 6.0, fallback_s_per_token=0.001)  # work it got before a restart
    assert s.prefill_view(P).busy_until_s == pytest.approx(9.0)


def test_a_decode_heartbeat_never_counts_a_reservation_twice():
    """Before: the registry set reserved_tokens from the node's free blocks, which already
    include the reservations of requests still in prefill, and the committed load added them
    again as incoming."""
    s = state(kv=10_000)
    place(s, "run", 2000, 1.0, now=0.0)
    _walk(s, "run", "end")  # joined; the node reports it has grown to 2,500 tokens
    place(s, "inc", 3000, 1.0, now=3.0)
    s.reserved("inc", 3000)
    s.heartbeat_decode(D, running=1, waiting=0, tokens_in_flight=2500, used_tokens=2500 + 3000, now_s=3.5)
    v = s.decode_view(D)
    assert (v.reserved_tokens, v.pending_kv_tokens, v.tokens_in_flight) == (2500, 3000, 2500)
    out = 100
    settings = SettingsValues(tbt_slo_s=0.1, typical_output_tokens=out)
    choice = make_policy(PolicyName.KV_CENTRIC, costs()).choose_decode(
        s.view, request(tokens=1000, blocks=10, rid="new"), 4.0, settings, LoadBasis.COMMITTED)
    # used 5,500 + this request 1,100 + the incoming request's answer 100: each token once
    assert choice.kv_use == pytest.approx((5500 + 1100 + out) / 10_000)


def test_waiting_counts_kv_landing_and_the_nodes_own_queue():
    s = state()
    for rid, tokens in (("a", 1000), ("b", 3000), ("c", 500)):
        place(s, rid, tokens, 1.0, now=0.0)
        s.reserved(rid, tokens)
        s.prefill_started(rid, 0.0)
    s.prefill_done("a", 1.0)
    s.decode_joined("a", 1.1)
    s.prefill_done("b", 2.0)
    s.decode_joined("b", 2.1)
    s.prefill_done("c", 3.0)  # KV landing
    v = s.decode_view(D)
    assert (v.running, v.waiting, v.waiting_tokens) == (2, 1, 500)
    # the node has one of the joined two in its own queue (no batch slot yet)
    s.heartbeat_decode(D, running=1, waiting=1, tokens_in_flight=1001, used_tokens=4500, now_s=3.1)
    assert (v.running, v.waiting, v.waiting_tokens) == (1, 2, 500 + 2000)  # 2,000: the mean joined prompt
    assert v.reserved_tokens + v.pending_kv_tokens == 4500  # KV: every token once


def test_an_index_behind_the_nodes_kv_events_for_two_heartbeats_asks_for_a_resync():
    s = state()
    s.kv_event(KVEvent(STORED, chain(2), seq=0, node=P))
    assert s.heartbeat_prefill(P, 0, 1.0, kv_event_seq=0) is False  # caught up
    assert s.heartbeat_prefill(P, 0, 2.0, kv_event_seq=2) is False  # behind: events may be in flight
    assert s.heartbeat_prefill(P, 0, 3.0, kv_event_seq=2) is True  # still behind, nothing arrived
    assert s.index.stale_nodes() == {P}


def test_node_events_take_nodes_out_of_choice_and_removal_ends_their_requests():
    s = state(prefill=("p0", "p1"), decode=("d0", "d1"))
    place(s, "r1", 1000, 1.0, now=0.0, node="p1", dec="d1")
    s.kv_event(KVEvent(STORED, chain(3), seq=0, node=NodeId("p1")))
    s.node_down(NodeId("p1"))
    assert [p.healthy for p in s.view.prefill] == [True, False]
    s.node_up(NodeId("p1"))
    assert s.view.prefill[1].healthy
    assert s.remove_node(NodeId("d1")) == ["r1"]  # the adapter retries or fails it
    assert s.prefill_view(NodeId("p1")).queued_requests == 0 and len(s) == 0
    assert [d.node_id for d in s.view.decode] == ["d0"]
    s.remove_node(NodeId("p1"))
    assert s.index.blocks_on(NodeId("p1")) == 0
    with pytest.raises(LifecycleError, match="node p1 is not in the view"):
        s.node_down(NodeId("p1"))


def test_a_queued_prefills_blocks_are_pending_on_its_node_until_it_is_done():
    s = state(prefill=("p0", "p1"))
    place(s, "a", 500, 0.5, now=0.0, node="p1")  # chain(5) from block 1
    place(s, "b", 300, 0.3, now=0.0, node="p1")  # chain(3): shares blocks 1-3 with a
    assert s.pending.longest_prefix(chain(5)) == {NodeId("p1"): 5}
    assert s.pending.blocks_on(NodeId("p1")) == 5
    for rid in ("a", "b"):
        s.reserved(rid, 100)
        s.prefill_started(rid, 0.0)
    s.prefill_done("a", 0.5)  # b still holds blocks 1-3
    assert s.pending.longest_prefix(chain(5)) == {NodeId("p1"): 3}
    s.finished("b", 0.6)  # cancelled in the queue: its blocks are no longer on their way
    assert s.pending.longest_prefix(chain(5)) == {} and s.pending.blocks_on(NodeId("p1")) == 0
    place(s, "c", 500, 0.5, now=1.0, node="p1")
    s.remove_node(NodeId("p1"))
    assert s.pending.longest_prefix(chain(5)) == {}


def test_the_load_index_backlog_is_the_mean_queue_of_the_healthy_prefill_nodes():
    import random

    rng = random.Random(3)
    s = state(prefill=tuple(f"p{i}" for i in range(80)))
    now = 0.0
    for k in range(600):
        now += rng.uniform(0.0, 0.05)
        node = f"p{rng.randrange(80)}"
        place(s, f"r{k}", 500, rng.uniform(0.05, 1.0), now=now, node=node)
        if k % 7 == 0:
            s.node_down(NodeId(f"p{rng.randrange(80)}"))
        if k % 11 == 0:
            s.node_up(NodeId(f"p{rng.randrange(80)}"))
        healthy = [p for p in s.view.prefill if p.healthy]
        want = sum(max(0.0, p.busy_until_s - now) for p in healthy) / len(healthy)
        assert s.loads.backlog_s(now) == pytest.approx(want, abs=1e-9)
    assert s.loads.backlog_s(now - 1.0) == pytest.approx(
        sum(max(0.0, p.busy_until_s - now + 1.0) for p in s.view.prefill if p.healthy)
        / sum(p.healthy for p in s.view.prefill))
