"""The "w8a16" form (int8 weights with a scale per row and per 32 input columns x int16
activations per token: w8a8's LM head option `lm_head="w8a16"`) and its C++ kernel
(engine/csrc/qgemm.cpp w8a16_linear) against the torch reference, and the tiny model with that head."""
from __future__ import annotations

import pytest
import torch

from engine import cpu_kernels, quant_calib
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.model import _fused_linear
from engine.quant import ACT_BITS, QLinear, quantize_int8_groups, quantize_int16_rows, recipe_variant
from engine.sampling import SamplingParams
from tests.engine.test_quant_kernels import ck, rand  # noqa: F401  (ck: the kernels fixture)


def test_int16_row_quantizer_codes_and_scales():
    x = torch.tensor([[0.5, -1.0, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0], [3.0, 1.5, -0.75, 1e-4]])
    q, s = quantize_int16_rows(x)
    assert q.dtype == torch.int16 and s.dtype == torch.float32
    # 16383.5 -> 16384 (half to even), 8191.75 -> 8192; 1e-4 * 32767 / 3 = 1.09 -> 1
    assert q.tolist() == [[16384, -32767, 8192, 0], [0, 0, 0, 0], [32767, 16384, -8192, 1]]
    assert s.tolist() == pytest.approx([1 / 32767, 0.0, 3 / 32767])


def test_w8a16_form_scales_each_32_columns():
    w = rand(6, 128, seed=1, scale=0.05)
    w[:, :32] *= 50  # one block of large weights: the others keep their own, finer scales
    lin = QLinear.make("w8a16", w)
    codes, scale = quantize_int8_groups(w, 32)
    assert lin.w_group == 32 and torch.equal(lin.weight, codes) and torch.equal(lin.scale, scale)
    assert lin.row_sums is None and lin.nbytes == 6 * 128 + 6 * 4 * 4
    err = (lin.dequantized() - w).abs().view(6, 4, 32) / w.abs().view(6, 4, 32).amax(-1, keepdim=True)
    assert err.max().item() <= 1 / 254 * 1.0001
    assert QLinear.make("w8a16", rand(4, 48)).w_group == 48  # 32 does not divide K: one group a row


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("N,K", [(10, 64), (4099, 576), (576, 1536), (7, 128)])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 17, 65])
def test_w8a16_linear_matches_reference(ck, M, N, K, threads):  # noqa: F811
    w = rand(N, K, seed=N, scale=0.05)
    w[:, 32:64] *= 30  # groups of very different magnitudes in one row
    lin = QLinear.make("w8a16", w)
    x = rand(M, K, seed=M)
    x[0, 3] = 40.0  # an outlier channel: int16 keeps the rest of the row fine
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = ck.w8a16_linear(x, lin.weight, lin.scale)
    finally:
        torch.set_num_threads(old)
    ref = lin.reference(x)
    # the same exact group sums, scaled and summed in fp32 in another order
    assert (got - ref).abs().max().item() < 2e-6 * ref.abs().max().item()


