"""A node's engine hashes each KV block of a request once: admission's prefix lookup, the
tiers' prefetch plan and the prefix cache (as blocks are computed) share one memo on the
request (`Request.chain_hashes`), where each used to hash the prompt again. A request that
arrives with the conductor's chain of its prompt (`block_hashes`) starts the memo from it
once a cheap check passes (two block hashes), and parallel samples share their parent's."""
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


# --- the conductor's chain, checked and reused (engine.block_pool.chain_mismatch) ---------------
def run(eng: LLMEngine, rid: str, prompt: list[int], params: SamplingParams, hashes=()) -> list[int]:
    eng.add_request(rid, params, prompt_token_ids=prompt, block_hashes=hashes)
    out: list[int] = []
    while eng.has_unfinished():
        for o in eng.step():
            if o.request_id == rid:
                out.extend(o.new_token_ids)
    return out


def test_a_chain_is_checked_by_its_count_its_first_and_its_last_block():
    prompt = list(range(300, 300 + 4 * BS + 5))
    chain = block_hashes(prompt, BS)
    assert block_pool.chain_mismatch(chain, prompt, BS) is None
    assert block_pool.chain_mismatch([], prompt[:BS - 1], BS) is None  # no full block: nothing to check
    assert "3 hashes for 4 full blocks" in block_pool.chain_mismatch(chain[:3], prompt, BS)
    assert "4 hashes for 2 full blocks" in block_pool.chain_mismatch(chain, prompt, BS * 2)  # another block size
    other = block_hashes([7] + prompt[1:], BS)  # another first block: every hash differs
    assert block_pool.chain_mismatch(other, prompt, BS) == "the first block's hash differs"
    tail = prompt[:3 * BS] + [1] * BS + prompt[4 * BS:]
    assert block_pool.chain_mismatch(block_hashes(tail, BS), prompt, BS) == "the last block's hash differs"
    assert block_pool.chain_mismatch(chain[:2] + [6] + chain[3:], prompt, BS) == "the last block's hash differs"
    # the blocks before the last one's parent are taken on trust (documented): a chain wrong only there passes
    assert block_pool.chain_mismatch(chain[:1] + [5] + chain[2:], prompt, BS) is None


def test_an_engine_given_the_prompts_chain_hashes_only_to_check_it(tiny_model_dir, counter):
    eng = LLMEngine(tiny_model_dir, EngineConfig(block_size=BS, num_blocks=64))
    prompt = list(range(100, 100 + 5 * BS + 3))  # 5 full blocks and 3 tokens
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    want = eng.generate([prompt], params)[0]
    eng.pool.reset_prefix_cache()
    chain = block_hashes(prompt, BS)
    counter.calls = 0
    assert run(eng, "given", prompt, params, chain) == want
    # the check (first and last block) and the one block the answer completed; the prompt's
    # other blocks are not hashed again
    assert counter.calls == 2 + 1 and eng.refused_hashes == 0
    assert set(block_hashes((prompt + want)[:102], BS)) <= set(eng.pool.cached_hashes())  # the same keys


def test_a_chain_that_fails_the_check_is_dropped_and_the_engine_hashes_the_prompt(tiny_model_dir, counter):
    eng = LLMEngine(tiny_model_dir, EngineConfig(block_size=BS, num_blocks=64))
    prompt = list(range(100, 100 + 5 * BS + 3))
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    want = eng.generate([prompt], params)[0]
    eng.pool.reset_prefix_cache()
    wrong = block_hashes(prompt[:4 * BS] + [9] * BS, BS)  # the same first block, another last one
    counter.calls = 0
    assert run(eng, "wrong", prompt, params, wrong) == want
    assert eng.refused_hashes == 1
    assert counter.calls == 2 + 6  # the failed check, then every computed full block hashed here
    assert set(block_hashes(prompt, BS)) <= set(eng.pool.cached_hashes())  # cached under the right keys
    assert not set(wrong[4:]) & set(eng.pool.cached_hashes())


def test_parallel_samples_share_the_prompts_hashes(tiny_model_dir, counter):
    eng = LLMEngine(tiny_model_dir, EngineConfig(block_size=BS, num_blocks=64))
    prompt = list(range(100, 100 + 5 * BS + 3))
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=3, n=2, ignore_eos=True)
    counter.calls = 0
    run(eng, "pair", prompt, params)
    # 5 prompt blocks hashed once for both samples, and each sample's own answer block
    assert counter.calls == 5 + 2
