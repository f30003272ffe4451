"""A greedy constrained pick is checked against its grammar before any mask is computed: when
the grammar allows the plain argmax, that is the token (no mask); when it refuses it, the mask
is computed then and the masked argmax taken — the same tokens as masking every step."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling import SamplerState, SamplingParams, checks_greedy_pick, sample
from engine.structured import Constraint
from engine.structured.matcher import GrammarState, MaskStats


@pytest.fixture(scope="module")
def eng(tiny_model_dir):
    return LLMEngine(tiny_model_dir, EngineConfig(num_blocks=64))


def _state(eng, c: Constraint, params: SamplingParams) -> SamplerState:
    V = eng.model_config.vocab_size
    return SamplerState.for_params(params, vocab_size=V, grammar=GrammarState(eng.grammar.matcher(c), V))


def test_an_allowed_argmax_needs_no_mask_and_a_refused_one_is_masked(eng):
    c = Constraint("choice", choices=("yes", "no"))
    p = SamplingParams(max_tokens=4, constraint=c)
    V = eng.model_config.vocab_size
    st = _state(eng, c, p)
    allowed = np.flatnonzero(st.grammar.take_mask())
    assert checks_greedy_pick(p, st) and 0 < allowed.size < V
    stats = MaskStats()
    calls = []
    take = st.grammar.take_mask
    st.grammar.take_mask = lambda: calls.append(1) or take()

    good = torch.zeros(1, V)
    good[0, allowed[-1]] = 5.0
    assert sample(good, [p], [st], stats) == [int(allowed[-1])]
    assert (stats.checks, stats.check_misses, len(calls)) == (1, 0, 0)

    st = _state(eng, c, p)
    take = st.grammar.take_mask
    st.grammar.take_mask = lambda: calls.append(1) or take()
    bad = torch.zeros(1, V)
    refused = next(t for t in range(V) if t not in set(allowed.tolist()))
    bad[0, refused] = 9.0
    bad[0, allowed[0]] = 1.0
    assert sample(bad, [p], [st], stats) == [int(allowed[0])]
    assert (stats.checks, stats.check_misses, len(calls)) == (2, 1, 1)


def test_sampled_and_biased_requests_are_always_masked(eng):
    c = Constraint("regex", "[a-z]{3}")
    st = _state(eng, c, SamplingParams(temperature=1.0, seed=1, constraint=c))
    assert not checks_greedy_pick(SamplingParams(temperature=1.0, seed=1, constraint=c), st)
    pb = SamplingParams(constraint=c, logit_bias=((5, 1.0),))
    assert not checks_greedy_pick(pb, _state(eng, c, pb))


@pytest.mark.parametrize("c", [
    Constraint.json_schema({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"enum": ["x", "y"]}},
                            "required": ["a", "b"], "additionalProperties": False}),
    Constraint("regex", "[a-z]{2,6}-[0-9]{2}"),
])
def test_engine_tokens_equal_masking_every_step(eng, c, monkeypatch):
    prompt = [1, 504, 3458, 314, 253, 1178, 28, 30]
    p = SamplingParams(max_tokens=24, constraint=c)
    eng.fast_forward = False
    checked0 = eng.masks.stats.checks
    fast = eng.generate([prompt], p)[0]
    assert eng.masks.stats.checks > checked0
    import engine.engine as engine_mod
    import engine.sampling as sampling_mod
    monkeypatch.setattr(sampling_mod, "checks_greedy_pick", lambda p, st: False)
    monkeypatch.setattr(engine_mod, "checks_greedy_pick", lambda p, st: False)
    checked1 = eng.masks.stats.checks
    assert eng.generate([prompt], p)[0] == fast
    assert eng.masks.stats.checks == checked1
    eng.fast_forward = True