@pytest.mark.parametrize("g", [32, 64, 128])
def test_w8a16_linear_is_exact_at_the_extremes_of_both_operands(ck, g):  # noqa: F811
    """Codes of -128 (which the quantizer never makes, but a stored matrix may hold) and 127
    against activation codes +-32767, -256 (low byte 0), -1 (low byte 0xFF), 255 and -32768 + 1:
    the split into bytes loses nothing. Few nonzero activations a row keep every sum below 2^24,
    so with unit scales the result is the true integer sum."""
    K = 128
    codes = torch.full((3, K), -128, dtype=torch.int8)
    codes[1] = 127
    codes[2, ::2] = -1
    lin = QLinear.make("w8a16", codes, torch.ones(3, K // g))
    xq = torch.zeros(5, K, dtype=torch.int16)
    xq[0, 0], xq[0, 77] = 32767, -32767
    xq[1, 5], xq[1, 64], xq[1, 127] = -256, -1, 32767
    xq[2, 31], xq[2, 32] = 255, -32767
    xq[3, 1], xq[3, 2], xq[3, 100] = -32767, -32767, -32767
    xq[4, 10] = 1
    x = xq.float()
    x[:, 120] = torch.where(x.abs().amax(1) == 32767, x[:, 120], torch.tensor(32767.0))  # absmax 32767: scale 1
    xq, xs = quantize_int16_rows(x)
    assert torch.equal(xs, torch.ones(5))
    got = ck.w8a16_linear(x, lin.weight, lin.scale)
    exact = xq.long() @ codes.long().t()  # int64: the true sums
    assert exact.abs().max().item() < 2 ** 24
    assert torch.equal(got.long(), exact) and torch.equal(got, exact.float())


def test_w8a16_linear_rejects_bad_scales(ck):  # noqa: F811
    lin = QLinear.make("w8a16", rand(16, 64, seed=1))
    x = rand(1, 64)
    with pytest.raises(RuntimeError, match="ws must be"):
        ck.w8a16_linear(x, lin.weight, lin.scale[:, :1].contiguous().repeat(1, 3))  # groups of 21.3
    with pytest.raises(RuntimeError, match="ws must be"):
        ck.w8a16_linear(x, lin.weight, lin.scale[:8].contiguous())


def test_w8a16_is_closer_to_fp32_than_int8_activations(ck):  # noqa: F811
    """Same int8 weights (per row); int16 activations err far less than int8 ones."""
    w = rand(256, 576, seed=5, scale=0.05)
    x = rand(8, 576, seed=6)
    x[:, 7] = 30.0
    codes, scale = quantize_int8_groups(w, 576)
    w16, w8 = QLinear.make("w8a16", codes, scale), QLinear.make("int8", w)
    assert torch.equal(w16.weight, w8.weight)
    exact = x.double() @ w16.dequantized().double().t()
    e16 = (ck.w8a16_linear(x, w16.weight, w16.scale).double() - exact).abs().max().item()
    e8 = (ck.int8_linear(x, w8.weight, w8.scale, w8.row_sums).double() - exact).abs().max().item()
    assert e16 < e8 / 50


def test_quantize_state_marks_a_w8a16_head():
    w = {"model.embed_tokens.weight": rand(50, 64, seed=1), "model.norm.weight": torch.ones(64),
         "model.layers.0.mlp.down_proj.weight": rand(64, 128, seed=2)}
    out = quant_calib.quantize_state(w, lm_head="w8a16")
    codes, scale = quantize_int8_groups(w["model.embed_tokens.weight"], 32)
    # the tied head is untied: int8 per 32 columns under lm_head.weight, the embedding table in bfloat16
    assert torch.equal(out["lm_head.weight"], codes)
    assert torch.equal(out["lm_head.weight_scale"], scale)
    assert out["lm_head.weight" + ACT_BITS].item() == 16
    assert torch.equal(out["model.embed_tokens.weight"], w["model.embed_tokens.weight"].bfloat16())
    assert "model.embed_tokens.weight_scale" not in out
    assert "model.layers.0.mlp.down_proj.weight" + ACT_BITS not in out  # the layers stay int8 x int8
    assert not any(k.endswith(ACT_BITS) for k in quant_calib.quantize_state(w, lm_head="int8"))
    head = rand(50, 64, seed=3)  # an untied model's own head is the one quantized
    untied = quant_calib.quantize_state(w | {"lm_head.weight": head}, lm_head="w8a16")
    assert torch.equal(untied["lm_head.weight"], quantize_int8_groups(head, 32)[0])


def test_w8a16_head_engine_uses_the_kernel_and_generates_like_the_torch_path(tiny_model_dir, tmp_path, monkeypatch,
                                                                            ck):  # noqa: F811
    monkeypatch.setenv("HALFMOON_CACHE", str(tmp_path))
    with recipe_variant("w8a8", lm_head="w8a16"):
        eng = LLMEngine(tiny_model_dir, EngineConfig(num_blocks=32, dtype="w8a8"))
    model = eng.runner.model
    head, emb = model.lm_head, model.embed
    assert (head.form, head.weight.dtype, head.act_group) == ("w8a16", torch.int8, 0)
    assert emb.weight.dtype == torch.bfloat16 and emb.scale is None  # the embedding rows stay bf16
    assert model.layers[0].qkv.form == "int8" and model.layers[0].qkv.act_group == 64
    x = rand(3, 64, seed=9)
    ref = head.reference(x)
    assert (_fused_linear(ck, x, head, skinny=True) - ref).abs().max().item() < 2e-6 * ref.abs().max().item()
    # a head of 1/2 the bf16 head's bytes, + a scale per 32 columns (64 hidden: 2 a row)
    V = eng.model_config.vocab_size
    assert head.nbytes == V * 64 + V * 2 * 4 and head.w_group == 32

    calls = []
    real = cpu_kernels.kernels()

    class Counting:
        def __getattr__(self, name):
            if name in ("w8a16_linear", "decode_step", "decode_region"):
                calls.append(name)
            return getattr(real, name)

    params = SamplingParams(max_tokens=8, ignore_eos=True)
    prompt = [list(range(100, 140))]
    monkeypatch.setattr(cpu_kernels, "kernels", lambda: Counting())
    fused = eng.generate(prompt, params)[0]
    # the prefill's head call, then 7 decode steps in one C++ call (one parallel region) each, the head inside
    assert calls == ["w8a16_linear"] + ["decode_region"] * 7
    monkeypatch.setattr(cpu_kernels, "kernels", lambda: None)
    ref = eng.generate(prompt, params)[0]
    assert fused == ref and len(fused) == 8
