"""The KV block audit and duplicate request ids on the nodes, in-process on the tiny model.

A leaked block (allocated with no request, reservation or pin recorded for it) is reclaimed
by the audit and counted; what is legitimately held (running requests, reservations, pins,
prefix-cached free blocks, a reservation whose answer has not reached the conductor yet) is
never touched. A second Reserve or Decode for an id a node already holds is refused with
ALREADY_EXISTS and leaks nothing.
"""
from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from prometheus_client import CollectorRegistry

from conductor.metrics import NodeMetrics
from decode_node.service import DecodeService
from engine.audit import audit_periodically
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling import SamplingParams
from engine.worker import EngineWorker
from proto.halfmoon.v1 import common_pb2, node_pb2

BLOCKS = 64


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class Context:
    async def abort(self, code, details):
        raise Aborted(code, details)


@pytest.fixture
def engine(tiny_model_dir):
    return LLMEngine(tiny_model_dir, EngineConfig(num_blocks=BLOCKS))


@pytest.fixture
def service(tiny_model_dir):
    registry = CollectorRegistry()
    worker = EngineWorker(LLMEngine(tiny_model_dir, EngineConfig(num_blocks=BLOCKS)), name="audit-test")
    svc = DecodeService(worker, "decode-a", 0, b"", metrics=NodeMetrics(registry, "decode-a", "decode"))
    svc.registry = registry
    try:
        yield svc
    finally:
        worker.stop()


def on_engine(service: DecodeService, fn):
    return service.worker.call(fn).result(timeout=30)


def test_audit_reclaims_exactly_the_leaked_references(engine):
    prefix = list(range(5, 5 + 48))  # three full blocks
    engine.generate([prefix], SamplingParams(max_tokens=2, ignore_eos=True))
    cached = engine.pool.num_cached
    assert cached >= 3 and engine.pool.num_used == 0
    engine.add_request("running", SamplingParams(max_tokens=50, ignore_eos=True),
                       prompt_token_ids=list(range(300, 340)))
    engine.step()
    running = list(engine.get_request("running").block_ids)
    reserved = engine.reserve(40)
    engine.held.hold(("reservation", "r"), reserved)
    pinned = engine.pin_prefix(prefix)
    engine.held.hold(("pin", "p"), pinned)
    assert len(pinned) == 3
    leaked = engine.reserve(30)  # a reservation nobody recorded: 2 blocks
    engine.pool.touch(running[:1])  # one extra reference on a block a request holds
    used = engine.pool.num_used

    report = engine.audit()
    assert report.reclaimed == {leaked[0]: 1, leaked[1]: 1, running[0]: 1} and report.short == {}
    assert report.num_reclaimed == 3
    assert engine.pool.num_used == used - 2  # running[0] is still held by its request
    assert [engine.pool.ref_count(b) for b in reserved + pinned + running] == [1] * len(reserved + pinned + running)
    assert engine.pool.num_cached >= cached  # the prefix cache is untouched
    assert engine.audit().reclaimed == {}  # nothing left to reclaim

    while engine.has_unfinished():  # the running request still finishes normally
        engine.step()
    engine.unreserve(engine.held.take(("reservation", "r")))
    engine.unpin(engine.held.take(("pin", "p")))
    assert engine.pool.num_used == 0 and engine.audit().reclaimed == {}


def test_a_reservation_granted_between_engine_call_and_lease_is_never_reclaimed(service):
    """The audit runs on the engine thread right after each Reserve's allocation, before
    the event loop has recorded its lease: the ledger entry written in that same engine
    call keeps the blocks owned."""
    async def run():
        reports = []
        for i in range(12):
            task = asyncio.ensure_future(service.Reserve(
                node_pb2.ReserveRequest(request_id=f"r{i}", num_tokens=40, lease_s=30), Context()))
            await asyncio.sleep(0)  # Reserve has queued its engine call
            reports.append(asyncio.wrap_future(service.worker.call(lambda e: e.audit())))
            await task
        return [await r for r in reports]

    reports = asyncio.run(run())
    assert all(r.reclaimed == {} and r.short == {} for r in reports)
    assert service.num_reserved_blocks == 12 * 3
    assert on_engine(service, lambda e: e.pool.num_used) == 12 * 3


