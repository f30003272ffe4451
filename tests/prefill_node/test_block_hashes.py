"""A node's engine hashes each KV block of a request once: admission's prefix lookup, the
tiers' prefetch plan and the prefix cache (as blocks are computed) share one memo on the
request (`Request.chain_hashes`), where each used to hash the prompt again."""
from __future__ import annotations

import pytest

import engine.block_pool as block_pool
from engine.block_pool import block_hashes
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling import SamplingParams

BS = 16


class CountingXxhash:
    """Stands in for the `xxhash` module inside `engine.block_pool`: counts block hashes."""

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


def test_every_block_of_a_request_is_hashed_once(tiny_model_dir, counter):
    eng = LLMEngine(tiny_model_dir, EngineConfig(block_size=BS, num_blocks=64))
    prompt = list(range(100, 100 + 5 * BS + 3))  # 5 full blocks and 3 tokens
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    counter.calls = 0
    first = eng.generate([prompt], params)[0]
    # 83 + 20 tokens, the last never computed: 102 computed tokens = 6 full blocks, each hashed once
    assert counter.calls == 6
    counter.calls = 0
    again = eng.generate([prompt], params)[0]  # a new request: its own memo, the prefix cache hit
    assert again == first and counter.calls == 6
    assert eng.stats().prefix_hits_tokens >= 5 * BS


def test_the_memo_is_the_chain_the_pool_uses(tiny_model_dir):
    eng = LLMEngine(tiny_model_dir, EngineConfig(block_size=BS, num_blocks=64))
    prompt = list(range(7, 7 + 4 * BS))
    eng.add_request("r", SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True), prompt_token_ids=prompt)
    req = eng.get_request("r")
    assert req.chain_hashes(BS) == block_hashes(prompt, BS)
    assert req.chain_hashes(BS, 2) == block_hashes(prompt, BS)[:2]
    req.chain_hashes(BS).append(0)  # a copy: the memo is not the caller's to change
    assert req.chain_hashes(BS) == block_hashes(prompt, BS)
