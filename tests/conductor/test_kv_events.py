"""One KV-event record from the block pool to the global prefix index: the pool emits
`engine.block_pool.KVEvent`, the prefill node's event log numbers it and ships its wire form
(`node_pb2.KVEvent`), and the conductor's registry turns that back into the same record and
applies it. Every field must survive the trip: the test fails if one is dropped (each field
is set to something other than its default by at least one event)."""
from __future__ import annotations

import asyncio
from dataclasses import fields, replace
from types import SimpleNamespace

import pytest

from conductor.registry import NodeRecord, NodeRegistry
from engine.block_pool import CLEARED, REMOVED, STORED, BlockPool, KVEvent, block_hashes
from prefill_node.kv_events import KVEventLog
from proto.convert import kv_event_from_proto, kv_event_to_proto
from proto.halfmoon.v1 import node_pb2

BS = 4
NODE = "prefill-0"


def drain(sub) -> list[node_pb2.KVEvent]:
    out = []
    while not sub.queue.empty():
        out.append(sub.queue.get_nowait())
    return out


def pool_events():
    """What a pool (and a tier under it) emits while a 3-block prompt is cached, a tier
    holds two of its blocks, and eviction reuses every device block; with the messages the
    node's event log queued for a subscriber (the snapshot first)."""
    pool = BlockPool(num_blocks=6, block_size=BS)
    log = KVEventLog()
    emitted: list[KVEvent] = []
    pool.add_listener(emitted.append)
    pool.add_listener(log.on_event)
    loop = asyncio.new_event_loop()
    try:
        sub = log.subscribe(SimpleNamespace(pool=pool, tiers=None), loop)
        tokens = list(range(10, 10 + 3 * BS))
        chain = block_hashes(tokens, BS)
        blocks = pool.allocate(3)
        for i, (b, h) in enumerate(zip(blocks, chain)):
            pool.cache_block(b, h, tokens[i * BS:(i + 1) * BS], chain[i - 1] if i else None)
        host = KVEvent(STORED, tuple(chain[1:]), parent_hash=chain[0], tier="host")  # as engine/tiers emits
        emitted.append(host)
        log.on_event(host)
        pool.free(blocks)
        pool.allocate(6)  # every block: the three cached ones are evicted
        loop.run_until_complete(asyncio.sleep(0))
        return chain, emitted, drain(sub)
    finally:
        loop.close()


def test_every_field_of_the_pools_events_survives_the_wire():
    chain, emitted, msgs = pool_events()
    assert [m.kind for m in msgs[:2]] == [node_pb2.KV_EVENT_CLEARED, node_pb2.KV_EVENT_STORED]  # the snapshot
    live = [kv_event_from_proto(m, NODE) for m in msgs[2:]]
    want = [replace(e, seq=i + 1, node=NODE) for i, e in enumerate(emitted)]
    assert live == want
    assert [e.kind for e in live] == [STORED, STORED, STORED, STORED, REMOVED]
    assert live[1].parent_hash == chain[0] and live[0].parent_hash is None
    assert set(live[4].block_hashes) == set(chain) and live[3].tier == "host"
    defaults = KVEvent(STORED)
    for f in fields(KVEvent):  # every field is exercised by some event, so none can go missing unseen
        if f.name != "kind":
            assert any(getattr(e, f.name) != getattr(defaults, f.name) for e in live), f.name


def test_a_cleared_event_and_an_unset_parent_round_trip():
    for ev in (KVEvent(CLEARED, seq=9, node=NODE), KVEvent(REMOVED, (1, 2), seq=3, node=NODE, tier="disk"),
               KVEvent(STORED, (2**64 - 1,), parent_hash=0, seq=1, node=NODE, tier="cluster")):
        assert kv_event_from_proto(kv_event_to_proto(ev), NODE) == ev
    with pytest.raises(ValueError, match="unknown kind"):
        kv_event_from_proto(node_pb2.KVEvent(seq=1, kind=node_pb2.KV_EVENT_UNSPECIFIED), NODE)


def follow(msgs: list[node_pb2.KVEvent]) -> NodeRegistry:
    """A registry that read `msgs` from one prefill node's KV event stream."""
    reg = NodeRegistry(block_size=BS)

    class Stub:
        def KVEvents(self, req):
            async def gen():
                for m in msgs:
                    yield m
                rec.up = False  # one subscription, then stop following
            return gen()

    rec = NodeRecord(NODE, "prefill", "x", node_pb2.KVLayout(), "", None, Stub(), None)
    asyncio.run(reg._follow_kv_events(rec))
    return reg


def test_pool_to_proto_to_index():
    chain, emitted, msgs = pool_events()
    stored = follow(msgs[:5])  # the snapshot and the three device stores
    assert stored.index.longest_prefix(chain) == {NODE: 3} and stored.index.next_seq(NODE) == 4
    assert not stored.index.stale_nodes()
    reg = follow(msgs)  # then the host tier's blocks and the device's eviction
    idx = reg.index
    assert idx.longest_prefix(chain) == {} and idx.blocks_on(NODE) == 0
    assert idx.lower_tier_run(NODE, chain, 1) == {"host": 2}
    assert idx.next_seq(NODE) == len(emitted) + 1 and not idx.stale_nodes()
