"""The decode node's service in-process on the tiny model (no network, no gRPC server):
the reservation lease (Renew restarts it, expiry frees every block) and the KV bytes a
Decode that received its prompt's KV counts."""
from __future__ import annotations

import asyncio

import pytest

from decode_node.service import DecodeService
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.worker import EngineWorker
from proto.halfmoon.v1 import node_pb2

LEASE_S = 0.3


@pytest.fixture
def service(tiny_model_dir):
    worker = EngineWorker(LLMEngine(tiny_model_dir, EngineConfig(num_blocks=64)), name="decode-test")
    try:
        yield DecodeService(worker, "decode-t", 0, b"")
    finally:
        worker.stop()


def free_blocks(service: DecodeService) -> int:
    return service.worker.call(lambda e: e.pool.num_free).result(timeout=10)


def test_renew_keeps_a_reservation_and_expiry_frees_it(service):
    async def run():
        free0 = free_blocks(service)
        resv = await service.Reserve(node_pb2.ReserveRequest(request_id="a", num_tokens=40, lease_s=LEASE_S), None)
        assert len(resv.target.block_ids) == 3  # 40 prompt tokens + the first decode token, 16 per block
        for _ in range(4):  # 4 x 2/3 of a lease: expired long ago without renewals
            await asyncio.sleep(LEASE_S * 2 / 3)
            renewed = await service.Renew(node_pb2.RenewRequest(request_id="a", lease_s=LEASE_S), None)
            assert renewed.found
        assert service.num_reserved_blocks == 3 and free_blocks(service) == free0 - 3
        await asyncio.sleep(LEASE_S * 2)  # no more renewals: the lease runs out
        assert service.num_reserved_blocks == 0 and service.expired_leases == 1
        await asyncio.sleep(0.05)
        assert free_blocks(service) == free0
        gone = await service.Renew(node_pb2.RenewRequest(request_id="a", lease_s=LEASE_S), None)
        assert not gone.found

    asyncio.run(run())


class _Context:
    async def abort(self, code, details):
        raise AssertionError(f"aborted: {code} {details}")


def test_decode_counts_the_kv_bytes_that_arrived_and_frees_every_block(tiny_model_dir):
    from prometheus_client import CollectorRegistry

    from conductor.metrics import NodeMetrics
    from proto.halfmoon.v1 import common_pb2

    registry = CollectorRegistry()
    worker = EngineWorker(LLMEngine(tiny_model_dir, EngineConfig(num_blocks=64)), name="decode-metrics")
    service = DecodeService(worker, "decode-m", 0, b"", metrics=NodeMetrics(registry, "decode-m", "decode"))

    async def run():
        free0 = free_blocks(service)
        await service.Reserve(node_pb2.ReserveRequest(request_id="b", num_tokens=40, lease_s=30), None)
        request = node_pb2.DecodeRequest(request_id="b", prompt_token_ids=list(range(3, 43)), first_token=7,
                                         sampling=common_pb2.SamplingParams(max_tokens=5, ignore_eos=True),
                                         kv_bytes=3 * 4096, kv_transfer_s=0.002)
        outs = [o async for o in service.Decode(request, _Context())]
        assert outs[-1].finished and outs[-1].completion_tokens == 5
        await asyncio.sleep(0.05)
        assert free_blocks(service) == free0
        recompute = node_pb2.DecodeRequest(request_id="c", prompt_token_ids=list(range(3, 43)), recompute=True,
                                           sampling=common_pb2.SamplingParams(max_tokens=2, ignore_eos=True),
                                           kv_bytes=999)
        assert [o async for o in service.Decode(recompute, _Context())][-1].finished

    try:
        asyncio.run(run())
    finally:
        worker.stop()
    labels = {"node": "decode-m", "role": "decode"}
    assert registry.get_sample_value("halfmoon:kv_transfer_bytes_total", labels) == 3 * 4096  # not the recompute's
    assert registry.get_sample_value("halfmoon:kv_transfer_seconds_count", labels) == 1
