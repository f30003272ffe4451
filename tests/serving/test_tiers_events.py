"""KV events carry their tier, from the tier manager through the prefill node's event log and
the conductor's event stream into a global index that knows which tier holds each prefix on
each node and in the cluster store; the cost model prices a load from each tier."""
from __future__ import annotations

import asyncio
import math
from collections import Counter

import pytest

from conductor.cost_model import CostModel, gpu_class_default
from conductor.errors import CostModelError
from conductor.prefix_index import STORE_NODE, ApplyStatus, GlobalPrefixIndex
from conductor.request import NodeId
from engine.block_pool import CLEARED, REMOVED, STORED, KVEvent
from proto.halfmoon.v1 import node_pb2

A, B = NodeId("prefill-0"), NodeId("prefill-1")


def test_tier_events_feed_their_own_index_and_keep_the_sequence():
    idx = GlobalPrefixIndex()
    chain = (1, 2, 3, 4, 5, 6)
    assert idx.apply(KVEvent(STORED, chain[:2], seq=0, node=A)) is ApplyStatus.APPLIED  # device: blocks 1, 2
    assert idx.apply(KVEvent(STORED, chain[2:4], tier="host", seq=1, node=A)) is ApplyStatus.APPLIED
    assert idx.apply(KVEvent(STORED, (5,), tier="disk", seq=2, node=A)) is ApplyStatus.APPLIED
    assert idx.apply(KVEvent(STORED, (6,), tier="cluster", seq=0, node=B)) is ApplyStatus.APPLIED
    assert idx.longest_prefix(chain) == {A: 2}  # the device index is the device's alone
    assert idx.blocks_on(A) == 2 and A not in idx.stale_nodes()  # tier events took their place in the sequence
    assert idx.lower_tier_run(A, chain, 2) == {"host": 2, "disk": 1, "cluster": 1}
    assert idx.lower_tier_run(B, chain, 0) == {}  # B has nothing of block 1
    assert idx.tier("cluster").holders(6) == frozenset({STORE_NODE})  # the store's, not B's
    idx.apply(KVEvent(REMOVED, (3,), tier="host", seq=3, node=A))
    assert idx.lower_tier_run(A, chain, 2) == {}  # the chain breaks at block 3
    idx.remove_node(B)
    assert idx.tier("cluster").holders(6) == frozenset({STORE_NODE})  # store blocks outlive the node
    idx.apply(KVEvent(CLEARED, seq=4, node=A))
    assert idx.blocks_on(A) == 0 and idx.tier("host").blocks_on(A) == 0 and idx.tier("disk").blocks_on(A) == 0
    idx.apply(KVEvent(STORED, (4,), tier="host", seq=5, node=A))
    idx.resync(A, (1,), 7)  # a snapshot replaces the node's tiers too (their parts follow it)
    assert idx.tier("host").blocks_on(A) == 0 and idx.blocks_on(A) == 1


def test_a_prefill_nodes_event_log_tags_tier_events_and_snapshots_every_tier(tiny_model_dir, tmp_path):
    from engine.config import EngineConfig
    from engine.engine import LLMEngine
    from engine.sampling import SamplingParams
    from engine.tiers import TierConfig, TierManager
    from engine.tiers.record import record_bytes
    from prefill_node.kv_events import KVEventLog

    eng = LLMEngine(tiny_model_dir, EngineConfig(num_blocks=16))
    rb = record_bytes(eng.kv.block_bytes, 16)
    tiers = TierManager.attach(eng, TierConfig(host_gib=8 * rb / 2**30, disk_gib=8 * rb / 2**30,
                                               disk_dir=str(tmp_path)))
    log = KVEventLog()
    eng.add_kv_listener(log.on_event)
    tiers.add_listener(log.on_event)
    loop = asyncio.new_event_loop()
    try:
        sub = log.subscribe(eng, loop)
        eng.generate([list(range(100, 164))], SamplingParams(max_tokens=1))  # 4 full blocks computed and cached
        eng.pool.free(eng.pool.allocate(eng.pool.num_free))  # evicted: demoted to host
        tiers.spill_host()  # host -> disk
        assert tiers.flush()
        loop.run_until_complete(asyncio.sleep(0))
        msgs = []
        while not sub.queue.empty():
            msgs.append(sub.queue.get_nowait())
        live = msgs[4:]  # after the (empty) snapshot: cleared, device, host, disk
        assert [m.seq for m in live] == list(range(1, len(live) + 1))  # one numbering for every tier
        by: Counter = Counter()
        for m in live:
            by[m.kind, m.tier] += len(m.block_hashes)
        assert by[(node_pb2.KV_EVENT_STORED, "")] == 4 and by[(node_pb2.KV_EVENT_REMOVED, "")] == 4
        assert by[(node_pb2.KV_EVENT_STORED, "host")] == 4 and by[(node_pb2.KV_EVENT_REMOVED, "host")] == 4
        assert by[(node_pb2.KV_EVENT_STORED, "disk")] == 4
        snap = log.subscribe(eng, loop)
        loop.run_until_complete(asyncio.sleep(0))
        parts = [snap.queue.get_nowait() for _ in range(snap.queue.qsize())]
        assert [(m.kind, m.tier, len(m.block_hashes)) for m in parts] == [
            (node_pb2.KV_EVENT_CLEARED, "", 0), (node_pb2.KV_EVENT_STORED, "", 0),
            (node_pb2.KV_EVENT_STORED, "host", 0), (node_pb2.KV_EVENT_STORED, "disk", 4)]
        assert len({m.seq for m in parts}) == 1
    finally:
        loop.close()
        tiers.close()


