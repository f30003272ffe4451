"""Engine behaviour on a tiny random-weight model: fast, exact."""
from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.errors import InvalidRequestError
from engine.request import FinishReason
from engine.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [3, 17, 40, 64, 5, 33, 90, 16, 1, 48][:n]
    return [torch.randint(10, 40000, (L,), generator=g).tolist() for L in lengths]


def make(tiny_model_dir, **kw) -> LLMEngine:
    return LLMEngine(tiny_model_dir, EngineConfig(**{"num_blocks": 256, **kw}))


def test_batch_equals_each_alone(tiny_model_dir):
    ps = prompts(8)
    eng = make(tiny_model_dir)
    alone = [eng.generate([p], GREEDY)[0] for p in ps]
    eng2 = make(tiny_model_dir)
    assert eng2.generate(ps, GREEDY) == alone
    assert all(len(o) == 12 for o in alone)


def test_chunked_prefill_changes_nothing(tiny_model_dir):
    ps = prompts(8)
    whole = make(tiny_model_dir, max_num_batched_tokens=512).generate(ps, GREEDY)
    chunked = make(tiny_model_dir, max_num_batched_tokens=7).generate(ps, GREEDY)
    assert chunked == whole


def test_prefix_cache_hit_is_counted_and_changes_nothing(tiny_model_dir):
    eng = make(tiny_model_dir)
    base = prompts(1, seed=3)[0][:1] + list(range(100, 147))  # 48 tokens = 3 full blocks
    first = eng.generate([base + [7, 8, 9]], GREEDY)[0]
    assert eng.stats().prefix_hits_tokens == 0
    again = eng.generate([base + [7, 8, 9]], GREEDY)[0]
    assert again == first
    assert eng.stats().prefix_hits_tokens == 48  # three full blocks reused
    other = eng.generate([base + [1, 2]], GREEDY)[0]
    fresh = make(tiny_model_dir).generate([base + [1, 2]], GREEDY)[0]
    assert other == fresh
    assert eng.stats().prefix_hits_tokens == 96


def test_whole_prompt_cached_still_computes_last_token(tiny_model_dir):
    eng = make(tiny_model_dir)
    p = list(range(200, 232))  # exactly two blocks
    a = eng.generate([p], GREEDY)[0]
    b = eng.generate([p], GREEDY)[0]
    assert a == b and eng.stats().prefix_hits_tokens == 16  # the last block is recomputed


def test_all_blocks_return_after_finish_and_abort(tiny_model_dir):
    eng = make(tiny_model_dir, num_blocks=64)
    ps = prompts(6)
    for i, p in enumerate(ps):
        eng.add_request(f"r{i}", SamplingParams(max_tokens=50, ignore_eos=True), prompt_token_ids=p)
    for _ in range(3):
        eng.step()
    assert eng.stats().num_blocks_free < 64
    assert eng.abort("r1") and eng.abort("r4")
    assert not eng.abort("nope")
    while eng.has_unfinished():
        eng.step()
    st = eng.stats()
    assert st.num_blocks_free == 64 and st.num_running == 0 and st.num_waiting == 0


def test_preemption_under_block_pressure_gives_same_tokens(tiny_model_dir):
    ps = prompts(4)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    roomy = make(tiny_model_dir).generate(ps, params)
    tight_eng = make(tiny_model_dir, num_blocks=14)
    tight = tight_eng.generate(ps, params)
    assert tight == roomy
    assert tight_eng.stats().num_preemptions > 0
    assert tight_eng.stats().num_blocks_free == 14


@pytest.mark.parametrize(
    "params, field",
    [
        (SamplingParams(max_tokens=0), "max_tokens"),
        (SamplingParams(max_tokens=-3), "max_tokens"),
        (SamplingParams(temperature=-0.1), "temperature"),
        (SamplingParams(top_p=0.0), "top_p"),
        (SamplingParams(top_p=1.5), "top_p"),
        (SamplingParams(top_k=-1), "top_k"),
    ],
)
def test_bad_sampling_params_name_the_field(tiny_model_dir, params, field):
    eng = make(tiny_model_dir)
    with pytest.raises(InvalidRequestError) as e:
        eng.add_request("bad", params, prompt="hello")
    assert e.value.field == field
    assert eng.stats().num_waiting == 0


