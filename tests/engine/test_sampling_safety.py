"""Sampling is safe for every value it accepts and refuses, naming the field, every value
it cannot honour; what it accepts means the same after the trip over the wire (float32 /
int32 / int64 fields of the gRPC SamplingParams)."""
from __future__ import annotations

import math
import random

import pytest
import torch

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.errors import InvalidRequestError
from engine.sampling import INT32_MAX, INT64_MAX, INT64_MIN, MAX_TEMPERATURE, SamplerState, SamplingParams, sample
from proto.convert import sampling_from_proto, sampling_to_proto

INF, NAN = float("inf"), float("nan")

BAD = [
    ("max_tokens", [0, -3, 1.5, 10**400, INT32_MAX + 1, True, None, "8", 10**5000]),
    ("temperature", [-0.1, INF, -INF, NAN, 1e30, MAX_TEMPERATURE + 1e-3, 10**400, True, None, "1"]),
    ("top_p", [0.0, -1e-300, 1.5, 1e-320, 5e-324, 1e-46, NAN, INF, 10**400, False, "0.5"]),
    ("top_k", [-1, INT32_MAX + 1, 2**64, 10**5000, 2.0, True, None]),
    ("seed", [INT64_MAX + 1, INT64_MIN - 1, 2**64, 10**5000, 1.0, "7", True]),
    ("stop", [("",), ("\ud800",), ("ok", "\udfff x"), (3,), "abc", None]),
    ("stop_token_ids", [(-1,), (INT32_MAX + 1,), (10**400,), (1.0,), (True,), None]),
    ("ignore_eos", [None, 1, "yes"]),
]


@pytest.mark.parametrize("field, value", [(f, v) for f, vs in BAD for v in vs],
                         ids=[f"{f}-{i}" for f, vs in BAD for i in range(len(vs))])
def test_every_bad_value_is_refused_naming_its_field_by_validate_and_across_the_wire(field, value):
    p = SamplingParams(**{field: value})
    with pytest.raises(InvalidRequestError) as e:
        p.validate()
    assert e.value.field == field
    items = value if isinstance(value, tuple) else (value,)
    if any(isinstance(v, bool) for v in items) or (field == "ignore_eos" and isinstance(value, int)):
        return  # protobuf coerces bool <-> int, as typed clients do: the wire cannot hold these
    # a value the message cannot carry is refused when converting (never protobuf's ValueError /
    # TypeError); one it can carry travels and the receiving node refuses it, naming the same field
    with pytest.raises(InvalidRequestError) as e:
        msg = sampling_to_proto(p)
        sampling_from_proto(type(msg).FromString(msg.SerializeToString()))
    assert e.value.field == f"sampling.{field}"


def test_messages_say_what_is_wrong_without_printing_huge_integers():
    with pytest.raises(InvalidRequestError, match=r"^top_p: must be in \(0, 1\], got 1e-320, which is 0 in the float32"):
        SamplingParams(top_p=1e-320).validate()
    with pytest.raises(InvalidRequestError, match=r"^temperature: must be a number in \[0, 100\], got inf$"):
        SamplingParams(temperature=INF).validate()
    with pytest.raises(InvalidRequestError, match=r"^seed: must be a 64-bit signed integer, got an integer of 16610 bits$"):
        SamplingParams(seed=10**5000).validate()


GOOD = {
    "max_tokens": [1, 7, INT32_MAX],
    "temperature": [0.0, -0.0, 1e-45, 1e-40, 1e-30, 1e-3, 0.7, 1, 2.0, MAX_TEMPERATURE],
    "top_p": [1.5e-45, 1e-40, 1e-6, 0.5, 0.999999, 1, 1.0],
    "top_k": [0, 1, 2, 50, INT32_MAX],
    "seed": [None, 0, -1, INT64_MIN, INT64_MAX],
    "stop": [(), ("\n",), ("é", "END")],
    "stop_token_ids": [(), (0,), (2, INT32_MAX)],
    "ignore_eos": [False, True],
}
BAD_BY_FIELD = dict(BAD)


def test_fuzz_what_the_conductor_accepts_the_node_accepts_and_the_rest_names_a_field():
    rng = random.Random(11)
    accepted = refused = 0
    for _ in range(3000):
        kw = {f: rng.choice(vs) for f, vs in GOOD.items()}
        bad = None
        if rng.random() < 0.5:
            bad = rng.choice(list(BAD_BY_FIELD))
            kw[bad] = rng.choice(BAD_BY_FIELD[bad])
        p = SamplingParams(**kw)
        try:
            p.validate()
        except InvalidRequestError as e:
            assert e.field == bad, (kw, e)
            refused += 1
            continue
        assert bad is None, kw
        msg = sampling_to_proto(p)
        back = sampling_from_proto(type(msg).FromString(msg.SerializeToString()))  # validates, as a node does
        assert (back.max_tokens, back.top_k, back.seed, back.stop, back.stop_token_ids) == (
            p.max_tokens, p.top_k, p.seed, tuple(p.stop), tuple(p.stop_token_ids)), kw
        assert back.greedy == (p.temperature == 0), kw
        assert math.isclose(back.top_p, p.top_p, rel_tol=1e-6, abs_tol=1.5e-45)
        accepted += 1
    assert accepted > 1000 and refused > 1000


# --- the sampler ----------------------------------------------------------------------

