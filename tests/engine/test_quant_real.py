"""Every model dtype on the real SmolLM2-135M: it loads, answers sensibly, and stays close to
float32. The thresholds are what these prompts measured (deterministic: the kernels do not
depend on the thread split), rounded down:

    dtype      greedy 32 tokens identical  teacher-forced top-1 vs fp32 (372 positions)
    bfloat16   6 of 9 (mean common prefix 24.9)   0.9919
    w8a8       2 of 9                              0.9785 (activations per 64 channels; 0.9543 per token)
    fp8        1 of 9                              0.9113 (0.9409 before a quantizer tie fix)

(bench.quality measures the same over 51,200 tokens of other text.)"""
from __future__ import annotations

import pytest
import torch

from bench.quality import forward_logits
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.quant import recipe
from engine.sampling import SamplingParams

from tests.engine.test_quant_kernels import qgemm_built
from tests.engine.test_real_model import PROMPTS

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

DTYPES = ("float32", "bfloat16", "w8a8", "fp8")
GREEDY32 = SamplingParams(max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module")
def engines(real_model_dir) -> dict[str, LLMEngine]:
    return {d: LLMEngine(real_model_dir, EngineConfig(num_blocks=256, dtype=d)) for d in DTYPES}


@pytest.fixture(scope="module")
def greedy(engines) -> dict[str, list[list[int]]]:
    tok = engines["float32"].tokenizer
    return {d: e.generate([tok.encode(p) for p in PROMPTS], GREEDY32) for d, e in engines.items()}  # one batch


def test_every_dtype_loads_in_its_forms_and_sizes(engines):
    fp8 = recipe("fp8").linear  # fp8 | fp8b (engine.quant.FP8_LINEAR)
    forms = {d: {q.form for q in e.runner.model.linears()} for d, e in engines.items()}
    assert forms == {"float32": {"f32"}, "bfloat16": {"bf16"}, "w8a8": {"int8", "w8a16"}, "fp8": {fp8, "bf16"}}
    mb = {d: e.runner.model.weight_bytes / 1e6 for d, e in engines.items()}
    assert 537 < mb["float32"] < 539 and abs(mb["bfloat16"] - mb["float32"] / 2) < 0.1
    assert 138 < mb["w8a8"] < 140  # int8 layers + an int8 head with a scale per 32 weights (bf16 table: not streamed)
    assert (160 < mb["fp8"] < 166) if fp8 == "fp8" else (175 < mb["fp8"] < 177)  # fp8b: + a scale per 32 weights
    assert {d: e.kv.dtype_name for d, e in engines.items()} == {"float32": "float32", "bfloat16": "bfloat16",
                                                                "w8a8": "bfloat16", "fp8": "bfloat16"}


def test_every_dtype_answers_coherently(engines, greedy):
    tok = engines["float32"].tokenizer
    for d in DTYPES:
        capital = tok.decode(greedy[d][0])
        assert capital.startswith(" Paris."), (d, capital)
        story = tok.decode(greedy[d][2])
        assert story.startswith(" there was a"), (d, story)


def test_bfloat16_greedy_tokens_agree_with_float32(greedy):
    ref, got = greedy["float32"], greedy["bfloat16"]
    identical = sum(a == b for a, b in zip(got, ref))
    prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(b)) for a, b in zip(got, ref)]
    assert identical >= 6, prefix
    assert sum(prefix) / len(prefix) >= 24, prefix


# bfloat16 has no quantizer and is asserted at what it measured. fp8 gets three points of room:
# on 372 positions its agreement moved with rounding-level changes (0.9409 to 0.9113 when the
# quantizer's 448 / absmax became a true division). w8a8 gets ~two: 0.96 still fails per-token
# activation scales (0.9543), which the 64-channel groups replaced.
# On a CPU without AVX-512 BF16 the bfloat16 linears run on torch's kernels, which round
# differently: 0.9866 measured there (an AMD EPYC without AVX-512), so 0.98 on that path.
@pytest.mark.parametrize("dtype,threshold,torch_threshold", [("bfloat16", 0.99, 0.98), ("w8a8", 0.96, 0.96),
                                                             ("fp8", 0.88, 0.88)])
def test_next_token_top1_agrees_with_float32(engines, greedy, dtype, threshold, torch_threshold):
    """Teacher-forced on prompt + float32's own continuation: argmax equal to float32's."""
    if not qgemm_built():
        threshold = torch_threshold
    tok = engines["float32"].tokenizer
    seqs = [tok.encode(p) + out for p, out in zip(PROMPTS, greedy["float32"])]
    ref = forward_logits(engines["float32"], seqs, all_rows=True)
    got = forward_logits(engines[dtype], seqs, all_rows=True)
    agree = sum(int((r.argmax(-1) == g.argmax(-1)).sum()) for r, g in zip(ref, got))
    n = sum(len(s) for s in seqs)
    assert n == 372 and agree / n >= threshold, agree / n
    assert all(torch.isfinite(g).all() for g in got)