def test_periodic_audit_reclaims_a_leaked_block_counts_and_logs_it(service, caplog):
    async def run():
        await service.Reserve(node_pb2.ReserveRequest(request_id="kept", num_tokens=40, lease_s=30), Context())
        leaked = await service.worker.run(lambda e: e.reserve(40))  # reserve without a lease record
        metrics = service.metrics
        task = asyncio.ensure_future(audit_periodically(
            service.worker, 0.05, "decode-a", lambda r: metrics.observe_blocks_reclaimed(r.num_reclaimed)))
        try:
            for _ in range(200):
                await asyncio.sleep(0.05)
                if service.registry.get_sample_value("halfmoon:kv_blocks_reclaimed_total",
                                                      {"node": "decode-a", "role": "decode"}):
                    break
            await asyncio.sleep(0.2)  # more audits: nothing more to reclaim
        finally:
            task.cancel()
        return leaked

    with caplog.at_level(logging.WARNING, logger="engine.audit"):
        leaked = asyncio.run(run())
    assert service.registry.get_sample_value("halfmoon:kv_blocks_reclaimed_total",
                                             {"node": "decode-a", "role": "decode"}) == 3
    assert on_engine(service, lambda e: [e.pool.ref_count(b) for b in leaked]) == [0, 0, 0]
    assert on_engine(service, lambda e: e.pool.num_used) == 3  # the kept reservation
    assert service.num_reserved_blocks == 3
    assert f"block audit reclaimed 3 leaked blocks (no live request, reservation or pin held them): " \
           f"{sorted(leaked)}" in caplog.text


def test_concurrent_reserves_with_one_id_hold_one_reservation(service):
    async def run():
        calls = [service.Reserve(node_pb2.ReserveRequest(request_id="dup", num_tokens=40, lease_s=30), Context())
                 for _ in range(2)]
        return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(run())
    ok = [r for r in results if isinstance(r, node_pb2.ReserveResponse)]
    refused = [r for r in results if isinstance(r, Aborted)]
    assert len(ok) == 1 and len(refused) == 1, results
    assert refused[0].code == grpc.StatusCode.ALREADY_EXISTS
    assert refused[0].details == "request_id: 'dup' already holds a reservation or runs on decode-a"
    assert on_engine(service, lambda e: e.pool.num_used) == 3
    assert on_engine(service, lambda e: e.audit().reclaimed) == {}


def test_a_second_decode_with_a_running_id_is_refused_and_the_first_streams_on(service):
    prompt = list(range(3, 43))
    sampling = common_pb2.SamplingParams(max_tokens=40, ignore_eos=True)

    async def run():
        await service.Reserve(node_pb2.ReserveRequest(request_id="x", num_tokens=40, lease_s=30), Context())
        first = service.Decode(node_pb2.DecodeRequest(request_id="x", prompt_token_ids=prompt, first_token=7,
                                                      sampling=sampling), Context())
        outs = [await first.__anext__()]
        with pytest.raises(Aborted) as dup:
            async for _ in service.Decode(node_pb2.DecodeRequest(request_id="x", prompt_token_ids=prompt,
                                                                 recompute=True, sampling=sampling), Context()):
                pass
        with pytest.raises(Aborted) as dup_reserve:
            await service.Reserve(node_pb2.ReserveRequest(request_id="x", num_tokens=40, lease_s=30), Context())

        async def rest():
            return [o async for o in first]

        outs += await asyncio.wait_for(rest(), timeout=60)
        return outs, dup.value, dup_reserve.value

    outs, dup, dup_reserve = asyncio.run(run())
    assert dup.code == grpc.StatusCode.ALREADY_EXISTS and dup.details == "request_id: 'x' already runs on decode-a"
    assert dup_reserve.code == grpc.StatusCode.ALREADY_EXISTS
    assert outs[-1].finished and outs[-1].completion_tokens == 40
    assert sum(len(o.delta.token_ids) for o in outs) == 40
    assert on_engine(service, lambda e: e.pool.num_used) == 0


# --- through the conductor: the client's request_id is only an attribute ------------------
def test_concurrent_requests_sharing_a_client_id_all_succeed_and_leak_nothing(tiny_model_dir, in_process_cluster):
    import threading
    import time

    from cluster.client import Client, make_request

    prompts = [list(range(200 + 37 * i, 240 + 37 * i)) for i in range(6)]  # 40 tokens: 3 decode blocks each
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    local = LLMEngine(tiny_model_dir, EngineConfig(num_blocks=BLOCKS))
    want = [local.generate([p], params)[0] for p in prompts]
    cluster = in_process_cluster(1, 2, settings={"ttft_slo_s": 600.0, "tbt_slo_s": 60.0, "admission": "none"},
                                 model=str(tiny_model_dir), max_model_len=1024)
    results: dict[int, object] = {}
    go = threading.Barrier(len(prompts))
    with Client(cluster.address) as c:
        def one(i: int) -> None:
            go.wait()
            try:
                results[i] = c.generate(make_request(token_ids=prompts[i], params=params, request_id="same"),
                                        timeout=120)
            except Exception as e:  # recorded, asserted below
                results[i] = e

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(150)
        for i in range(len(prompts)):
            r = results[i]
            assert not isinstance(r, Exception), f"request {i}: {r!r}"
            assert r.token_ids == want[i] and r.final.request_id == "same"
        deadline = time.monotonic() + 30
        while True:
            used = {n.node_id: n.kv_blocks_used for n in c.status().nodes}
            if all(v == 0 for v in used.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.3)
    assert len(used) == 3 and all(v == 0 for v in used.values()), used
