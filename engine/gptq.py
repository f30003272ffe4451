"""GPTQ (Frantar et al. 2022): error-compensating rounding of a linear's weights onto a fixed grid.

For a linear y = x W^T with calibration inputs X, the output error of a rounded Q is
||X W^T - X Q^T||^2 = sum_n (W_n - Q_n) H (W_n - Q_n)^T with H = X^T X. GPTQ rounds the columns
one at a time and, after each, moves its rounding error onto the columns not yet rounded along
the inverse Hessian (its upper Cholesky factor U: column i's error e_i / U_ii times row i of U),
the optimal correction of the remaining weights (Optimal Brain Surgeon); updates to columns past
the current block of `block` columns are made lazily, once a block. H is dampened by `damp`
times its mean diagonal.

The grid is that of `engine.quant`'s forms, so the result loads and runs exactly as a
round-to-nearest weight does: only which code each weight gets changes.

* ``"e4m3"``: E4M3 codes with an absmax scale per row and per `group` columns (fp8b): each
  group's scale is taken when its first column is reached, from the weights as updated so far
  (`static_groups` False, GPTQ's group mode), or beforehand from the original weights.
* ``"int8"``: int8 codes, symmetric (absmax / 127), with a scale per row (group 0) or per group.

With a diagonal H no error moves and the codes are round-to-nearest's bit for bit (the
quantizers of engine/quant.py: the same multiply by qmax / absmax, the same rounding).
"""
from __future__ import annotations

import torch

from engine.quant import FP8_MAX, INT8_MAX

GRIDS = {"e4m3": FP8_MAX, "int8": INT8_MAX}
BLOCK = 128
DAMP = 0.3
STATIC_GROUPS = False
ACT_ORDER = True


def _round(v: torch.Tensor, grid: str) -> torch.Tensor:
    """`v` (already divided by its scale) to the nearest code, as float."""
    if grid == "e4m3":
        return v.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    return torch.round(v).clamp_(-INT8_MAX, INT8_MAX)


