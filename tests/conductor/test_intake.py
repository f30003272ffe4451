"""The conductor's intake (`conductor.intake`): validation, the character cap, max_tokens
capping, and tokenizing off the event loop, on the real model's tokenizer."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from conductor.frontend_api import ChatMessage, GenerateRequest
from conductor.intake import INLINE_MAX, Intake, Prepared, check_fits, off_loop
from engine.block_pool import block_hashes
from engine.errors import InvalidRequestError
from engine.sampling import SamplingParams
from engine.tokenizer import Tokenizer

pytestmark = pytest.mark.timeout(60)

PHRASE = "The quick brown fox jumps over the lazy dog. "


@pytest.fixture(scope="module")
def tokenizer(real_model_dir) -> Tokenizer:
    return Tokenizer(real_model_dir)


def prompt(text: str, **sampling) -> GenerateRequest:
    return GenerateRequest("r", SamplingParams(**sampling), prompt=text)


def test_a_4mb_prompt_is_tokenized_while_the_loop_keeps_running(tokenizer):
    """Before: the conductor tokenized on its event loop (and `encode` held the GIL even in a
    thread): the loop stood still ~2 s for 4 MB, long enough to miss node heartbeats."""
    intake = Intake(tokenizer, max_model_len=10_000_000, block_size=16)  # a context big enough to try
    text = PHRASE * 88_889  # 4.0 MB

    async def main() -> tuple[Prepared, float, float]:
        gaps = []
        task = asyncio.ensure_future(intake.prepare(prompt(text)))
        t0 = last = time.perf_counter()
        while not task.done():
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
        return task.result(), max(gaps), time.perf_counter() - t0

    prepared, worst_gap, took = asyncio.run(main())
    assert took > 0.5, "tokenizing 4 MB should take a while; the test measures nothing otherwise"
    # the old code held the loop (and the GIL) for all of it: ~2 s on a quiet machine
    assert worst_gap < min(1.0, took / 4), f"the event loop stood still for {worst_gap:.2f}s of {took:.1f}s"
    assert prepared.token_ids[:40] == tokenizer.encode(PHRASE * 5)[:40]
    assert len(prepared.token_ids) == 10 * 88_889 + 1  # 10 tokens a phrase, the last " " one more
    assert prepared.block_hashes == tuple(block_hashes(prepared.token_ids, 16))


def test_small_inputs_run_inline_and_big_ones_on_the_pool():
    async def where(size: int) -> str:
        return await off_loop(size, lambda: threading.current_thread().name)

    assert asyncio.run(where(INLINE_MAX)) == threading.current_thread().name
    assert asyncio.run(where(INLINE_MAX + 1)).startswith("intake")


def test_text_too_long_for_the_context_is_refused_before_tokenizing(tokenizer, monkeypatch):
    intake = Intake(tokenizer, max_model_len=2048, block_size=16)
    assert intake.max_prompt_chars == 2048 * tokenizer.max_token_chars == 2048 * 81

    def never(text):
        raise AssertionError("tokenized a text that cannot fit")

    monkeypatch.setattr(intake.tokenizer, "encode", never)
    with pytest.raises(InvalidRequestError) as e:
        intake.prepare_now(prompt("a" * (2048 * 81 + 1)))
    assert e.value.field == "prompt"
    assert str(e.value) == ("prompt: 165889 characters cannot fit the context window of 2048 tokens "
                            "(at most 165888 characters would)")
    chat = GenerateRequest("r", SamplingParams(), messages=(ChatMessage("user", "b" * 2048 * 81),))
    with pytest.raises(InvalidRequestError, match="characters cannot fit") as e:
        intake.prepare_now(chat)
    assert e.value.field == "messages"


def test_the_character_cap_is_tight(tokenizer):
    """81 characters can be one token (the longest entry: a newline and 80 spaces), so the
    cap cannot be lower; such a text under the cap is tokenized and judged by its tokens."""
    intake = Intake(tokenizer, max_model_len=2048, block_size=16)
    longest = "\n" + " " * 80
    assert len(tokenizer.encode(longest)) == 1
    with pytest.raises(InvalidRequestError) as e:
        intake.prepare_now(prompt("x" + longest * 2047))  # 165,808 characters, 2,048 tokens
    assert str(e.value) == ("prompt: 2048 tokens does not fit the context window of 2048 "
                            "(prompt + at least one new token)")


def test_max_tokens_beyond_the_context_is_capped_to_the_room_left(tokenizer):
    intake = Intake(tokenizer, max_model_len=2048, block_size=16)
    ids = tuple(range(1000, 1100))
    big = intake.prepare_now(GenerateRequest("r", SamplingParams(max_tokens=8192), prompt_token_ids=ids))
    assert big.sampling.max_tokens == 2048 - 100
    assert big.token_ids == list(ids)
    assert big.block_hashes == tuple(block_hashes(list(ids), 16))  # 6 full blocks
    assert len(big.block_hashes) == 6
    small = intake.prepare_now(GenerateRequest("r", SamplingParams(max_tokens=10, temperature=0.5),
                                               prompt_token_ids=ids))
    assert small.sampling == SamplingParams(max_tokens=10, temperature=0.5)


@pytest.mark.parametrize("capacities, prompt_len, max_tokens, field", [
    ([1024], 1024, 1, "prompt"),  # the prompt alone (+ one new token) overflows every node
    ([1024, 800], 100, 1000, "max_tokens"),  # 1,100 tokens of KV; the largest node holds 1,024
])
def test_a_request_no_decode_node_can_hold_is_refused(capacities, prompt_len, max_tokens, field):
    prepared = Prepared(list(range(prompt_len)), (), SamplingParams(max_tokens=max_tokens))
    with pytest.raises(InvalidRequestError) as e:
        check_fits(prepared, capacities)
    assert e.value.field == field and "1024" in e.value.message


def test_a_request_that_fits_the_largest_node_passes():
    prepared = Prepared(list(range(100)), (), SamplingParams(max_tokens=924))
    check_fits(prepared, [1024, 512])
    check_fits(prepared, [])  # no decode node up: the scheduler says so, not the intake


@pytest.mark.parametrize("request_, field", [
    (GenerateRequest("r", SamplingParams(), prompt="ok \ud800"), "prompt"),
    (GenerateRequest("r", SamplingParams(), messages=(ChatMessage("user", "fine"), ChatMessage("user", "\udfff x"))),
     "messages[1].content"),
    (GenerateRequest("r", SamplingParams(), messages=(ChatMessage("tool", "x"),)), "messages[0].role"),
    (GenerateRequest("r", SamplingParams(), prompt=""), "prompt"),
    (GenerateRequest("r", SamplingParams(), prompt_token_ids=()), "prompt_token_ids"),
    (GenerateRequest("r", SamplingParams(), prompt_token_ids=tuple(range(2048))), "prompt_token_ids"),
    (GenerateRequest("r", SamplingParams(), prompt_token_ids=(1, 49152)), "prompt_token_ids"),
    (GenerateRequest("r", SamplingParams()), "prompt"),
    (GenerateRequest("r", SamplingParams(), prompt="x", prompt_token_ids=(1,)), "prompt"),
    (GenerateRequest("r", SamplingParams(top_p=0.0), prompt="x"), "top_p"),
    (GenerateRequest("r", SamplingParams(seed=2**64), prompt="x"), "seed"),
])
def test_bad_requests_name_the_field(tokenizer, request_, field):
    intake = Intake(tokenizer, max_model_len=2048, block_size=16)
    with pytest.raises(InvalidRequestError) as e:
        intake.prepare_now(request_)
    assert e.value.field == field
