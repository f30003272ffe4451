"""Correctness against Hugging Face transformers on the real SmolLM2-135M-Instruct."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.request import FinishReason
from engine.sampling import SamplingParams
from engine.tokenizer import Message

pytestmark = pytest.mark.real_model

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "List three primary colors:",
    "Translate to French: Good morning, how are you?",
    "import numpy as np\n\n# compute the mean of an array\n",
    "Q: What is 12 times 7?\nA:",
    "The theory of relativity was developed by Albert Einstein, who",
    "Water boils at",
]
GREEDY32 = SamplingParams(max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(real_model_dir) -> LLMEngine:
    return LLMEngine(real_model_dir, EngineConfig(num_blocks=1024, max_num_batched_tokens=256))


@pytest.fixture(scope="module")
def hf_greedy(real_model_dir, engine):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(real_model_dir), dtype=torch.float32)
    hf.eval()
    hf.generation_config.eos_token_id = None  # like ignore_eos: always 32 tokens, EOS may be picked
    out = []
    with torch.no_grad():
        for p in PROMPTS:
            ids = engine.tokenizer.encode(p)
            gen = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=32, do_sample=False, pad_token_id=2)
            out.append(gen[0, len(ids):].tolist())
    return out


def test_greedy_matches_hf_one_by_one(engine, hf_greedy):
    for p, ref in zip(PROMPTS, hf_greedy):
        got = engine.generate([engine.tokenizer.encode(p)], GREEDY32)[0]
        assert got == ref, p


def test_greedy_matches_hf_batched(engine, hf_greedy):
    ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    assert engine.generate(ids, GREEDY32) == hf_greedy
    assert engine.stats().num_blocks_free == 1024


def test_prefix_hit_changes_nothing_on_real_model(engine, hf_greedy):
    system = "You are a careful assistant. Answer briefly and precisely. " * 4
    shared = engine.tokenizer.encode(system)
    a = engine.tokenizer.encode(system + PROMPTS[6])
    before = engine.stats().prefix_hits_tokens
    first = engine.generate([a], GREEDY32)[0]
    second = engine.generate([a], GREEDY32)[0]
    assert first == second
    hits = engine.stats().prefix_hits_tokens - before
    assert hits >= (len(shared) // 16) * 16 > 0


def test_chat_answer_and_stop_string(engine):
    ids = engine.encode_prompt(messages=[Message("user", "What is the capital of France?")])
    rid = "chat"
    engine.add_request(rid, SamplingParams(max_tokens=32), prompt_token_ids=ids)
    text, reason = "", None
    while engine.has_unfinished():
        for o in engine.step():
            text += o.text_delta
            reason = o.finish_reason
    assert "Paris" in text and reason is FinishReason.STOP
    engine.add_request("stop", SamplingParams(max_tokens=32, stop=(" is",)), prompt_token_ids=ids)
    text = ""
    while engine.has_unfinished():
        for o in engine.step():
            text += o.text_delta
            reason = o.finish_reason
    assert text == "The capital of France" and reason is FinishReason.STOP


@pytest.mark.slow
def test_cli_generate_local_chat_says_paris():
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "generate", "What is the capital of France?",
                          "--local", "--chat"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