def _inv_scales(w: torch.Tensor, qmax: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(qmax / absmax, absmax / qmax) of each row of `w` [..., g] over its last axis; 0 and 0
    where the row is all zeros (as engine.quant's quantizers)."""
    amax = w.abs().amax(dim=-1)
    inv = torch.where(amax > 0, torch.full_like(amax, qmax) / amax, torch.zeros_like(amax))
    return inv, amax / qmax


def hessian_inverse_factor(h: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """The upper Cholesky factor of (H + damp * mean(diag H) * I)^-1 of each H [..., K, K], in
    float64 (dead inputs, diag 0, get 1 on the diagonal first)."""
    H = h.double().clone()
    d = H.diagonal(dim1=-2, dim2=-1)
    d[d == 0] = 1.0
    d.add_(damp * d.mean(dim=-1, keepdim=True))
    L = torch.linalg.cholesky(H)
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def gptq(w: torch.Tensor, h: torch.Tensor, *, grid: str = "e4m3", group: int = 32, block: int = BLOCK,
         damp: float = DAMP, static_groups: bool = False, act_order: bool = False
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """`w` [N, K] rounded onto `grid` with GPTQ for the Hessian `h` [K, K] (X^T X of its inputs,
    any positive multiple): (codes [N, K] -- float8_e4m3fn or int8 --, scales [N, K / g] float32;
    [N] for int8 with `group` 0). `group` not dividing K (or 0) means one scale a row.
    `act_order`: round columns in descending order of diag H (scales then static)."""
    codes, scale = gptq_batch(w.unsqueeze(0), h.unsqueeze(0), grid=grid, group=group, block=block, damp=damp,
                              static_groups=static_groups, act_order=act_order)
    return codes[0], scale[0]


def gptq_batch(w: torch.Tensor, h: torch.Tensor, *, grid: str = "e4m3", group: int = 32, block: int = BLOCK,
               damp: float = DAMP, static_groups: bool = False, act_order: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """`gptq` of B independent linears of one shape at once, w [B, N, K] with h [B, K, K] (the
    same column loop for all: B times fewer Python steps)."""
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {', '.join(GRIDS)}, got {grid!r}")
    qmax = GRIDS[grid]
    W = w.float().clone()
    B, N, K = W.shape
    if h.shape != (B, K, K):
        raise ValueError(f"Hessians {tuple(h.shape)} do not match {B} weights of {K} columns")
    g = group if group and K % group == 0 else K
    diag = h.diagonal(dim1=-2, dim2=-1)
    W.masked_fill_((diag == 0).unsqueeze(1), 0.0)  # inputs that are never nonzero: nothing to keep
    if act_order:
        perm = torch.argsort(diag, dim=-1, descending=True, stable=True)
    else:
        perm = torch.arange(K).expand(B, K)
    static = static_groups or act_order or block % g != 0
    inv = torch.zeros(B, N, K // g)
    scale = torch.zeros(B, N, K // g)
    if static:
        inv, scale = _inv_scales(W.view(B, N, K // g, g), qmax)
        # each (permuted) column's own, for the loop
        cols = perm.unsqueeze(1).expand(B, N, K)
        inv_col = inv.repeat_interleave(g, dim=2).gather(2, cols)
        scale_col = scale.repeat_interleave(g, dim=2).gather(2, cols)
    # columns as rows from here on ([B, K, N]): each step reads and updates contiguous memory
    WT = W.gather(2, perm.unsqueeze(1).expand(B, N, K)).transpose(1, 2).contiguous()
    if static:
        inv_col, scale_col = inv_col.transpose(1, 2).contiguous(), scale_col.transpose(1, 2).contiguous()
    hp = h.gather(1, perm.unsqueeze(2).expand(B, K, K)).gather(2, perm.unsqueeze(1).expand(B, K, K))
    U = hessian_inverse_factor(hp, damp).float()
    UT = U.transpose(1, 2).contiguous()  # UT[:, j, i] = U[:, i, j]
    QT = torch.zeros(B, K, N)  # the codes, as float, in the permuted order
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = WT[:, i1:i2]  # (a view: updated in place)
        E1 = torch.zeros(B, i2 - i1, N)
        for i in range(i2 - i1):
            col = i1 + i
            if static:
                ic, sc = inv_col[:, col], scale_col[:, col]
            else:
                j = col // g
                if col % g == 0:  # the group's scale from the weights as updated so far
                    inv[:, :, j], scale[:, :, j] = _inv_scales(W1[:, i:i + g].transpose(1, 2), qmax)
                ic, sc = inv[:, :, j], scale[:, :, j]
            w_col = W1[:, i]
            q = _round(w_col * ic, grid)
            QT[:, col] = q
            err = (w_col - q * sc) / U[:, col, col].unsqueeze(1)
            E1[:, i] = err
            if i + 1 < i2 - i1:  # the block's later columns take this one's error now
                W1[:, i + 1:].baddbmm_(UT[:, col + 1:i2, col:col + 1], err.unsqueeze(1), alpha=-1)
        if i2 < K:  # the columns after the block, once a block
            WT[:, i2:].baddbmm_(UT[:, i2:, i1:i2], E1, alpha=-1)
    codes = torch.empty(B, N, K).scatter_(2, perm.unsqueeze(1).expand(B, N, K), QT.transpose(1, 2))
    codes = codes.to(torch.float8_e4m3fn) if grid == "e4m3" else codes.to(torch.int8)
    if grid == "int8" and not group:
        return codes, scale[:, :, 0].contiguous()
    return codes, scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 weight that `gptq`'s codes and scales stand for."""
    N, K = codes.shape
    s = scale.reshape(N, -1)
    return (codes.float().view(N, s.shape[1], -1) * s.unsqueeze(2)).view(N, K)
