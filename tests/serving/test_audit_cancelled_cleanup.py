"""A node call whose client goes away (the conductor killed: gRPC cancels the handler) while
its cleanup waits for the engine thread still frees its blocks (issue #11, kill-conductor).

`EngineWorker.run` drops a queued function when its awaiter is cancelled, so a cleanup awaited
through it (a finished prefill's `release`, `Unpin`'s unpin, `Release`'s free) never ran when
the cancellation came while the engine was mid-step: the blocks stayed accounted for (a held
finished request, a pin or reservation in the ledger), so the block audit could not reclaim
them either. Each test holds the engine thread busy at that moment, cancels the call, and
checks that every block is free and the audit finds nothing to reclaim. (A finished prefill
no longer awaits its release at all: it queues it and answers at once.)
"""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from decode_node.service import DecodeService
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling import SamplingParams
from engine.worker import EngineWorker
from prefill_node.service import PrefillService
from proto.convert import sampling_to_proto
from proto.halfmoon.v1 import node_pb2

BLOCKS = 64
BLOCK_SIZE = 16


class Context:
    async def abort(self, code, details):
        raise AssertionError(f"unexpected abort {code.name}: {details}")


class Handle:
    """A transfer write acknowledged when the test says so."""

    def __init__(self, acked: asyncio.Event) -> None:
        self.acked = acked

    def __await__(self):
        return self.acked.wait().__await__()

    def cancel(self) -> None:
        pass


class Transfer:
    def __init__(self, acked: asyncio.Event) -> None:
        self.acked = acked
        self.writes = 0

    def write(self, peer, entries, timeout=None):
        self.writes += 1
        return Handle(self.acked)


@pytest.fixture
def worker(tiny_model_dir):
    w = EngineWorker(LLMEngine(tiny_model_dir, EngineConfig(num_blocks=BLOCKS, block_size=BLOCK_SIZE)),
                     name="cancel-cleanup-test")
    try:
        yield w
    finally:
        w.stop()


def on_engine(worker: EngineWorker, fn):
    return worker.call(fn).result(timeout=30)


def used_blocks(worker: EngineWorker) -> int:
    return on_engine(worker, lambda e: e.pool.num_used)


async def wait_for(cond, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def busy_engine(worker: EngineWorker) -> threading.Event:
    """Keep the engine thread inside one call (as in a long step) until the event is set."""
    gate, inside = threading.Event(), threading.Event()
    worker.call(lambda e: (inside.set(), gate.wait(30)))
    assert inside.wait(30)
    return gate


def assert_nothing_held(worker: EngineWorker) -> None:
    assert used_blocks(worker) == 0
    assert on_engine(worker, lambda e: (len(e.held), e.audit().num_reclaimed)) == (0, 0)


def test_a_finished_prefill_answers_without_waiting_for_the_engine_and_its_release_still_runs(worker):
    """The answer carries the first token: it must not wait behind the engine's step in
    progress (it did, for the release, which cost TTFT a whole step of another prompt), and
    the release it queued frees the blocks even if the call is cancelled right after."""
    async def main() -> None:
        acked = asyncio.Event()
        transfer = Transfer(acked)
        svc = PrefillService(worker, transfer, 0)
        svc._peers[b"decode-peer"] = object()  # the decode node, already connected
        prompt = list(range(100, 100 + 9 * BLOCK_SIZE - 3))  # 9 blocks
        req = node_pb2.PrefillRequest(
            request_id="r1", prompt_token_ids=prompt,
            sampling=sampling_to_proto(SamplingParams(max_tokens=8, temperature=0.0)),
            target=node_pb2.KVTarget(node_id="decode-1", transfer_descriptor=b"decode-peer", region_id=7,
                                     block_ids=list(range(9)), block_bytes=svc.block_bytes))
        call = asyncio.ensure_future(svc.Prefill(req, Context()))
        await wait_for(lambda: "r1" in svc._jobs and svc._jobs["r1"].first_token is not None)
        assert used_blocks(worker) == 9  # the finished request holds its KV until the writes land
        gate = busy_engine(worker)  # the engine thread is inside a long step
        try:
            acked.set()  # every write lands: the call answers at once, the release is queued
            resp = await asyncio.wait_for(call, 10)
            assert svc._jobs == {}
            assert worker.engine.pool.num_used == 9  # still held: the engine has not got to the release (it is parked)
        finally:
            gate.set()
        assert transfer.writes >= 1 and resp.kv_bytes == 9 * svc.block_bytes
        await wait_for(lambda: used_blocks(worker) == 0, timeout_s=10)
        assert on_engine(worker, lambda e: e.get_request("r1")) is None
        assert_nothing_held(worker)

    asyncio.run(main())


def test_unpin_cancelled_while_it_waits_for_the_engine_still_unpins(worker):
    async def main() -> None:
        svc = PrefillService(worker, Transfer(asyncio.Event()), 0)
        prefix = list(range(200, 200 + 3 * BLOCK_SIZE))
        on_engine(worker, lambda e: e.generate([prefix], SamplingParams(max_tokens=1, ignore_eos=True)))
        pin = await svc.Pin(node_pb2.PinRequest(pin_id="p1", token_ids=prefix, lease_s=60.0), Context())
        assert len(pin.block_ids) == 3 and used_blocks(worker) == 3
        gate = busy_engine(worker)
        try:
            call = asyncio.ensure_future(svc.Unpin(node_pb2.UnpinRequest(pin_id="p1"), Context()))
            await asyncio.sleep(0.05)  # the lease is taken; the unpin waits for the engine
            assert "p1" not in svc._pins
            call.cancel()  # the pulling node's call died (or ran past its deadline)
            with pytest.raises(asyncio.CancelledError):
                await call
        finally:
            gate.set()
        await wait_for(lambda: used_blocks(worker) == 0, timeout_s=10)
        assert_nothing_held(worker)

    asyncio.run(main())


def test_release_cancelled_while_it_waits_for_the_engine_still_frees_the_reservation(worker):
    async def main() -> None:
        svc = DecodeService(worker, "decode-1", 0, b"")
        got = await svc.Reserve(node_pb2.ReserveRequest(request_id="r2", num_tokens=7 * BLOCK_SIZE - 1,
                                                        lease_s=60.0), Context())
        assert len(got.target.block_ids) == 7 and used_blocks(worker) == 7
        gate = busy_engine(worker)
        try:
            call = asyncio.ensure_future(svc.Release(node_pb2.ReleaseRequest(request_id="r2"), Context()))
            await asyncio.sleep(0.05)  # the lease is taken; the free waits for the engine
            assert svc.num_reserved_blocks == 0
            call.cancel()  # the conductor's connection dies now
            with pytest.raises(asyncio.CancelledError):
                await call
        finally:
            gate.set()
        # re-registration frees only leased reservations: this one must already be gone
        assert svc.expire_reservations() == 0
        await wait_for(lambda: used_blocks(worker) == 0, timeout_s=10)
        assert_nothing_held(worker)

    asyncio.run(main())
