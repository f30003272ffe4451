"""The prefill node's service, in-process on the tiny model with a fake transport whose
writes land at once. `Prefill` takes the conductor's chain of the prompt's block hashes
(`PrefillRequest.block_hashes`): the engine checks it (two block hashes) and reuses it instead
of hashing the prompt again; a chain that fails the check is dropped (the engine hashes the
prompt, the answer is the same); a request without one (an older conductor) is hashed here.
`KVEvents` streams the block pool's events with each stored block's parent
(`KVEvent.parent_hash`)."""
from __future__ import annotations

import asyncio

import pytest

import engine.block_pool as block_pool
from engine.block_pool import block_hashes
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling import SamplingParams
from engine.worker import EngineWorker
from prefill_node.service import PrefillService
from proto.convert import sampling_to_proto
from proto.halfmoon.v1 import node_pb2

BS = 16
PROMPT = list(range(100, 100 + 6 * BS + 5))  # 6 full blocks and 5 tokens


class Context:
    async def abort(self, code, details):
        raise AssertionError(f"unexpected abort {code.name}: {details}")


class Landed:
    """A transfer write already acknowledged."""

    def __await__(self):
        return iter(())

    def cancel(self) -> None:
        pass


class Transfer:
    def __init__(self) -> None:
        self.blocks_written = 0

    def write(self, peer, entries, timeout=None):
        self.blocks_written += sum(e[4] for e in entries)
        return Landed()


class CountingXxhash:
    def __init__(self, real) -> None:
        self.real, self.calls = real, 0

    def xxh64(self, *args, **kwargs):
        self.calls += 1
        return self.real.xxh64(*args, **kwargs)


@pytest.fixture
def counter(monkeypatch):
    c = CountingXxhash(block_pool.xxhash)
    monkeypatch.setattr(block_pool, "xxhash", c)
    return c


@pytest.fixture
def node(tiny_model_dir):
    worker = EngineWorker(LLMEngine(tiny_model_dir, EngineConfig(num_blocks=64, block_size=BS)), name="prefill-test")
    transfer = Transfer()
    svc = PrefillService(worker, transfer, 0)
    svc._peers[b"decode-peer"] = object()  # the decode node, already connected
    try:
        yield svc
    finally:
        worker.stop()


def prefill(svc: PrefillService, rid: str, hashes=()) -> node_pb2.PrefillResponse:
    req = node_pb2.PrefillRequest(
        request_id=rid, prompt_token_ids=PROMPT, block_hashes=hashes,
        sampling=sampling_to_proto(SamplingParams(max_tokens=8, temperature=0.0)),
        target=node_pb2.KVTarget(node_id="decode-1", transfer_descriptor=b"decode-peer", region_id=7,
                                 block_ids=list(range(7)), block_bytes=svc.block_bytes))
    return asyncio.run(svc.Prefill(req, Context()))


def on_engine(svc: PrefillService, fn):
    return svc.worker.call(fn).result(timeout=30)


def test_prefill_with_the_conductors_chain_hashes_only_to_check_it(node, counter):
    chain = block_hashes(PROMPT, BS)
    counter.calls = 0
    given = prefill(node, "given", chain)
    assert counter.calls == 2  # the first and the last block: the other 4 are the conductor's
    assert on_engine(node, lambda e: (e.refused_hashes, set(chain) <= set(e.pool.cached_hashes()))) == (0, True)
    assert node.transfer.blocks_written == 7 * node.block_bytes
    on_engine(node, lambda e: e.pool.reset_prefix_cache())
    counter.calls = 0
    plain = prefill(node, "plain")  # no chain sent: the node hashes the prompt
    assert counter.calls == 6
    assert (plain.first_token, plain.num_cached_tokens) == (given.first_token, 0)


def test_prefill_with_a_wrong_chain_drops_it_and_caches_under_the_right_keys(node, counter):
    want = prefill(node, "plain").first_token
    on_engine(node, lambda e: e.pool.reset_prefix_cache())
    wrong = block_hashes(PROMPT[:5 * BS] + [3] * BS, BS)  # another last block
    counter.calls = 0
    got = prefill(node, "wrong", wrong)
    assert got.first_token == want and counter.calls == 2 + 6
    cached = on_engine(node, lambda e: (e.refused_hashes, set(e.pool.cached_hashes())))
    assert cached == (1, set(block_hashes(PROMPT, BS)))


