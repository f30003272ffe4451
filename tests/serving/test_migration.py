"""A migrated request resumes exactly where it stopped.

Engine level (real model, greedy): a request re-admitted with the tokens it already
generated (`resume_token_ids`) continues with the undisturbed run's tokens and text, counts
the resumed tokens towards max_tokens and usage, and a stop string that spans the seam still
ends it where it would have ended.
"""
from __future__ import annotations

import pytest

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.errors import InvalidRequestError
from engine.request import FinishReason
from engine.sampling import SamplingParams

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def engine(real_model_dir):
    return LLMEngine(real_model_dir, EngineConfig(num_blocks=128))


def run(engine: LLMEngine, rid: str, prompt: list[int], params: SamplingParams, resume=None):
    engine.add_request(rid, params, prompt_token_ids=prompt, resume_token_ids=resume)
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.request_id == rid]
    return outs


def test_resumed_request_continues_like_the_undisturbed_run(engine):
    prompt = engine.tokenizer.encode("The capital of France is")
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    full = run(engine, "whole", prompt, params)
    tokens = [o.new_token_ids[0] for o in full]
    for cut in (1, 9):
        rest = run(engine, f"resumed-{cut}", prompt, params, resume=tokens[:cut])
        assert [o.new_token_ids[0] for o in rest] == tokens[cut:]
        assert [o.text_delta for o in rest] == [o.text_delta for o in full[cut:]]
        assert [o.num_output_tokens for o in rest] == list(range(cut + 1, 17))
        assert rest[-1].finished and rest[-1].finish_reason is FinishReason.LENGTH
    assert engine.pool.num_used == 0


def test_a_stop_string_across_the_seam_still_stops_the_request(engine):
    prompt = engine.tokenizer.encode("The capital of France is")
    free = run(engine, "free", prompt, SamplingParams(max_tokens=16, ignore_eos=True))
    deltas = [o.text_delta for o in free]
    tokens = [o.new_token_ids[0] for o in free]
    # a stop string made of the end of one token's text and the start of the next one's
    cut = next(i for i in range(3, 15) if len(deltas[i - 1].strip()) >= 2 and len(deltas[i].strip()) >= 2)
    stop = deltas[cut - 1][-2:] + deltas[cut][:2]
    assert stop not in "".join(deltas[:cut]) and stop in "".join(deltas[:cut + 1])
    params = SamplingParams(max_tokens=16, ignore_eos=True, stop=(stop,))
    whole = run(engine, "stopped", prompt, params)
    resumed = run(engine, "stopped-resumed", prompt, params, resume=tokens[:cut])
    assert len(whole) == cut + 1 and whole[-1].finish_reason is FinishReason.STOP
    assert len(resumed) == 1 and resumed[0].finish_reason is FinishReason.STOP
    assert resumed[0].new_token_ids == whole[-1].new_token_ids and resumed[0].text_delta == whole[-1].text_delta
    assert resumed[0].num_output_tokens == whole[-1].num_output_tokens == cut + 1


def test_resume_tokens_are_checked(engine):
    prompt = engine.tokenizer.encode("Hello")
    with pytest.raises(InvalidRequestError, match="resume_token_ids: 4 tokens leave nothing of max_tokens=4"):
        engine.add_request("r1", SamplingParams(max_tokens=4), prompt_token_ids=prompt, resume_token_ids=[5, 6, 7, 8])
    with pytest.raises(InvalidRequestError, match=r"prompt_token_ids: token id 99999999 outside"):
        engine.add_request("r2", SamplingParams(max_tokens=8), prompt_token_ids=prompt, resume_token_ids=[99999999])
    assert engine.get_request("r1") is None and engine.get_request("r2") is None
