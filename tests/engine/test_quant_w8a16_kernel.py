"""The "w8a16" form (int8 weights per row x int16 activations per token: w8a8's LM head option
`lm_head="w8a16"`) and its C++ kernel (engine/csrc/qgemm.cpp w8a16_linear) against the exact
torch reference, and the tiny model with that head."""
from __future__ import annotations

import pytest
import torch

from engine import cpu_kernels, quant_calib
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.model import _fused_linear
from engine.quant import ACT_BITS, QLinear, int8_row_sums, quantize_int8_rows, quantize_int16_rows, recipe_variant
from engine.sampling import SamplingParams
from tests.engine.test_quant_kernels import ck, rand  # noqa: F401  (ck: the kernels fixture)


def test_int16_row_quantizer_codes_and_scales():
    x = torch.tensor([[0.5, -1.0, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0], [3.0, 1.5, -0.75, 1e-4]])
    q, s = quantize_int16_rows(x)
    assert q.dtype == torch.int16 and s.dtype == torch.float32
    # 16383.5 -> 16384 (half to even), 8191.75 -> 8192; 1e-4 * 32767 / 3 = 1.09 -> 1
    assert q.tolist() == [[16384, -32767, 8192, 0], [0, 0, 0, 0], [32767, 16384, -8192, 1]]
    assert s.tolist() == pytest.approx([1 / 32767, 0.0, 3 / 32767])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("N,K", [(10, 64), (4099, 576), (576, 1536), (7, 128)])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 17, 65])
def test_w8a16_linear_matches_reference_exactly(ck, M, N, K, threads):  # noqa: F811
    lin = QLinear.make("w8a16", rand(N, K, seed=N, scale=0.05))
    assert lin.weight.dtype == torch.int8 and torch.equal(lin.row_sums, int8_row_sums(lin.weight))
    x = rand(M, K, seed=M)
    x[0, 3] = 40.0  # an outlier channel: int16 keeps the rest of the row fine
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = ck.w8a16_linear(x, lin.weight, lin.scale, lin.row_sums)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(got, lin.reference(x))


def test_w8a16_linear_is_exact_at_the_extremes_of_both_operands(ck):  # noqa: F811
    """Codes of -128 (which the quantizer never makes, but a stored matrix may hold), +-32767
    activations and negative codes whose low byte is 0 or 0xFF: the split into bytes loses nothing."""
    K = 128
    codes = torch.full((3, K), -128, dtype=torch.int8)
    codes[1] = 127
    codes[2, ::2] = -1
    lin = QLinear.make("w8a16", codes, torch.tensor([1.0, 0.5, 2.0]))
    x = torch.ones(4, K)
    x[1] = -1.0
    x[2, ::3] = -256 / 32767  # code -256: low byte 0
    x[2, 1] = 1.0
    x[3, 1::2] = -1.0  # alternating +-32767
    got = ck.w8a16_linear(x, lin.weight, lin.scale, lin.row_sums)
    xq, xs = quantize_int16_rows(x)
    exact = xq.long() @ codes.long().t()  # int64: the true sums
    assert torch.equal(got, exact.float() * xs.unsqueeze(1) * lin.scale)
    assert got[0, 0].item() == pytest.approx(-128 * K, rel=1e-6)
    assert torch.equal(got, lin.reference(x))


def test_w8a16_is_closer_to_fp32_than_int8_activations(ck):  # noqa: F811
    """Same int8 weights; int16 activations err ~256x less than int8 ones."""
    w = rand(256, 576, seed=5, scale=0.05)
    x = rand(8, 576, seed=6)
    x[:, 7] = 30.0
    w16, w8 = QLinear.make("w8a16", w), QLinear.make("int8", w)
    exact = x.double() @ w16.dequantized().double().t()
    e16 = (ck.w8a16_linear(x, w16.weight, w16.scale, w16.row_sums).double() - exact).abs().max().item()
    e8 = (ck.int8_linear(x, w8.weight, w8.scale, w8.row_sums).double() - exact).abs().max().item()
    assert e16 < e8 / 50


def test_quantize_state_marks_a_w8a16_head():
    w = {"model.embed_tokens.weight": rand(50, 64, seed=1), "model.norm.weight": torch.ones(64),
         "model.layers.0.mlp.down_proj.weight": rand(64, 128, seed=2)}
    out = quant_calib.quantize_state(w, lm_head="w8a16")
    codes, scale = quantize_int8_rows(w["model.embed_tokens.weight"])
    assert torch.equal(out["model.embed_tokens.weight"], codes)
    assert torch.equal(out["model.embed_tokens.weight_scale"], scale)
    assert out["model.embed_tokens.weight" + ACT_BITS].item() == 16
    assert "model.layers.0.mlp.down_proj.weight" + ACT_BITS not in out  # the layers stay int8 x int8
    assert ("model.embed_tokens.weight" + ACT_BITS) not in quant_calib.quantize_state(w, lm_head="int8")


def test_w8a16_head_engine_uses_the_kernel_and_generates_like_the_torch_path(tiny_model_dir, tmp_path, monkeypatch,
                                                                            ck):  # noqa: F811
    monkeypatch.setenv("HALFMOON_CACHE", str(tmp_path))
    with recipe_variant("w8a8", lm_head="w8a16"):
        eng = LLMEngine(tiny_model_dir, EngineConfig(num_blocks=32, dtype="w8a8"))
    model = eng.runner.model
    head, emb = model.lm_head, model.embed
    assert (head.form, head.weight.dtype, head.act_group) == ("w8a16", torch.int8, 0)
    assert head.weight is emb.weight and emb.scale is not None  # tied: one int8 table
    assert model.layers[0].qkv.form == "int8" and model.layers[0].qkv.act_group == 64
    x = rand(3, 64, seed=9)
    assert torch.equal(_fused_linear(ck, x, head, skinny=True), head.reference(x))
    # a head of 1/2 the bf16 head's bytes (+ a scale and a row sum per row)
    V = eng.model_config.vocab_size
    assert head.nbytes == V * 64 + V * 8

    calls = []
    real = cpu_kernels.kernels()

    class Counting:
        def __getattr__(self, name):
            if name == "w8a16_linear":
                calls.append(name)
            return getattr(real, name)

    params = SamplingParams(max_tokens=8, ignore_eos=True)
    prompt = [list(range(100, 140))]
    monkeypatch.setattr(cpu_kernels, "kernels", lambda: Counting())
    fused = eng.generate(prompt, params)[0]
    assert len(calls) == 8  # one head call a sampled token
    monkeypatch.setattr(cpu_kernels, "kernels", lambda: None)
    ref = eng.generate(prompt, params)[0]
    assert fused == ref and len(fused) == 8