def test_the_kv_event_stream_carries_each_stored_blocks_parent(node):
    chain = block_hashes(PROMPT, BS)

    async def main() -> list[node_pb2.KVEvent]:
        stream = node.KVEvents(node_pb2.KVEventsRequest(subscriber="test"), Context())
        got = [await asyncio.wait_for(stream.__anext__(), 10) for _ in range(2)]  # the (empty) snapshot
        req = node_pb2.PrefillRequest(
            request_id="r", prompt_token_ids=PROMPT, block_hashes=chain,
            sampling=sampling_to_proto(SamplingParams(max_tokens=8, temperature=0.0)),
            target=node_pb2.KVTarget(node_id="decode-1", transfer_descriptor=b"decode-peer", region_id=7,
                                     block_ids=list(range(7)), block_bytes=node.block_bytes))
        await node.Prefill(req, Context())
        got += [await asyncio.wait_for(stream.__anext__(), 10) for _ in range(len(chain))]
        await stream.aclose()
        return got

    msgs = asyncio.run(main())
    assert [(m.kind, m.seq) for m in msgs[:2]] == [(node_pb2.KV_EVENT_CLEARED, 0), (node_pb2.KV_EVENT_STORED, 0)]
    live = msgs[2:]
    assert [(m.kind, m.seq, tuple(m.block_hashes), m.tier) for m in live] == [
        (node_pb2.KV_EVENT_STORED, i + 1, (h,), "") for i, h in enumerate(chain)]
    assert not live[0].HasField("parent_hash")  # the prompt's first block
    assert [m.parent_hash for m in live[1:]] == chain[:-1]


class HolderStub:
    """The holder's `Pin` / `Unpin`, called in-process instead of over gRPC."""

    def __init__(self, svc: PrefillService) -> None:
        self.svc = svc

    async def Pin(self, req, timeout=None):
        return await self.svc.Pin(req, Context())

    async def Unpin(self, req, timeout=None):
        return await self.svc.Unpin(req, Context())


class PullTransfer(Transfer):
    def read(self, peer, entries, timeout=None):
        return Landed()


def test_a_pull_checks_and_reuses_the_chain_on_the_puller_and_on_the_holder(tiny_model_dir, node, counter):
    chain = block_hashes(PROMPT, BS)
    worker = EngineWorker(LLMEngine(tiny_model_dir, EngineConfig(num_blocks=64, block_size=BS)), name="puller")
    puller = PrefillService(worker, PullTransfer(), 0)
    puller._peers[b"decode-peer"] = puller._peers[b"holder-peer"] = object()
    puller._holder = lambda address: HolderStub(node)

    def request(rid: str, hashes) -> node_pb2.PrefillRequest:
        return node_pb2.PrefillRequest(
            request_id=rid, prompt_token_ids=PROMPT, block_hashes=hashes,
            sampling=sampling_to_proto(SamplingParams(max_tokens=8, temperature=0.0)),
            target=node_pb2.KVTarget(node_id="decode-1", transfer_descriptor=b"decode-peer", region_id=7,
                                     block_ids=list(range(7)), block_bytes=puller.block_bytes),
            pull=node_pb2.PrefixSource(node_id="holder", address="in-process", transfer_descriptor=b"holder-peer",
                                       num_blocks=len(chain)))

    async def main() -> list[tuple[int, int, str, int]]:
        await node.Prefill(request("h", chain), Context())  # the holder caches the prompt's 6 blocks
        out = []
        for rid, hashes in (("plain", ()), ("given", chain)):
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: on_engine(puller, lambda e: e.pool.reset_prefix_cache()))
            counter.calls = 0
            resp = await puller.Prefill(request(rid, hashes), Context())
            out.append((counter.calls, resp.pulled_tokens, resp.pull_error, resp.num_cached_tokens))
        await asyncio.sleep(0.1)  # the unpins
        return out

    try:
        plain, given = asyncio.run(main())
    finally:
        worker.stop()
    # without a chain: the puller's lookup, the holder's pin, the import and the admission each
    # hash the 6 blocks; with it, each checks it (two hashes)
    assert plain == (4 * 6, 6 * BS, "", 6 * BS)
    assert given == (4 * 2, 6 * BS, "", 6 * BS)
