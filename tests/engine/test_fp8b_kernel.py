"""The fp8b form's C++ kernel (engine/csrc/qgemm.cpp fp8b_linear: E4M3 weights with a scale per
row and per group of input columns, bfloat16 activations) against its torch reference, and the
model's fused path using it."""
from __future__ import annotations

import pytest
import torch

from engine.quant import QLinear, quantize_fp8_groups
from tests.engine.test_quant_kernels import ROWS, SHAPES, ck, rand  # noqa: F401  (ck: the kernels fixture)


@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("M", ROWS)
def test_fp8b_linear_matches_reference(ck, M, N, K):  # noqa: F811
    w = rand(N, K, seed=N, scale=0.05)
    w[:, : K // 2] *= 40  # groups of very different magnitudes in one row: the per-group scales matter
    lin = QLinear.make("fp8b", w)
    assert lin.w_group == (32 if K % 32 == 0 else K)
    x = rand(M, K, seed=M)
    ref = lin.reference(x)
    got = ck.fp8b_linear(x, lin.weight.view(torch.uint8), lin.scale)
    # the same exact products (bf16 x E4M3), group sums scaled, summed in another order
    assert (got - ref).abs().max().item() < 1e-5 * ref.abs().max().item()


def test_fp8b_linear_takes_groups_of_any_multiple_of_32(ck):  # noqa: F811
    w = rand(48, 256, seed=3, scale=0.05)
    x = rand(3, 256, seed=4)
    for g in (32, 64, 128, 256):
        codes, scale = quantize_fp8_groups(w, g)
        lin = QLinear.make("fp8b", codes, scale)
        assert lin.w_group == g
        got = ck.fp8b_linear(x, lin.weight.view(torch.uint8), lin.scale)
        ref = lin.reference(x)
        assert (got - ref).abs().max().item() < 1e-5 * ref.abs().max().item()


def test_fp8b_linear_rejects_bad_scales(ck):  # noqa: F811
    lin = QLinear.make("fp8b", rand(16, 64, seed=1))
    x = rand(1, 64)
    with pytest.raises(RuntimeError, match="ws must be"):
        ck.fp8b_linear(x, lin.weight.view(torch.uint8), lin.scale[:, :1].contiguous().repeat(1, 3))
    with pytest.raises(RuntimeError, match="ws must be"):
        ck.fp8b_linear(x, lin.weight.view(torch.uint8), lin.scale[:8].contiguous())


def test_tiny_model_fp8b_fused_path_uses_the_kernel_and_matches_the_torch_path(ck, tiny_model_dir, monkeypatch):  # noqa: F811
    from engine import cpu_kernels
    from engine.attention import AttentionMetadata, PrefillChunk
    from engine.config import EngineConfig
    from engine.engine import LLMEngine
    from engine.quant import recipe_variant

    with recipe_variant("fp8", linear="fp8b"):
        eng = LLMEngine(tiny_model_dir, EngineConfig(num_blocks=16, dtype="fp8"))
    model, kv = eng.runner.model, eng.kv
    calls = []
    real = cpu_kernels.kernels()

    class Counting:
        def __getattr__(self, name):
            if name == "fp8b_linear":
                calls.append(name)
            return getattr(real, name)

    T = 20
    ids = torch.arange(100, 100 + T)
    meta = AttentionMetadata(torch.arange(T) // 16, torch.arange(T) % 16, None, [PrefillChunk(0, T, torch.arange(2), T)])
    rows = torch.arange(T)
    monkeypatch.setattr(cpu_kernels, "kernels", lambda: Counting())
    fused = model.forward(ids, torch.arange(T), meta, kv, rows)
    assert len(calls) == 4 * model.cfg.num_layers  # qkv, o, gate_up, down of every layer
    monkeypatch.setattr(cpu_kernels, "kernels", lambda: None)
    ref = model.forward(ids, torch.arange(T), meta, kv, rows)
    assert (fused - ref).abs().max().item() < 3e-2 * ref.abs().max().item()
