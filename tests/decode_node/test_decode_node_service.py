"""The decode node's `Decode` takes the conductor's chain of the prompt's block hashes
(`DecodeRequest.block_hashes`): the prompt blocks it caches as the request decodes are not
hashed again (after a two-hash check), for a request whose KV arrived and for one it
recomputes; a chain that fails the check is dropped and the node hashes the prompt itself.
In-process on the tiny model (no network, no gRPC server)."""
from __future__ import annotations

import asyncio

import pytest

import engine.block_pool as block_pool
from decode_node.service import DecodeService
from engine.block_pool import block_hashes
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.worker import EngineWorker
from proto.halfmoon.v1 import common_pb2, node_pb2

BS = 16
PROMPT = list(range(3, 3 + 5 * BS + 3))  # 5 full blocks and 3 tokens
MAX_TOKENS = 20  # 83 + 19 computed tokens: 6 full blocks, the prompt's 5 and one of the answer


class Context:
    async def abort(self, code, details):
        raise AssertionError(f"aborted: {code} {details}")


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
def service(tiny_model_dir):
    worker = EngineWorker(LLMEngine(tiny_model_dir, EngineConfig(num_blocks=64, block_size=BS)), name="decode-test")
    try:
        yield DecodeService(worker, "decode-t", 0, b"")
    finally:
        worker.stop()


def on_engine(service: DecodeService, fn):
    return service.worker.call(fn).result(timeout=30)


def decode(service: DecodeService, rid: str, hashes=(), *, recompute: bool = False) -> list[int]:
    async def run() -> list[int]:
        if not recompute:
            await service.Reserve(node_pb2.ReserveRequest(request_id=rid, num_tokens=len(PROMPT), lease_s=30), None)
        req = node_pb2.DecodeRequest(
            request_id=rid, prompt_token_ids=PROMPT, first_token=7, recompute=recompute, block_hashes=hashes,
            sampling=common_pb2.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
        outs = [o async for o in service.Decode(req, Context())]
        assert outs[-1].finished and outs[-1].completion_tokens == MAX_TOKENS
        return [t for o in outs for t in o.delta.token_ids]

    toks = asyncio.run(run())
    on_engine(service, lambda e: e.pool.reset_prefix_cache())  # the next request computes its own
    return toks


@pytest.mark.parametrize("recompute", [False, True])
def test_decode_reuses_the_conductors_chain_for_the_prompt_blocks_it_caches(service, counter, recompute):
    chain = block_hashes(PROMPT, BS)
    counter.calls = 0
    plain = decode(service, "plain", recompute=recompute)
    assert counter.calls == 6  # no chain sent: every computed full block hashed here
    counter.calls = 0
    given = decode(service, "given", chain, recompute=recompute)
    assert counter.calls == 2 + 1  # the check, and the answer's block; the prompt's are the conductor's
    assert on_engine(service, lambda e: e.refused_hashes) == 0
    if recompute:  # (a reservation's KV is whatever its blocks held: only a recompute answers alike)
        assert given == plain


def test_decode_drops_a_chain_of_another_block_size(service, counter):
    plain = decode(service, "plain", recompute=True)
    wrong = block_hashes(PROMPT, 2 * BS)  # 2 hashes for 5 blocks: refused before any is checked
    counter.calls = 0
    got = decode(service, "wrong", wrong, recompute=True)
    assert got == plain and counter.calls == 6
    assert on_engine(service, lambda e: e.refused_hashes) == 1