def test_bad_prompts_name_the_field_and_others_carry_on(tiny_model_dir):
    eng = make(tiny_model_dir, max_model_len=64)
    eng.add_request("good", GREEDY, prompt_token_ids=[5, 6, 7])
    with pytest.raises(InvalidRequestError) as e:
        eng.add_request("empty", GREEDY, prompt="")
    assert e.value.field == "prompt"
    with pytest.raises(InvalidRequestError) as e:
        eng.add_request("long", GREEDY, prompt_token_ids=list(range(10, 80)))
    assert e.value.field == "prompt" and "context window" in str(e.value)
    with pytest.raises(InvalidRequestError) as e:
        eng.add_request("oov", GREEDY, prompt_token_ids=[10, 10**9])
    assert e.value.field == "prompt_token_ids"
    with pytest.raises(InvalidRequestError) as e:
        eng.add_request("good", GREEDY, prompt="dup")
    assert e.value.field == "request_id"
    out = []
    while eng.has_unfinished():
        out += eng.step()
    assert [o.request_id for o in out] == ["good"] * 12 and out[-1].finish_reason is FinishReason.LENGTH
    assert eng.stats().num_blocks_free == 256


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(tiny_model_dir):
    eng = make(tiny_model_dir)
    p = prompts(1)[0]
    s1 = SamplingParams(max_tokens=16, temperature=1.5, seed=1234, ignore_eos=True)
    a = eng.generate([p], s1)[0]
    b = eng.generate([p, prompts(2)[1]], [s1, SamplingParams(max_tokens=5, temperature=1.0, seed=9)])[0]
    assert a == b  # same seed, same tokens, whatever else is in the batch
    c = eng.generate([p], SamplingParams(max_tokens=16, temperature=1.5, seed=99, ignore_eos=True))[0]
    assert c != a
    k1 = eng.generate([p], SamplingParams(max_tokens=12, temperature=0.8, top_k=1, seed=5, ignore_eos=True))[0]
    assert k1 == eng.generate([p], GREEDY)[0]
    tiny_p = eng.generate([p], SamplingParams(max_tokens=12, temperature=0.8, top_p=1e-6, seed=5, ignore_eos=True))[0]
    assert tiny_p == k1


def test_stop_token_ids_and_max_tokens(tiny_model_dir):
    eng = make(tiny_model_dir)
    p = prompts(1)[0]
    ref = eng.generate([p], GREEDY)[0]
    stop_at = ref[4]
    eng.add_request("s", SamplingParams(max_tokens=12, stop_token_ids=(stop_at,), ignore_eos=True), prompt_token_ids=p)
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    got = [o.new_token_ids[0] for o in outs]
    assert got == ref[: ref.index(stop_at) + 1]
    assert outs[-1].finish_reason is FinishReason.STOP


def test_imported_prefix_blocks_are_reused_and_change_nothing(tiny_model_dir):
    """What a KV-centric pull does, without the network: pin a prefix on one engine, copy
    its blocks' bytes into another engine's blocks, import them there."""
    a, b = make(tiny_model_dir), make(tiny_model_dir)
    prompt = list(range(300, 300 + 70))  # 4 full blocks + 6 tokens
    want = a.generate([prompt], GREEDY)[0]
    pinned = a.pin_prefix(prompt[:64])
    assert len(pinned) == 4 and all(a.pool.ref_count(x) == 1 for x in pinned)
    local = b.allocate_blocks(4)
    for src, dst in zip(pinned, local):
        b.kv.tensor[dst].copy_(a.kv.tensor[src])
    a.unpin(pinned)
    b.import_prefix(prompt, 0, local)
    assert b.cached_prefix_blocks(prompt) == 4 and b.stats().num_blocks_free == 256
    assert b.generate([prompt], GREEDY)[0] == want
    assert b.stats().prefix_hits_tokens == 64
    assert a.stats().num_blocks_free == 256


def test_decode_only_steps_are_counted_with_their_rows_and_context(tiny_model_dir):
    eng = make(tiny_model_dir)
    a, b = [5] * 10, [6] * 20
    eng.add_request("a", SamplingParams(max_tokens=4, ignore_eos=True), prompt_token_ids=a)
    eng.add_request("b", SamplingParams(max_tokens=3, ignore_eos=True), prompt_token_ids=b)
    eng.step()  # both prompts (a prefill step: not counted), each samples its first token
    st = eng.stats()
    assert (st.decode_steps, st.decode_step_rows, st.decode_step_tokens, st.decode_step_s) == (0, 0, 0, 0.0)
    while eng.has_unfinished():
        eng.step()
    st = eng.stats()
    # decode steps: both at contexts 11 + 21, both at 12 + 22, then a alone at 13
    assert (st.decode_steps, st.decode_step_rows, st.decode_step_tokens) == (3, 5, 11 + 21 + 12 + 22 + 13)
    assert st.decode_step_s > 0.0
