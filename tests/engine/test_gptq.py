"""engine/gptq.py: GPTQ's error-compensating rounding onto the fp8b (E4M3 per row and 32 columns)
and int8 grids."""
from __future__ import annotations

import pytest
import torch

from engine.gptq import dequantize, gptq, gptq_batch
from engine.quant import FP8_MAX, QLinear, quantize_fp8_groups, quantize_int8_rows


def correlated_inputs(m: int, k: int, seed: int) -> torch.Tensor:
    """Inputs with correlated channels of unequal size (what makes error feedback pay)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(k) + 0.5 * torch.randn(k, k, generator=g) / k ** 0.5
    return (torch.randn(m, k, generator=g) @ mix) * (0.2 + 3 * torch.rand(k, generator=g))


def weights(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


def out_err(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    return float((x.double() @ (w.double() - q.double()).t()).norm())


@pytest.mark.parametrize("kw", [{}, {"static_groups": True}, {"act_order": True}, {"damp": 0.3, "act_order": True}])
def test_gptq_lowers_the_output_error_below_round_to_nearest_on_the_same_grid(kw):
    x, w = correlated_inputs(2048, 192, seed=1), weights(48, 192, seed=2)
    h = x.t() @ x
    rtn = QLinear.make("fp8b", w).dequantized()
    codes, scale = gptq(w, h, **kw)
    ratio = out_err(x, w, dequantize(codes, scale)) / out_err(x, w, rtn)
    assert ratio < 0.92, ratio  # measured 0.81-0.88


def test_gptq_lowers_the_int8_per_row_output_error_too():
    x, w = correlated_inputs(2048, 192, seed=3), weights(48, 192, seed=4)
    codes, scale = gptq(w, x.t() @ x, grid="int8", group=0)
    assert codes.dtype == torch.int8 and scale.shape == (48,)
    q, s = quantize_int8_rows(w)
    assert torch.equal(scale, s)  # one scale a row, from the original weights
    ratio = out_err(x, w, codes.float() * scale.unsqueeze(1)) / out_err(x, w, q.float() * s.unsqueeze(1))
    assert ratio < 0.92, ratio  # measured 0.883


@pytest.mark.parametrize("static", [False, True])
def test_every_code_is_an_e4m3_value_times_its_group_scale(static):
    x, w = correlated_inputs(1024, 128, seed=5), weights(40, 128, seed=6)
    codes, scale = gptq(w, x.t() @ x, static_groups=static)
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == (40, 128) and scale.shape == (40, 4)
    c = codes.float()
    assert torch.isfinite(c).all() and c.abs().max() <= FP8_MAX
    assert torch.equal(c.to(torch.float8_e4m3fn).float(), c)  # representable
    lin = QLinear.make("fp8b", codes, scale)  # what the loader builds: the kernel's operands as they are
    assert lin.w_group == 32 and torch.equal(lin.dequantized(), dequantize(codes, scale))
    if static:  # the scales of round-to-nearest, only the codes differ
        _, s = quantize_fp8_groups(w, 32)
        assert torch.equal(scale, s)
        assert not torch.equal(codes.float(), quantize_fp8_groups(w, 32)[0].float())


@pytest.mark.parametrize("kw", [{}, {"act_order": True}])
def test_a_diagonal_hessian_moves_no_error_and_gives_round_to_nearest_bit_for_bit(kw):
    x, w = correlated_inputs(512, 96, seed=7), weights(24, 96, seed=8)
    h = torch.diag((x * x).sum(0))
    codes, scale = gptq(w, h, **kw)
    q, s = quantize_fp8_groups(w, 32)
    assert torch.equal(codes.float(), q.float()) and torch.equal(scale, s)
    ci, si = gptq(w, h, grid="int8", group=0)
    qi, sii = quantize_int8_rows(w)
    assert torch.equal(ci, qi) and torch.equal(si, sii)


def test_a_batch_is_each_linear_on_its_own():
    xs = [correlated_inputs(512, 64, seed=s) for s in (9, 10, 11)]
    ws = [weights(16, 64, seed=s) for s in (12, 13, 14)]
    hs = torch.stack([x.t() @ x for x in xs])
    for kw in ({}, {"act_order": True}):
        codes, scale = gptq_batch(torch.stack(ws), hs, **kw)
        for b in range(3):
            c1, s1 = gptq(ws[b], hs[b], **kw)
            assert torch.equal(codes[b].float(), c1.float()) and torch.equal(scale[b], s1)


def test_dead_inputs_and_shape_checks():
    x, w = correlated_inputs(256, 64, seed=15), weights(8, 64, seed=16)
    x[:, 5] = 0
    codes, _ = gptq(w, x.t() @ x)
    assert torch.all(codes[:, 5].float() == 0)  # an input that is always 0 keeps nothing
    with pytest.raises(ValueError, match="does not match|do not match"):
        gptq(w, torch.eye(32))
    with pytest.raises(ValueError, match="grid must be one of e4m3, int8"):
        gptq(w, torch.eye(64), grid="int4")
