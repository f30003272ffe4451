"""fp8b (engine/quant.py FP8_LINEAR, fp8's form): E4M3 weights with a scale per row and per 32 input
channels, bfloat16 activations; the torch reference, the loader's form and the engine."""
from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.quant import FP8_GROUP, FP8_LINEAR, QLinear, quantize_fp8_groups, quantize_fp8_rows, recipe_variant
from engine.sampling import SamplingParams
from tests.engine.test_quant_kernels import rand


def test_group_quantizer_is_the_row_quantizer_on_each_group():
    w = rand(6, 96, seed=3)
    q, s = quantize_fp8_groups(w, 32)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (6, 3)
    for g in range(3):
        qg, sg = quantize_fp8_rows(w[:, g * 32:(g + 1) * 32])
        assert torch.equal(q[:, g * 32:(g + 1) * 32].float(), qg.float()) and torch.equal(s[:, g], sg)


def test_make_groups_by_fp8_group_and_reads_the_group_back_from_the_scales():
    lin = QLinear.make("fp8b", rand(40, 576, seed=1))
    assert FP8_GROUP == 32 and lin.w_group == 32 and lin.scale.shape == (40, 18)
    assert lin.nbytes == 40 * 576 + 40 * 18 * 4
    again = QLinear.make("fp8b", lin.weight, lin.scale)
    assert again.w_group == 32 and torch.equal(again.dequantized(), lin.dequantized())
    assert QLinear.make("fp8b", rand(8, 100)).w_group == 100  # 32 does not divide K: one scale a row
    with pytest.raises(ValueError, match=r"fp8b scales must be \[N, K / group\], got \(8,\)"):
        QLinear.make("fp8b", lin.weight[:8], lin.scale[:8, 0])
    fused = QLinear.cat([lin, QLinear.make("fp8b", rand(24, 576, seed=2))])
    assert fused.weight.shape == (64, 576) and fused.scale.shape == (64, 18) and fused.w_group == 32


def test_reference_is_bf16_activations_times_the_dequantized_weight():
    lin = QLinear.make("fp8b", rand(48, 192, seed=5, scale=0.05))
    x = rand(7, 192, seed=6)
    want = x.to(torch.bfloat16).double() @ lin.dequantized().double().t()
    torch.testing.assert_close(lin.reference(x).double(), want, rtol=1e-5, atol=1e-5)


def test_group_scales_lower_the_weight_error():
    """Each block's largest weight maps to 448 exactly and the rest keep E4M3's relative
    precision, so the squared error falls below the per-row form's (0.845x measured here)."""
    w = rand(64, 576, seed=7, scale=0.05)
    err = {f: (QLinear.make(f, w).dequantized() - w).pow(2).sum().item() for f in ("fp8", "fp8b")}
    assert err["fp8b"] < 0.9 * err["fp8"], err


def test_fp8_is_fp8b_and_keeps_the_per_row_form_as_a_variant(tiny_model_dir):
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    assert FP8_LINEAR == "fp8b"
    eng = LLMEngine(tiny_model_dir, EngineConfig(num_blocks=32, dtype="fp8"))
    model = eng.runner.model
    assert {q.form for q in model.linears()[:-1]} == {"fp8b"} and model.lm_head.form == "bf16"
    assert {q.w_group for q in model.linears()[:-1]} == {32}
    with recipe_variant("fp8", linear="fp8"):
        plain = LLMEngine(tiny_model_dir, EngineConfig(num_blocks=32, dtype="fp8"))
    assert {q.form for q in plain.runner.model.linears()[:-1]} == {"fp8"}
    assert len(eng.generate([list(range(100, 140))], params)[0]) == 6
