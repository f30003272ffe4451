"""w8a8 with activations scaled per token and per 64 input channels (`EngineConfig.act_group`,
the default): the quantizer, the VNNI kernel (engine/csrc/qgemm.cpp int8_group_linear) against
the torch reference, and what it buys on an outlier channel."""
from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.quant import QLinear, quantize_int8_groups, quantize_int8_rows
from tests.engine.test_quant_kernels import ROWS, SHAPES, ck, rand  # noqa: F401 (ck: the kernels fixture)


def test_group_quantizer_is_the_row_quantizer_on_each_group():
    x = rand(3, 192, seed=4)
    q, s = quantize_int8_groups(x, 64)
    assert q.shape == (3, 192) and s.shape == (3, 3)
    for g in range(3):
        qg, sg = quantize_int8_rows(x[:, g * 64:(g + 1) * 64])
        assert torch.equal(q[:, g * 64:(g + 1) * 64], qg) and torch.equal(s[:, g], sg)


def test_reference_is_the_float64_sum_of_group_products():
    lin = QLinear.make("int8", rand(48, 192, seed=1, scale=0.05), act_group=64)
    assert lin.act_group == 64 and lin.row_sums is None  # the grouped kernel needs no weight sums
    x = rand(4, 192, seed=2)
    xq, xs = quantize_int8_groups(x, 64)
    acc = torch.einsum("mgk,ngk->mng", xq.view(4, 3, 64).double(), lin.weight.view(48, 3, 64).double())
    want = (acc * xs.double().unsqueeze(1)).sum(-1) * lin.scale.double()
    torch.testing.assert_close(lin.reference(x).double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("M", ROWS)
def test_int8_group_linear_matches_reference(ck, M, N, K):
    lin = QLinear.make("int8", rand(N, K, seed=N, scale=0.05), act_group=64)
    x = rand(M, K, seed=M)
    x[0, 3] = 40.0
    got = ck.int8_group_linear(x, lin.weight, lin.scale, 64)
    ref = lin.reference(x)
    # the group sums are exact on both sides; only the fp32 sum over groups differs in order
    assert (got - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def test_int8_group_linear_takes_wider_groups(ck):
    lin = QLinear.make("int8", rand(40, 1536, seed=3, scale=0.05), act_group=128)
    x = rand(5, 1536, seed=5)
    ref = lin.reference(x)
    got = ck.int8_group_linear(x, lin.weight, lin.scale, 128)
    assert (got - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    with pytest.raises(RuntimeError, match="group must be a multiple of 64 dividing K"):
        ck.int8_group_linear(x, lin.weight, lin.scale, 96)


def test_groups_confine_an_outlier_channel_to_its_group():
    """One large activation channel sets the scale of its 64-channel group only: the error
    against the exact fp32 product falls well below per-token scaling's."""
    w = rand(256, 576, seed=7, scale=0.05)
    x = rand(16, 576, seed=8)
    x[:, 5] = 60.0
    exact = x @ QLinear.make("int8", w).dequantized().t()
    err = {g: (QLinear.make("int8", w, act_group=g).reference(x) - exact).pow(2).mean().item() for g in (0, 64)}
    assert err[64] < err[0] / 4, err


def test_act_group_falls_back_to_per_token_where_it_does_not_divide_k():
    assert QLinear.make("int8", rand(8, 576), act_group=128).act_group == 0
    assert QLinear.make("int8", rand(8, 576), act_group=64).act_group == 64
    assert QLinear.make("fp8", rand(8, 576), act_group=64).act_group == 0


def test_engine_act_group_reaches_every_int8_linear(tiny_model_dir, ck):
    grouped = LLMEngine(tiny_model_dir, EngineConfig(num_blocks=16, dtype="w8a8"))
    per_token = LLMEngine(tiny_model_dir, EngineConfig(num_blocks=16, dtype="w8a8", act_group=0))
    int8 = lambda e: [q for q in e.runner.model.linears() if q.form == "int8"]  # noqa: E731
    assert int8(grouped) and {q.act_group for q in int8(grouped)} == {64}
    assert {q.act_group for q in int8(per_token)} == {0}
    with pytest.raises(ValueError, match="engine.act_group must be >= 0"):
        LLMEngine(tiny_model_dir, EngineConfig(act_group=-1))