def test_the_conductor_reads_a_nodes_tiers_from_its_event_stream():
    from conductor.registry import NodeRecord, NodeRegistry

    reg = NodeRegistry(block_size=16)
    ev = node_pb2.KVEvent
    stream = [ev(seq=4, kind=node_pb2.KV_EVENT_CLEARED), ev(seq=4, kind=node_pb2.KV_EVENT_STORED, block_hashes=[1]),
              ev(seq=4, kind=node_pb2.KV_EVENT_STORED, block_hashes=[2, 3], tier="host"),
              ev(seq=4, kind=node_pb2.KV_EVENT_STORED, block_hashes=[4], tier="disk"),
              ev(seq=5, kind=node_pb2.KV_EVENT_STORED, block_hashes=[5], tier="cluster"),
              ev(seq=6, kind=node_pb2.KV_EVENT_REMOVED, block_hashes=[4], tier="disk")]

    class Stub:
        def KVEvents(self, req):
            async def gen():
                for m in stream:
                    yield m
                rec.up = False  # one subscription, then stop following
            return gen()

    rec = NodeRecord("prefill-0", "prefill", "x", node_pb2.KVLayout(), "", None, Stub(), None)
    asyncio.run(reg._follow_kv_events(rec))
    idx = reg.index
    assert idx.longest_prefix([1, 2]) == {A: 1} and idx.next_seq(A) == 7 and not idx.stale_nodes()
    assert idx.lower_tier_run(A, [1, 2, 3, 4, 5], 1) == {"host": 2}  # block 4 left the disk
    assert idx.lower_tier_run(A, [1, 2, 3, 5], 1) == {"host": 2, "cluster": 1}


def test_cost_model_prices_a_load_from_each_tier():
    gpu = gpu_class_default()
    kv = gpu.transfer.kv_bytes_per_token
    assert gpu.tier_load_s("host", 1000) == pytest.approx(1000 * kv / 128e9)
    assert gpu.tier_load_s("disk", 1000) == pytest.approx(1000 * kv / 7e9 + 1000 * kv / 128e9)
    assert gpu.tier_load_s("cluster", 1000) == pytest.approx(1000 * kv / 100e9 + 1000 * kv / 128e9)
    assert gpu.tier_load_s("host", 1000) < gpu.tier_load_s("cluster", 1000) < gpu.tier_load_s("disk", 1000)
    assert gpu.tier_load_s("disk", 1000) < gpu.prefill_s(1000) - gpu.prefill_s(1000, 1000) + gpu.prefill_s(0)
    again = CostModel.from_json(gpu.to_json())
    assert again.transfer.tier_bytes_per_s == gpu.transfer.tier_bytes_per_s
    from dataclasses import replace

    bare = replace(gpu, transfer=replace(gpu.transfer, tier_bytes_per_s={}))
    assert math.isinf(bare.tier_load_s("disk", 16))  # no figure: the hit is scored as a miss
    with pytest.raises(CostModelError, match="tier_bytes_per_s: 'ssd' must be host, disk or cluster"):
        replace(gpu, transfer=replace(gpu.transfer, tier_bytes_per_s={"ssd": 1e9}))
