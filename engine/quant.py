"""Model dtypes (`EngineConfig.dtype`): how each weight is stored and how a linear layer computes.

=========  =======================================  =====================  ===========
dtype      layer linears (q/k/v, o, gate/up, down)  LM head and embedding  KV (auto)
=========  =======================================  =====================  ===========
float32    fp32                                     fp32                   float32
bfloat16   bf16 weights, inputs rounded to bf16     bf16                   bfloat16
w8a8       int8 per output channel x int8 per       head: int8 per row     bfloat16
           token and per 64 input channels          and 32 columns x int16
           (dynamic), SmoothQuant-smoothed          per token ("w8a16");
                                                    embedding: bf16
fp8        E4M3 per row and per 32 input channels   bf16                   bfloat16
           x bf16 activations ("fp8b"; "fp8": E4M3
           per row x E4M3 per token); emulated by
           upcast; codes chosen by GPTQ
           (calibrated, cached)
=========  =======================================  =====================  ===========

w8a8's activation groups (`EngineConfig.act_group`, 64 by default; 0 is SmoothQuant's plain
per-token scaling): each token's 64-channel slice gets its own int8 scale, so an outlier
channel coarsens only its own group; the int32 sum of each group is exact and scaled in fp32
(`int8_group_linear`). Against fp32 on 10,240 positions of Debian fortunes (bench.quality
--windows 20) w8a8's top-1 agreement went from 0.932 (per token) to 0.958, for ~5% more time in
the layer GEMMs at batch 1; the weights and their calibration are the same either way.
(192-channel groups measured 0.9525 where 64 gave 0.9557 in a fake-quant run on 1,536 positions.)

fp8 was E4M3 weights per output channel x E4M3 activations per token ("fp8"), and missed its
0.97 top-1 target (0.900 on 10,240 positions); fp8b misses it too. Where the loss is (bench.quality --study fp8, fake-quant
on the fp32 model with a bf16 LM head, 8 x 512 fortune tokens; the head alone: 0.9954):

    E4M3 W per row x E4M3 A per token (today)     0.902  KL 0.033
    fp32 W x E4M3 A per token                     0.939  KL 0.014   the activations' half
    E4M3 W per row x fp32 A / x bf16 A            0.922 / 0.923     bf16 activations cost nothing
    E4M3 W per row and 64 cols / 64x64 blocks     0.933 / 0.933     (x bf16 A)
    E4M3 W per row and 32 cols (fp8b) x bf16 A    0.937  KL 0.0145

    3-bit significand, exponent unlimited x fp32 A  0.925   E4M3's rounding without its range
    4-bit / 5-bit significand x fp32 A            0.963 / 0.981
    int8 W per row (no smoothing) x fp32 A        0.966
    E4M3 W per row in qkv / o / gate_up / down only  0.959 / 0.979 / 0.953 / 0.956  (x fp32 A)

(docs/results/quality_fp8_study.json; the weights' relative RMS error: E4M3 per row 2.63%,
per 32 columns 2.41%, 4 / 5 significand bits 1.33% / 0.68%, int8 per row 0.85%.)

E4M3 keeps 3 significand bits: every weight is off by up to 2^-4 of itself (~2.6% RMS over a
binade) whatever its scale, and rounding the significand alone, with no range limit and no
scale, loses the same (0.925), so the scales are not the loss; finer ones help only by making
each block's largest weight exact (448 x scale), which removes the largest absolute errors.
0.97 takes 5 significand bits on this model. int8 per row errs by absmax / 254 at most
(RMS absmax / 440), better than E4M3 for rows whose absmax / RMS is below ~12: here the median
row's is 3.4 and 99.9% are below 11.7 (the weights come from a Q4_1 GGUF, 16 levels a block).
`fp8b` (E4M3 weights with a scale per row and per `FP8_GROUP` = 32 input channels, bfloat16
activations; C++ kernel fp8b_linear) is the best of these and is fp8's form (`FP8_LINEAR`; "fp8"
keeps the E4M3 x E4M3 form), for 12.5% more weight bytes (a float32 scale per 32 codes).
Error feedback recovers part of it: GPTQ (engine/gptq.py; `Recipe.rounding` "gptq", the default)
chooses which E4M3 code each weight of the fp8b grid gets -- the same scales' form, bytes and
kernel -- so that each linear's output error over 16 x 512 calibration tokens of Python's help
text is smallest (engine.quant_calib.ensure_fp8, cached). On 8 x 512 fortune tokens (fp8 as the
engine runs it): round to nearest 0.9341 / KL 0.0145; GPTQ in column order with dampening 0.01
0.9333 / 0.0148 (group scales from the updated weights) and 0.9365 / 0.0141 (from the original
ones); in descending order of diag H ("act order", scales from the original weights) 0.9365 /
0.0132 at dampening 0.01, 0.9397 / 0.0118 at 0.1, 0.9446 / 0.0107 at 0.3 (the default), 0.9424 /
0.0109 at 1.0 (column order at 0.3: 0.9438 / 0.0120; `bench.quality --study gptq`). The heavy
dampening that wins says the calibration text's Hessians only partly describe other text; three
times the calibration (48 x 512) gains nothing (act order at 0.3: 0.9448 / 0.0108). At full size
(100 x 512 fortune tokens, 500 MMLU questions; docs/results/quality_fp8_gptq.json) fp8 with GPTQ
measured top-1 0.9437, KL 0.0095, perplexity 30.376 against round to nearest's 0.9346, 0.0128,
30.491 (fp32 30.176), MMLU unchanged (paired delta 0.0 both): better, and still short of 0.97.
(GPTQ of w8a8's smoothed int8 rows, act order, damp 0.3, a one-off measurement on 8 x 512:
0.9626 / KL 0.0048 against 0.9583 / 0.0052; w8a8 keeps round to nearest.)

Everything between the linears -- the residual stream, RMSNorm, RoPE, softmax, SiLU, the
matmul accumulators and outputs -- is fp32 in every dtype; the dtype names what is *stored*
(weights, KV) and what a linear multiplies. (The torch reference of bf16, which is also the
GPU path, rounds the GEMM output to bf16 as torch's bf16 GEMMs do; the CPU kernels keep it
fp32, since rounding logits to bf16 flips near-ties.)

fp8: no CPU here multiplies E4M3 natively; the E4M3 weights (and, in "fp8", activations) are
upcast and their products with the other operand computed exactly in fp32
(`engine/csrc/qgemm.cpp` and the torch reference below), so the numerics are those of an FP8
GEMM (fp8b: an FP8-weight, bf16-activation GEMM) with fp32 accumulation. No native FP8 GEMM path exists (no FP8 GPU was at hand to check one).

`QLinear.reference` is the torch reference of each form; `engine.model` runs the C++ kernels
where they exist, and the tests hold the kernels to this reference.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

DTYPES = ("float32", "bfloat16", "w8a8", "fp8")
KV_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
INT8_MAX = 127.0
INT16_MAX = 32767.0
# A stored int8 weight `<name>` with `<name>_act_bits` = 16 beside it is "w8a16" (int16
# activations), not "int8" (the layers' int8 activations): how a quantized cache says which.
ACT_BITS = "_act_bits"
FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass(frozen=True, slots=True)
class Recipe:
    """What `dtype` stores: the form of the layer linears and of the LM head / embedding."""

    dtype: str
    linear: str  # "f32" | "bf16" | "int8" | "fp8" | "fp8b"
    lm_head: str  # "f32" | "bf16" | "int8" | "w8a16"
    kv_dtype: str  # the KV cache's dtype when EngineConfig.kv_dtype is "auto"
    # fp8b's weights: "rtn" -- each rounded to its nearest code while loading -- or "gptq" -- the
    # codes chosen by GPTQ's error-compensating rounding (engine/gptq.py), calibrated once and
    # cached (engine.quant_calib.ensure_fp8). The same grid and scales, the same kernel.
    rounding: str = "rtn"


# w8a8's LM head and (tied) embedding: "bf16"; "int8" -- int8 per row, the head's activations
# per token and per `EngineConfig.act_group` channels like the layers (int8_group_linear), the
# embedding rows dequantized by their row scale; or "w8a16" -- the head alone int8 with a scale
# per row and per W8A16_GROUP columns x int16 activations per token (w8a16_linear), the
# embedding table kept in bf16. Both int8 forms halve the 56.6 MB the head adds to every decode
# step (the layers read 107 MB). On 20 x 512 fortune tokens (bench.quality) w8a8's top-1
# agreement with fp32 is 0.9576 with the bf16 head, 0.9569 with "w8a16", 0.947 with "int8"
# (engine/quant_calib.py), so "w8a16" it is.
W8A8_LM_HEAD = "w8a16"
# fp8's layer linears: "fp8b" (E4M3 weights with a scale per row and per FP8_GROUP input channels
# x bfloat16 activations: fp8b_linear) or "fp8" (E4M3 weights per output channel x E4M3
# activations per token: fp8_linear); top-1 agreement 0.937 against 0.902 (see above).
FP8_LINEAR = "fp8b"
FP8_GROUP = 32
FP8_ROUNDING = "gptq"  # fp8b's codes: "gptq" or "rtn" (Recipe.rounding)
ROUNDINGS = ("rtn", "gptq")
# w8a8's "w8a16" LM head: int8 weights with a scale per row and per this many input channels
# (the head of a Q4_1 GGUF has 16 levels a 32-column block: per 32 columns int8 keeps them to
# 0.14% RMS, per row 1.17%), int16 activations per token.
W8A16_GROUP = 32

RECIPES = {
    "float32": Recipe("float32", "f32", "f32", "float32"),
    "bfloat16": Recipe("bfloat16", "bf16", "bf16", "bfloat16"),
    "w8a8": Recipe("w8a8", "int8", W8A8_LM_HEAD, "bfloat16"),
    "fp8": Recipe("fp8", FP8_LINEAR, "bf16", "bfloat16", FP8_ROUNDING),
}


def recipe(dtype: str) -> Recipe:
    try:
        return RECIPES[dtype]
    except KeyError:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}") from None


@contextmanager
def recipe_variant(dtype: str, **changes: str) -> Iterator[Recipe]:
    """Within the block, models loaded in `dtype` follow its recipe with `changes` (e.g.
    ``lm_head="int8"``): how bench.quality measures a variant beside the default."""
    old = recipe(dtype)
    RECIPES[dtype] = replace(old, **changes)
    try:
        yield RECIPES[dtype]
    finally:
        RECIPES[dtype] = old


# --- quantizers (weights per output row, activations per token row) ------------------------

def quantize_int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: q = round(x * 127 / absmax) in [-127, 127], scale = absmax / 127.

    The float operations (one multiply by 127 / absmax, round half to even) are the ones the
    C++ kernel does, so both give the same codes bit for bit. (`127.0 / t` would not do: torch
    computes a scalar over a tensor as reciprocal(t) * 127, two roundings.)"""
    x = x.float()
    amax = x.abs().amax(dim=-1)
    inv = torch.where(amax > 0, torch.full_like(amax, INT8_MAX) / amax, torch.zeros_like(amax))  # (a true division)
    q = torch.round(x * inv.unsqueeze(-1)).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, amax / INT8_MAX


