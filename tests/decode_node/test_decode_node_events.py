"""A decode node publishes the blocks its write-back put to the cluster store (`KVEvents`:
tier-"cluster" events after an empty snapshot, numbered without gaps), and nothing else it
caches; the conductor follows the stream into its index of the store, so a finished turn's
prompt and answer are placed in the store before any prefill node loads them.
In-process on the tiny model with the fake store (no network)."""
from __future__ import annotations

import asyncio

from conductor.prefix_index import STORE_NODE
from conductor.registry import NodeRecord, NodeRegistry
from conductor.request import NodeId
from decode_node.service import DecodeService
from engine.block_pool import block_hashes
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.tiers import FakeStore, TierConfig, TierManager
from engine.tiers.record import record_bytes
from engine.worker import EngineWorker
from proto.halfmoon.v1 import common_pb2, node_pb2

BS = 16
PROMPT = list(range(3, 3 + 5 * BS + 3))  # 5 full blocks and 3 tokens
SAMPLING = common_pb2.SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)  # 83 + 19 tokens: 6 blocks


class Context:
    async def abort(self, code, details):
        raise AssertionError(f"aborted: {code} {details}")


def test_the_write_back_reaches_the_conductors_index_of_the_store(tiny_model_dir, tmp_path):
    eng = LLMEngine(tiny_model_dir, EngineConfig(num_blocks=64, block_size=BS))
    store = FakeStore()
    rb = record_bytes(eng.kv.block_bytes, BS)
    tiers = TierManager.attach(eng, TierConfig(host_gib=32 * rb / 2**30, disk_dir=str(tmp_path), store=True,
                                               write_back_on_finish=True, copy_down=False),
                               store=lambda: store)
    worker = EngineWorker(eng, name="decode-events-test")
    service = DecodeService(worker, "decode-0", 0, b"")

    async def scenario() -> list[node_pb2.KVEvent]:
        stream = service.KVEvents(node_pb2.KVEventsRequest(subscriber="test"), None)
        got = [await stream.__anext__(), await stream.__anext__()]  # the snapshot
        await service.Reserve(node_pb2.ReserveRequest(request_id="r", num_tokens=len(PROMPT), lease_s=30), None)
        req = node_pb2.DecodeRequest(request_id="r", prompt_token_ids=PROMPT, first_token=7, sampling=SAMPLING)
        outs = [o async for o in service.Decode(req, Context())]  # as if its KV had arrived
        assert outs[-1].finished and outs[-1].completion_tokens == 20
        assert tiers.flush()
        while len(store.keys()) > sum(len(m.block_hashes) for m in got[2:]):
            got.append(await asyncio.wait_for(stream.__anext__(), 10))
        await stream.aclose()
        answer[:] = [t for o in outs for t in o.delta.token_ids]
        return got

    answer: list[int] = []
    try:
        msgs = asyncio.run(scenario())
        chain = [h for m in msgs[2:] for h in m.block_hashes]
        assert [(m.kind, m.tier, len(m.block_hashes)) for m in msgs[:2]] == [
            (node_pb2.KV_EVENT_CLEARED, "", 0), (node_pb2.KV_EVENT_STORED, "", 0)]  # its caches: not published
        assert {(m.kind, m.tier) for m in msgs[2:]} == {(node_pb2.KV_EVENT_STORED, "cluster")}
        assert [m.seq for m in msgs[2:]] == list(range(1, len(msgs) - 1))
        assert chain == block_hashes(PROMPT + answer, BS)[:6] and len(store.keys()) == 6  # prompt + answer

        class Stub:  # the conductor's side: the same messages through the registry
            def KVEvents(self, req):
                async def gen():
                    for m in msgs:
                        yield m
                    rec.up = False
                return gen()

        reg = NodeRegistry(block_size=BS)
        rec = NodeRecord("decode-0", "decode", "x", node_pb2.KVLayout(), "", None, None, Stub())
        asyncio.run(reg._follow_kv_events(rec))
        held = reg.index.tier("cluster")
        assert all(held.holders(h) == frozenset({STORE_NODE}) for h in chain)
        assert reg.index.blocks_on(NodeId("decode-0")) == 0 and not reg.index.stale_nodes()
    finally:
        worker.stop()
        tiers.close()
