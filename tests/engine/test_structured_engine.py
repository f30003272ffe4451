"""Constrained decoding in the engine (tiny random-weight model: its tokens are noise, so
only the grammar keeps them in shape, which is what these tests check)."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.errors import InvalidRequestError
from engine.request import FinishReason
from engine.sampling import SamplingParams
from engine.structured import Constraint

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "size": {"enum": ["small", "medium", "large"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["ok", "size", "tags", "n"],
    "additionalProperties": False,
}
PROMPT = [1, 504, 3458, 314, 253, 1178, 28, 30, 1173, 42, 5400, 17, 288]


@pytest.fixture(scope="module")
def eng(tiny_model_dir) -> LLMEngine:
    return LLMEngine(tiny_model_dir, EngineConfig(num_blocks=256))


def run(eng: LLMEngine, params: SamplingParams, prompt=PROMPT, rid="r") -> tuple[list[int], str, list]:
    eng.add_request(rid, params, prompt_token_ids=list(prompt))
    toks, text, outs = [], "", []
    while eng.has_unfinished():
        for o in eng.step():
            if o.request_id == rid:
                toks += o.new_token_ids
                text += o.text_delta
                outs.append(o)
    return toks, text, outs


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_validates_greedy_and_sampled(eng, temperature):
    for seed in range(3):
        p = SamplingParams(max_tokens=120, temperature=temperature, seed=seed, constraint=Constraint.json_schema(SCHEMA))
        _, text, outs = run(eng, p)
        assert outs[-1].finish_reason is FinishReason.STOP, text
        jsonschema.validate(json.loads(text), SCHEMA)


def test_regex_choice_and_grammar_outputs_match(eng):
    cases = [
        (Constraint("regex", r"[0-9]{3}-[a-z]{2,4}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t)),
        (Constraint("choice", choices=("red", "green", "blue sky")), lambda t: t in ("red", "green", "blue sky")),
        (Constraint("grammar", 'start: "x=" NUM ("," NUM)?\nNUM: /[1-9][0-9]?/'),
         lambda t: re.fullmatch(r"x=[1-9][0-9]?(,[1-9][0-9]?)?", t)),
    ]
    for c, ok in cases:
        for temperature in (0.0, 1.5):
            for seed in range(3):
                _, text, outs = run(eng, SamplingParams(max_tokens=40, temperature=temperature, seed=seed, constraint=c))
                assert ok(text), (c, text)
                assert outs[-1].finish_reason is FinishReason.STOP


def test_forced_tokens_are_fast_forwarded_and_counted(eng):
    schema = {"type": "object", "properties": {"colour_name": {"enum": ["crimson", "teal"]}},
              "required": ["colour_name"], "additionalProperties": False}
    before = eng.num_forced_tokens
    toks, text, outs = run(eng, SamplingParams(max_tokens=40, constraint=Constraint.json_schema(schema)))
    assert json.loads(text)["colour_name"] in ("crimson", "teal")
    forced = sum(o.num_forced_tokens for o in outs)
    # '{"colour_name": "' is forced after the first token; so is the rest of either value after its first token
    assert forced >= 4 and eng.num_forced_tokens - before == forced
    assert len(outs) < len(toks)  # fewer steps than tokens
    # with logprobs asked, nothing is fast-forwarded (every token gets its logprob) and the text is the same
    toks2, text2, outs2 = run(eng, SamplingParams(max_tokens=40, logprobs=0, constraint=Constraint.json_schema(schema)))
    assert sum(o.num_forced_tokens for o in outs2) == 0 and len(outs2) == len(toks2)
    assert text2 == text


def test_grammar_end_stops_even_with_ignore_eos_and_frees_blocks(eng):
    free = eng.pool.num_free
    _, text, outs = run(eng, SamplingParams(max_tokens=50, ignore_eos=True, constraint=Constraint("choice", choices=("yes", "no"))))
    assert text in ("yes", "no") and outs[-1].finish_reason is FinishReason.STOP
    assert eng.pool.num_used == 0 and eng.pool.num_free == free


def test_max_tokens_cuts_a_constrained_output_with_length(eng):
    toks, text, outs = run(eng, SamplingParams(max_tokens=3, constraint=Constraint.json_schema(SCHEMA)))
    assert len(toks) == 3 and outs[-1].finish_reason is FinishReason.LENGTH
    assert text.startswith("{")


@pytest.mark.parametrize("constraint, message", [
    (Constraint("json_schema", '{"type": "banana"}'), "does not compile"),
    (Constraint("json_schema", '{"$ref": "https://example.com/s.json"}'), "does not compile"),
    (Constraint("json_schema", "{not json"), "not JSON"),
    (Constraint("regex", "(abc"), "does not compile"),
    (Constraint("regex", r"[^\s\S]"), "matches nothing"),
    (Constraint("grammar", "start: missing_rule\n"), "does not compile"),
    (Constraint("choice", choices=()), "non-empty list"),
    (Constraint("kind_unknown", "x"), "must be one of"),
])
def test_bad_constraints_are_refused_naming_the_field(eng, constraint, message):
    with pytest.raises(InvalidRequestError) as e:
        eng.add_request("bad", SamplingParams(constraint=constraint), prompt_token_ids=PROMPT)
    assert e.value.field.startswith("constraint") and message in e.value.message
    assert eng.get_request("bad") is None and not eng.has_unfinished()


def test_strict_schema_refuses_what_lenient_ignores(eng):
    schema = {"type": "string", "unknownKeyword": 3, "format": "no-such-format"}
    eng.check_params(SamplingParams(constraint=Constraint.json_schema(schema, strict=False)))
    with pytest.raises(InvalidRequestError, match="does not compile"):
        eng.check_params(SamplingParams(constraint=Constraint.json_schema(schema, strict=True)))


def test_mask_overlap_changes_nothing(eng):
    p = SamplingParams(max_tokens=60, temperature=1.0, seed=7, constraint=Constraint.json_schema(SCHEMA))
    eng.masks.overlap = True
    a = run(eng, p)[0]
    eng.masks.overlap = False
    try:
        b = run(eng, p)[0]
    finally:
        eng.masks.overlap = True
    assert a == b


def test_handoff_first_token_advances_the_decode_side_grammar(eng, tiny_model_dir):
    """What a decode node does: the prefill side sampled the first token under the grammar;
    `add_prefilled` must advance its own matcher by it. A first token the grammar refuses
    (a prefill that sampled unconstrained) ends the request with an error, never junk."""
    c = Constraint.json_schema(SCHEMA)
    want = run(eng, SamplingParams(max_tokens=80, constraint=c))[0]
    pre = LLMEngine(tiny_model_dir, EngineConfig(num_blocks=64))
    pre.add_request("p", SamplingParams(max_tokens=1, ignore_eos=True, constraint=c), prompt_token_ids=PROMPT,
                    hold_blocks=True)
    first = None
    while pre.has_unfinished():
        for o in pre.step():
            first = o.new_token_ids[0]
    assert first == want[0]
    # the decode side: KV "arrives" by copying the prefill side's blocks into reserved ones
    blocks = eng.reserve(len(PROMPT))
    src = pre.get_request("p").block_ids
    for s, d in zip(src, blocks):
        eng.kv.tensor[d].copy_(pre.kv.tensor[s])
    pre.release("p")
    outs = eng.add_prefilled("d", SamplingParams(max_tokens=80, constraint=c), PROMPT, first, blocks)
    toks = [t for o in outs for t in o.new_token_ids]
    while eng.has_unfinished():
        for o in eng.step():
            toks += o.new_token_ids
    assert toks == want
    # a first token the grammar refuses: an error, not an unconstrained continuation
    bad = eng.tokenizer.encode("hello")[0]
    blocks = eng.reserve(len(PROMPT))
    outs = eng.add_prefilled("d2", SamplingParams(max_tokens=80, constraint=c), PROMPT, bad, blocks)
    assert outs[-1].finished and outs[-1].finish_reason is FinishReason.ABORT and "grammar" in outs[-1].error
    assert eng.pool.num_used == 0


def test_resume_replays_the_grammar(eng):
    c = Constraint.json_schema(SCHEMA)
    p = SamplingParams(max_tokens=80, temperature=1.0, seed=3, constraint=c)
    full = run(eng, p)[0]
    k = len(full) // 2
    eng.add_request("res", SamplingParams(max_tokens=80, constraint=c), prompt_token_ids=PROMPT,
                    resume_token_ids=full[:k])
    rest, text = [], ""
    while eng.has_unfinished():
        for o in eng.step():
            rest += o.new_token_ids
    out = eng.tokenizer.decode(full[:k] + rest)
    jsonschema.validate(json.loads(out), SCHEMA)
    with pytest.raises(InvalidRequestError) as e:  # tokens the grammar never allowed
        eng.add_request("res2", SamplingParams(max_tokens=80, constraint=c), prompt_token_ids=PROMPT,
                        resume_token_ids=eng.tokenizer.encode("nope"))
    assert e.value.field == "resume_token_ids[0]"


def test_mask_unpack_is_exact_and_cheap():
    import statistics
    import time

    import torch

    from engine.structured.matcher import unpack

    g = torch.Generator().manual_seed(0)
    words = torch.randint(-2**31, 2**31 - 1, (1536,), dtype=torch.int32, generator=g)
    got = unpack(words, 49150)
    want = [bool((int(words[i // 32]) >> (i % 32)) & 1) for i in range(49150)]
    assert got.dtype == bool and got.tolist() == want
    times = []
    for _ in range(21):
        t = time.perf_counter()
        unpack(words, 49152)
        times.append(time.perf_counter() - t)
    assert statistics.median(times) < 2e-3  # once 8-23 ms a row (torch's int32 `& 1`), now ~10 us
