"""logprobs against Hugging Face transformers, penalties and logit_bias against a hand
computation over HF's logits, and n > 1 parallel samples (tiny random-weight model)."""
from __future__ import annotations

import json
from dataclasses import replace

import jsonschema
import numpy as np
import pytest
import torch

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.errors import InvalidRequestError
from engine.penalties import LogitAdjustments
from engine.request import sample_id
from engine.sampling import SamplingParams
from engine.structured import Constraint

PROMPT = [1, 504, 3458, 314, 253, 1178, 28, 30, 1173, 42, 5400, 17, 288]  # 13 tokens: a partial block
LONG = PROMPT * 3 + [9, 8, 7]  # 42 tokens: two full blocks and a partial one


@pytest.fixture(scope="module")
def eng(tiny_model_dir) -> LLMEngine:
    return LLMEngine(tiny_model_dir, EngineConfig(num_blocks=256))


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    model.eval()
    return model


def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].to(torch.float32)


def run(eng: LLMEngine, params: SamplingParams, prompt=PROMPT, rid="r") -> dict[str, list]:
    """Every sample's outputs, by engine request id."""
    eng.add_request(rid, params, prompt_token_ids=list(prompt))
    outs: dict[str, list] = {}
    while eng.has_unfinished():
        for o in eng.step():
            outs.setdefault(o.request_id, []).append(o)
    return outs


def tokens(outs: list) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=10, ignore_eos=True, logprobs=5),
    SamplingParams(max_tokens=10, ignore_eos=True, logprobs=20, temperature=1.0, seed=4, presence_penalty=1.5,
                   logit_bias=((100, 5.0),)),
    SamplingParams(max_tokens=30, logprobs=3, temperature=0.7, seed=2,
                   constraint=Constraint("regex", "[a-z]{3,8}( [a-z]{3,8}){1,3}")),
], ids=["greedy", "sampled-penalized", "constrained"])
def test_logprobs_are_the_raw_log_softmax_to_1e4(eng, hf, params):
    outs = run(eng, params)["r"]
    out = tokens(outs)
    lps = [lp for o in outs for lp in o.logprobs]
    assert len(lps) == len(out) and [lp.token_id for lp in lps] == out
    ref = torch.log_softmax(hf_logits(hf, PROMPT + out[:-1]), dim=-1)[len(PROMPT) - 1:]
    for j, lp in enumerate(lps):
        assert abs(lp.logprob - float(ref[j, lp.token_id])) < 1e-4
        assert len(lp.top) == params.logprobs
        values, ids = torch.topk(ref[j], params.logprobs)
        assert [t for t, _ in lp.top] == ids.tolist()
        assert max(abs(v - float(r)) for (_, v), r in zip(lp.top, values)) < 1e-4


def test_logprobs_off_by_default_and_bounded(eng):
    outs = run(eng, SamplingParams(max_tokens=3, ignore_eos=True))["r"]
    assert all(o.logprobs == () for o in outs)
    for bad in (21, -1, 2.5, True):
        with pytest.raises(InvalidRequestError) as e:
            eng.add_request("x", SamplingParams(logprobs=bad), prompt_token_ids=PROMPT)
        assert e.value.field == "logprobs"


def test_penalties_and_bias_follow_the_hand_computation_over_hf_logits(eng, hf):
    p = SamplingParams(max_tokens=12, ignore_eos=True, presence_penalty=0.7, frequency_penalty=0.4,
                       repetition_penalty=1.6, logit_bias=((300, 2.5), (301, -100.0)))
    out = tokens(run(eng, p)["r"])
    logits = hf_logits(hf, PROMPT + out[:-1])[len(PROMPT) - 1:].to(torch.float64)
    for j, tok in enumerate(out):
        row = logits[j].clone()
        row[300] += 2.5
        row[301] -= 100.0
        for t in set(PROMPT + out[:j]):
            row[t] = row[t] / 1.6 if row[t] > 0 else row[t] * 1.6
        for t in set(out[:j]):
            row[t] -= 0.4 * out[:j].count(t) + 0.7
        assert tok == int(torch.argmax(row)), j
    assert out != tokens(run(eng, SamplingParams(max_tokens=12, ignore_eos=True))["r"])  # they did change something


def test_logit_bias_can_force_and_ban(eng):
    plain = tokens(run(eng, SamplingParams(max_tokens=8, ignore_eos=True))["r"])
    forced = tokens(run(eng, SamplingParams(max_tokens=8, ignore_eos=True, logit_bias=((777, 100.0),)))["r"])
    assert forced == [777] * 8
    banned = tokens(run(eng, SamplingParams(max_tokens=8, ignore_eos=True, logit_bias=((plain[0], -100.0),)))["r"])
    assert plain[0] not in banned
    with pytest.raises(InvalidRequestError, match="outside"):
        eng.add_request("x", SamplingParams(logit_bias=((eng.model_config.vocab_size, 1.0),)), prompt_token_ids=PROMPT)