VOCAB = 300


def _logits(rng: torch.Generator, kind: str) -> torch.Tensor:
    row = torch.randn(VOCAB, generator=rng) * float(torch.empty(1).uniform_(0.01, 50, generator=rng))
    pick = torch.randint(0, VOCAB, (5,), generator=rng)
    if kind == "nan_some":
        row[pick] = NAN
    elif kind == "nan_all":
        row[:] = NAN
    elif kind == "neg_inf_most":
        row[torch.randperm(VOCAB, generator=rng)[: VOCAB - 3]] = -INF
    elif kind == "neg_inf_all":
        row[:] = -INF
    elif kind == "pos_inf":
        row[pick[:2]] = INF
        row[pick[2]] = NAN
    elif kind == "huge":
        row = row * 1e36
    return row


KINDS = ["plain", "nan_some", "nan_all", "neg_inf_most", "neg_inf_all", "pos_inf", "huge"]
TEMPERATURES = [1e-320, 5e-324, 1e-45, 1e-40, 1e-20, 1e-3, 0.5, 1.0, 7.0, MAX_TEMPERATURE]
TOP_PS = [1e-320, 1.5e-45, 1e-12, 0.3, 0.9, 1.0]
TOP_KS = [0, 1, 3, VOCAB - 1, VOCAB, INT32_MAX]


def test_fuzz_sample_never_raises_and_picks_only_what_the_row_allows():
    g = torch.Generator().manual_seed(5)
    rng = random.Random(5)
    for round_ in range(60):
        kinds = [rng.choice(KINDS) for _ in range(8)]
        logits = torch.stack([_logits(g, k) for k in kinds])
        params = [SamplingParams(temperature=rng.choice(TEMPERATURES + [0.0]), top_p=rng.choice(TOP_PS),
                                 top_k=rng.choice(TOP_KS), seed=rng.randrange(2**63)) for _ in kinds]
        ids = sample(logits.clone(), params, [SamplerState.for_params(p) for p in params])
        assert len(ids) == len(kinds)
        for row, tok, kind in zip(logits, ids, kinds):
            assert isinstance(tok, int) and 0 <= tok < VOCAB, (round_, kind)
            v = row[tok].item()
            if kind == "pos_inf":
                assert v == INF  # +inf entries are the only candidates
            elif kind not in ("nan_all", "neg_inf_all"):
                assert math.isfinite(v), (round_, kind)  # never a NaN or -inf entry while others exist


@pytest.mark.parametrize("temperature", [5e-324, 1e-320, 1e-45, 1e-40, 1e-30, 1e-12])
def test_tiny_temperature_is_the_greedy_limit(temperature):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(16, 49152, generator=g) * 8
    logits[3] *= 1e-5  # close values: still only the maximum survives
    params = [SamplingParams(temperature=temperature, seed=i) for i in range(16)]
    got = sample(logits, params, [SamplerState.for_params(p) for p in params])
    assert got == torch.argmax(logits, dim=-1).tolist()


def test_top_k_1_and_subnormal_top_p_pick_the_argmax_at_any_temperature():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 1000, generator=g)
    want = torch.argmax(logits, dim=-1).tolist()
    for p in (SamplingParams(temperature=MAX_TEMPERATURE, top_k=1, seed=1),
              SamplingParams(temperature=MAX_TEMPERATURE, top_p=1.5e-45, seed=1),
              SamplingParams(temperature=1.0, top_p=1e-320, seed=1)):  # below float32, still > 0 in-process
        assert sample(logits, [p] * 6, [SamplerState.for_params(p) for _ in range(6)]) == want


def test_greedy_rows_skip_nan_and_prefer_pos_inf():
    logits = torch.tensor([[NAN, 1.0, 3.0, 2.0], [0.0, INF, NAN, INF], [NAN, NAN, NAN, NAN], [-INF] * 4])
    greedy = [SamplingParams()] * 4
    assert sample(logits, greedy, [SamplerState.for_params(p) for p in greedy]) == [2, 1, 0, 0]


def test_huge_temperature_is_close_to_uniform_and_seeded():
    logits = torch.tensor([[0.0, 10.0, 20.0, 30.0]])
    p = SamplingParams(temperature=MAX_TEMPERATURE, seed=42)
    st = SamplerState.for_params(p)
    counts = [0] * 4
    for _ in range(4000):
        counts[sample(logits, [p], [st])[0]] += 1
    # softmax([0, .1, .2, .3]) = [.214, .236, .261, .289]
    assert all(700 < c < 1300 for c in counts), counts
    st2 = SamplerState.for_params(p)
    again = [sample(logits, [p], [st2])[0] for _ in range(50)]
    st3 = SamplerState.for_params(p)
    assert again == [sample(logits, [p], [st3])[0] for _ in range(50)]


def test_engine_at_temperature_1e_40_generates_the_greedy_tokens(tiny_model_dir):
    eng = LLMEngine(tiny_model_dir, EngineConfig(num_blocks=64))
    prompt = list(range(100, 140))
    greedy = eng.generate([prompt], SamplingParams(max_tokens=10, ignore_eos=True))[0]
    tiny = eng.generate([prompt], SamplingParams(max_tokens=10, temperature=1e-40, seed=3, ignore_eos=True))[0]
    assert tiny == greedy
    assert eng.stats().num_blocks_free == 64
