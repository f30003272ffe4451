"""The decode node's reservation lease: Renew restarts it, expiry frees every block.

Runs `DecodeService` in-process on the tiny model (no network, no gRPC server)."""
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