def test_adjustments_unit():
    adj = LogitAdjustments.create(4, presence=0.5, frequency=0.25, repetition=2.0, logit_bias=((3, 1.0),), prompt=[0])
    for t in (1, 1, 2):
        adj.accept(t)
    row = adj.apply(np.array([2.0, 1.0, -1.0, 0.5]))
    # bias: [2, 1, -1, 1.5]; repetition over {0, 1, 2}: [1, 0.5, -2, 1.5]; counts {1: 2, 2: 1}
    assert row.tolist() == [1.0, 0.5 - 0.5 - 0.5, -2.0 - 0.25 - 0.5, 1.5]


@pytest.mark.parametrize("prompt", [PROMPT, LONG], ids=["partial-block", "two-full-blocks"])
def test_n_samples_compute_the_prompt_once_and_each_equals_its_own_seed(eng, prompt):
    before = eng.num_prefill_tokens
    p = SamplingParams(max_tokens=10, ignore_eos=True, temperature=5.0, seed=11, n=4)
    outs = run(eng, p, prompt)
    assert eng.num_prefill_tokens - before == len(prompt)  # the prompt, once; no sample recomputed it
    assert sorted(outs) == sorted(sample_id("r", i) for i in range(4))
    samples = [tokens(outs[sample_id("r", i)]) for i in range(4)]
    assert all(o.index == i for i in range(4) for o in outs[sample_id("r", i)])
    for i, got in enumerate(samples):
        alone = tokens(run(eng, SamplingParams(max_tokens=10, ignore_eos=True, temperature=5.0, seed=11 + i),
                           prompt, rid=f"alone{i}")[f"alone{i}"])
        assert got == alone, i
    assert len({tuple(s) for s in samples}) > 1
    assert eng.pool.num_used == 0  # shared and copied blocks all returned


def test_n_samples_under_a_grammar_are_each_valid(eng):
    schema = {"type": "object", "properties": {"v": {"enum": ["alpha", "beta", "gamma", "delta"]},
                                               "k": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["v", "k"], "additionalProperties": False}
    outs = run(eng, SamplingParams(max_tokens=40, temperature=1.5, seed=5, n=4, constraint=Constraint.json_schema(schema)))
    assert len(outs) == 4
    for rid, o in outs.items():
        jsonschema.validate(json.loads("".join(x.text_delta for x in o)), schema)
    assert eng.pool.num_used == 0


def test_n_samples_handed_off_fork_on_the_decode_side(eng, tiny_model_dir):
    p = SamplingParams(max_tokens=8, ignore_eos=True, temperature=1.0, seed=21, n=3)
    want = {k: tokens(v) for k, v in run(eng, p).items()}
    pre = LLMEngine(tiny_model_dir, EngineConfig(num_blocks=64))
    pre.add_request("p", SamplingParams(max_tokens=1, ignore_eos=True, temperature=1.0, seed=21, n=3),
                    prompt_token_ids=PROMPT, hold_blocks=True)
    while pre.has_unfinished():
        pre.step()
    parent = pre.get_request("p")
    firsts = [parent.output_token_ids[0]] + [c.output_token_ids[0] for c in parent.children]
    assert firsts == [want[sample_id("r", i)][0] for i in range(3)]
    assert pre.pool.num_used == len(parent.block_ids)  # the samples took no blocks there
    blocks = eng.reserve(len(PROMPT))
    for s, d in zip(parent.block_ids, blocks):
        eng.kv.tensor[d].copy_(pre.kv.tensor[s])
    pre.release("p")
    got: dict[str, list[int]] = {}
    for o in eng.add_prefilled("d", p, PROMPT, firsts, blocks):
        got.setdefault(o.request_id, []).extend(o.new_token_ids)
    while eng.has_unfinished():
        for o in eng.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
    assert [got[sample_id("d", i)] for i in range(3)] == [want[sample_id("r", i)] for i in range(3)]
    assert eng.pool.num_used == 0


def test_abort_ends_every_sample(eng):
    eng.add_request("ab", SamplingParams(max_tokens=50, ignore_eos=True, n=3), prompt_token_ids=PROMPT)
    eng.step()
    assert eng.get_request(sample_id("ab", 2)) is not None
    assert eng.abort("ab")
    assert not eng.has_unfinished() and eng.pool.num_used == 0
    with pytest.raises(InvalidRequestError) as e:
        eng.add_request("x", SamplingParams(n=0), prompt_token_ids=PROMPT)
    assert e.value.field == "n"


def test_abort_after_sample_0_finished_still_ends_the_others(eng):
    p = SamplingParams(max_tokens=40, ignore_eos=True, temperature=5.0, seed=8, n=3)
    first = tokens(run(eng, replace(p, max_tokens=1))["r"])[0]
    eng.add_request("ab", replace(p, stop_token_ids=(first,)), prompt_token_ids=PROMPT)
    outs = eng.step()
    assert [o.finished for o in outs] == [True, False, False]  # sample 0 stopped on its first token
    assert eng.get_request("ab") is None and eng.get_request(sample_id("ab", 1)) is not None
    assert eng.abort("ab")
    assert not eng.has_unfinished() and eng.pool.num_used == 0 and not eng._groups