def quantize_int16_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int16 per row, as `quantize_int8_rows` with 32767 levels a side (the C++
    kernel's codes bit for bit)."""
    x = x.float()
    amax = x.abs().amax(dim=-1)
    inv = torch.where(amax > 0, torch.full_like(amax, INT16_MAX) / amax, torch.zeros_like(amax))
    q = torch.round(x * inv.unsqueeze(-1)).clamp_(-INT16_MAX, INT16_MAX).to(torch.int16)
    return q, amax / INT16_MAX


def quantize_int8_groups(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row and per `group` consecutive columns (as `quantize_int8_rows` on each
    group): codes [M, K], scales [M, K / group]."""
    M, K = x.shape
    q, s = quantize_int8_rows(x.reshape(M * (K // group), group))
    return q.reshape(M, K), s.reshape(M, K // group)


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 per row: q = e4m3(x * 448 / absmax) (round to nearest even), scale = absmax / 448."""
    x = x.float()
    amax = x.abs().amax(dim=-1)
    inv = torch.where(amax > 0, torch.full_like(amax, FP8_MAX) / amax, torch.zeros_like(amax))  # (a true division)
    q = (x * inv.unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, amax / FP8_MAX


def quantize_fp8_groups(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 per row and per `group` consecutive columns (`quantize_fp8_rows` on each group):
    codes [N, K], scales [N, K / group]."""
    N, K = x.shape
    q, s = quantize_fp8_rows(x.reshape(N * (K // group), group))
    return q.reshape(N, K), s.reshape(N, K // group)


def int8_row_sums(q: torch.Tensor) -> torch.Tensor:
    """sum_k q[n, k] as int32: the VNNI kernel multiplies (x + 128) as unsigned and takes
    128 * row sum back off."""
    return q.to(torch.int32).sum(dim=-1, dtype=torch.int32)


# --- one linear layer in its stored form ----------------------------------------------------

@dataclass(frozen=True, slots=True)
class QLinear:
    """y[M, N] = x[M, K] @ W^T for a weight W [N, K] (contiguous) in one of six forms."""

    form: str  # "f32" | "bf16" | "int8" | "w8a16" | "fp8" | "fp8b"
    weight: torch.Tensor  # float32 | bfloat16 | int8 | float8_e4m3fn, [N, K]
    # float32: [N] (int8, w8a16, fp8): W = weight * scale[:, None]; [N, K / g] (fp8b): one per g columns
    scale: torch.Tensor | None = None
    row_sums: torch.Tensor | None = None  # [N] int32 (int8 per token, w8a16; the grouped kernel needs none)
    act_group: int = 0  # int8: activations scaled per token (0) or per token and per this many columns

    @classmethod
    def make(cls, form: str, weight: torch.Tensor, scale: torch.Tensor | None = None,
             act_group: int = 0) -> "QLinear":
        """From a float weight (quantized here) or, given `scale`, from already-quantized codes.
        `act_group` (int8 only) is dropped to 0 where it does not divide K. fp8b quantizes with
        `FP8_GROUP` columns a scale (a whole row where that does not divide K); given codes, the
        scale's shape [N, K / g] says g."""
        if form == "f32":
            return cls(form, weight.float().contiguous())
        if form == "bf16":
            return cls(form, weight.to(torch.bfloat16).contiguous())
        if form not in ("int8", "w8a16", "fp8", "fp8b"):
            raise ValueError(f"unknown linear form {form!r}")
        if form in ("fp8b", "w8a16"):
            if scale is None:
                K = weight.shape[1]
                g = FP8_GROUP if form == "fp8b" else W8A16_GROUP
                weight, scale = (quantize_fp8_groups if form == "fp8b" else quantize_int8_groups)(
                    weight, g if K % g == 0 else K)
            if scale.dim() != 2 or weight.shape[1] % scale.shape[1]:
                raise ValueError(f"{form} scales must be [N, K / group], got {tuple(scale.shape)}")
            return cls(form, weight.contiguous(), scale.float().contiguous())
        if scale is None:
            weight, scale = (quantize_fp8_rows if form == "fp8" else quantize_int8_rows)(weight)
        weight = weight.contiguous()
        if form != "int8":
            return cls(form, weight, scale.float().contiguous())
        group = act_group if act_group and weight.shape[1] % act_group == 0 else 0
        return cls(form, weight, scale.float().contiguous(), None if group else int8_row_sums(weight), group)

    @classmethod
    def cat(cls, parts: list["QLinear"]) -> "QLinear":
        """Stack weights along N (fused Q/K/V, gate/up): per-row scales stack with them."""
        f, g = parts[0].form, parts[0].act_group
        if any(p.form != f or p.act_group != g for p in parts):
            raise ValueError("fused linears must share one form and activation grouping")
        cat = lambda ts: None if ts[0] is None else torch.cat(ts).contiguous()  # noqa: E731
        return cls(f, cat([p.weight for p in parts]), cat([p.scale for p in parts]), cat([p.row_sums for p in parts]),
                   g)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.scale, self.row_sums) if t is not None)

    @property
    def w_group(self) -> int:
        """fp8b, w8a16: input columns per weight scale (0 for the per-row forms)."""
        return self.weight.shape[1] // self.scale.shape[1] if self.form in ("fp8b", "w8a16") else 0

    def dequantized(self) -> torch.Tensor:
        """The fp32 matrix this form stands for."""
        w = self.weight.float()
        if self.form in ("fp8b", "w8a16"):
            N, K = w.shape
            return (w.view(N, -1, self.w_group) * self.scale.unsqueeze(2)).view(N, K)
        return w * self.scale.unsqueeze(1) if self.scale is not None else w

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The torch computation this form defines (also the GPU path); x [M, K] float32."""
        if self.form == "f32":
            return F.linear(x, self.weight)
        if self.form == "bf16":
            return F.linear(x.to(torch.bfloat16), self.weight).float()
        if self.form == "int8" and self.act_group:
            # each group's sum is exact in fp32 (|sum| <= group * 127^2 < 2^24 for group <= 1024)
            g = self.act_group
            xq, xs = quantize_int8_groups(x, g)
            M, K = xq.shape
            acc = torch.einsum("mgk,ngk->mng", xq.view(M, K // g, g).float(),
                               self.weight.view(-1, K // g, g).float())
            return (acc * xs.unsqueeze(1)).sum(-1) * self.scale
        if self.form == "int8":
            xq, xs = quantize_int8_rows(x)
            return int_mm(xq, self.weight).float() * xs.unsqueeze(1) * self.scale
        if self.form == "w8a16":
            # each group's int16 x int8 sum is exact in float64 (and in fp32: < 2^24 for groups <= 32),
            # scaled by its weight scale in fp32 and summed; the token's scale last
            xq, xs = quantize_int16_rows(x)
            g = self.w_group
            out = torch.zeros(x.shape[0], self.weight.shape[0])
            for j in range(self.scale.shape[1]):
                cols = slice(j * g, (j + 1) * g)
                out += (xq[:, cols].double() @ self.weight[:, cols].double().t()).float() * self.scale[:, j]
            return out * xs.unsqueeze(1)
        if self.form == "fp8b":
            # bf16 x E4M3 products are exact in fp32; each group's sum is scaled by its weight scale
            g = self.w_group
            M, K = x.shape
            acc = torch.einsum("mgk,ngk->mng", x.to(torch.bfloat16).float().view(M, K // g, g),
                               self.weight.float().view(-1, K // g, g))
            return (acc * self.scale).sum(-1)
        xq, xs = quantize_fp8_rows(x)  # fp8: products of E4M3 values are exact in fp32
        return F.linear(xq.float(), self.weight.float()) * xs.unsqueeze(1) * self.scale


def int_mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """int8 a [M, K] @ int8 w [N, K]^T -> int32 [M, N], exact (oneDNN on CPU, cuBLASLt on GPU,
    which wants M > 16 and K, N multiples of 8: rows are padded there)."""
    if a.is_cuda and a.shape[0] <= 16:
        pad = torch.zeros(17 - a.shape[0], a.shape[1], dtype=a.dtype, device=a.device)
        return torch._int_mm(torch.cat([a, pad]), w.t())[: a.shape[0]]
    return torch._int_mm(a, w.t())


@dataclass(frozen=True, slots=True)
class Embedding:
    """Token embedding rows in the LM head's form (tied models share the table)."""

    weight: torch.Tensor  # [V, D] float32 | bfloat16 | int8
    scale: torch.Tensor | None = None  # [V] float32 (int8)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight).float()
        return rows * self.scale[ids].unsqueeze(1) if self.scale is not None else rows
