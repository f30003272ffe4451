"""Our Llama-family forward pass: RMSNorm, RoPE, grouped-query attention over paged KV,
SwiGLU MLP, (tied) LM head. Each linear is an `engine.quant.QLinear` (fp32, bf16, int8 or
fp8, per `EngineConfig.dtype`) with Q/K/V and gate/up fused, so each layer runs four matmuls.

On CPU the layer runs through the fused C++ ops of `engine.cpu_kernels` (RMSNorm with the
residual add, RoPE with the K/V write, SiLU * up, decode attention, the quantized GEMMs):
eight calls a layer instead of some forty torch ops. The torch code below is the reference
and the fallback (and the GPU path)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from engine import cpu_kernels, hugepages
from engine.attention import AttentionMetadata, PrefillChunk, attend, paged_attention
from engine.config import ModelConfig
from engine.kv_cache import KVCache
from engine.quant import ACT_BITS, Embedding, QLinear

# Up to this many rows (a decode step's batch) the matmuls use the C++ skinny kernel, which
# streams each weight once without packing it; beyond, MKL's blocked GEMM (prefill chunks).
SKINNY_MAX_ROWS = 64
# Beyond, each thread multiplies its share of the weight rows with a single-threaded BLAS GEMM
# (engine/csrc/gemm.cpp split_linear): ~4% faster prefill than one two-thread MKL GEMM here.
SPLIT_LINEAR = True
# Decode-only steps on CPU run as one C++ call (engine/csrc/decode_step.cpp): the same kernels in
# the same order as _forward_fused, without the Python between them. False: layer by layer.
DECODE_STEP = True
# Such steps of at most REGION_MAX_ROWS rows whose linears are all int8 (w8a8) run as ONE OpenMP
# parallel region (engine/csrc/decode_region.cpp: the same logits, without ~150 fork/joins a
# step; each thread redoes the per-row work between the GEMVs, which decode_step runs on one
# thread below 16 rows anyway). False: decode_step's kernel by kernel. Interleaved in one
# process on the loaded 2-core machine (load 4-5), w8a8 steps: b1 23-24 vs 24-34 ms, b4 71 vs
# 149, b8 186 vs 214, b32 608 vs 968. (Its barrier sleeps on a futex when a partner is preempted,
# and while other processes hold the cores its steps run on one thread: decode_region.cpp.)
DECODE_REGION = True
# On CPU the weights a decode step streams live in one buffer advised for transparent huge pages
# (engine/hugepages.py): 2 MiB pages instead of ~34k 4 KiB ones a w8a8 step. SmolLM2-135M w8a8,
# decode_region at batch 1, interleaved in one process against 4 KiB-page copies of the same
# weights (blocks of 10 calls, 400 calls each, load 2): median 4.97 / 4.96 ms vs 6.18 / 5.71 ms.
HUGE_PAGES = True
REGION_MAX_ROWS = 64  # (all engine/csrc/decode_region.cpp takes: the int8 kernels' tiled range)
# engine/csrc/decode_step.cpp's numbering of the linear forms (int8 with activation groups: 3)
_FORM_CODES = {"f32": 0, "bf16": 1, "int8": 2, "w8a16": 4, "fp8": 5, "fp8b": 6}


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    var = x.pow(2).mean(-1, keepdim=True)
    return w * (x * torch.rsqrt(var + eps))


class RotaryEmbedding:
    def __init__(self, head_dim: int, theta: float, max_pos: int) -> None:
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos = emb.cos()
        self.sin = emb.sin()

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rot * sin


@dataclass(frozen=True, slots=True)
class Layer:
    ln1: torch.Tensor  # float32 [hidden] (SmoothQuant scales folded in for w8a8)
    qkv: QLinear
    o: QLinear
    ln2: torch.Tensor
    gate_up: QLinear
    down: QLinear


# A calibration hook: called with (layer index, "qkv" | "o" | "gate_up" | "down", the
# linear's fp32 input) before each layer linear runs (engine/quant_calib.py).
Observer = Callable[[int, str, torch.Tensor], None]


class LlamaModel:
    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], act_group: int = 0) -> None:
        """`weights` by Hugging Face name, as `engine.loader.load_model` gives them: float
        tensors, or int8 / float8 codes with their per-row scales under `<name>_scale`.
        `act_group`: int8 linears scale their activations per token and per this many input
        channels (0: per token; `EngineConfig.act_group`)."""
        self.cfg = cfg
        w = weights

        def lin(*names: str) -> QLinear:
            parts = [_qlinear(w, n + ".weight", act_group) for n in names]
            return parts[0] if len(parts) == 1 else QLinear.cat(parts)

        self.embed = Embedding(w["model.embed_tokens.weight"], w.get("model.embed_tokens.weight_scale"))
        self.norm = w["model.norm.weight"].float()
        # (a quantized cache may hold an untied head of a tied model: w8a8's "w8a16" head)
        self.lm_head = lin("lm_head" if "lm_head.weight" in w or not cfg.tie_word_embeddings else "model.embed_tokens")
        self.layers: list[Layer] = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            self.layers.append(Layer(
                w[p + "input_layernorm.weight"].float(),
                lin(p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"),
                lin(p + "self_attn.o_proj"),
                w[p + "post_attention_layernorm.weight"].float(),
                lin(p + "mlp.gate_proj", p + "mlp.up_proj"),
                lin(p + "mlp.down_proj"),
            ))
        self.linear_form = self.layers[0].qkv.form if self.layers else self.lm_head.form
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings)
        self.scale = cfg.head_dim ** -0.5
        self.observer: Observer | None = None
        self.on_cpu = self.norm.device.type == "cpu"
        if self.on_cpu:
            if HUGE_PAGES:
                self._to_huge_pages()
            cpu_kernels.kernels()  # build or load the C++ ops now, at start-up, not in the first request
        # the fp32 skinny kernel wants contiguous weights with K a multiple of 8
        self.skinny = all(q.weight.shape[1] % 8 == 0 for q in self.linears())
        self._step_plan: tuple[list[torch.Tensor], list[int]] | None | bool = False  # False: not built yet
        self._region_rows = 0  # decode steps of up to this many rows may take decode_region
        self._step_caches: tuple[int, list[torch.Tensor], list[torch.Tensor]] | None = None

    def _to_huge_pages(self) -> None:
        """Move every weight a decode step streams (the linears' codes, scales and row sums, the
        norms) into one huge-page-advised buffer (engine.hugepages); a tied embedding follows
        its LM head (one table, as before)."""
        slots = [(i, f) for i in range(len(self.layers)) for f in ("ln1", "qkv", "o", "ln2", "gate_up", "down")]
        objs = [getattr(self.layers[i], f) for i, f in slots] + [self.norm, self.lm_head]
        fields = ("weight", "scale", "row_sums")
        flat = [t for o in objs for t in ((o,) if isinstance(o, torch.Tensor) else
                                          (getattr(o, k) for k in fields if getattr(o, k) is not None))]
        it = iter(hugepages.huge_copies(flat))
        new = [next(it) if isinstance(o, torch.Tensor) else
               replace(o, **{k: next(it) for k in fields if getattr(o, k) is not None}) for o in objs]
        *layer_objs, self.norm, head = new
        if self.embed.weight.data_ptr() == self.lm_head.weight.data_ptr() and self.embed.weight.dtype == head.weight.dtype:
            self.embed = replace(self.embed, weight=head.weight)
        self.lm_head = head
        for i in range(len(self.layers)):
            self.layers[i] = Layer(*layer_objs[6 * i:6 * i + 6])

    def linears(self) -> list[QLinear]:
        return [q for layer in self.layers for q in (layer.qkv, layer.o, layer.gate_up, layer.down)] + [self.lm_head]

    @property
    def weight_bytes(self) -> int:
        """Bytes of every weight a decode step streams: the linears (the LM head: a tied
        embedding's table once) and the norms. An untied embedding table is not counted: a
        step gathers one row of it a token."""
        norms = sum(t.numel() * 4 for layer in self.layers for t in (layer.ln1, layer.ln2)) + self.norm.numel() * 4
        return sum(q.nbytes for q in self.linears()) + norms

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv: KVCache, logits_indices: torch.Tensor) -> torch.Tensor:
        """Run the flat batch of `T` tokens; return float32 logits for rows `logits_indices`."""
        if self.on_cpu and kv.tensor.dtype in (torch.float32, torch.bfloat16):
            ck = cpu_kernels.kernels()
            if ck is not None:
                if DECODE_STEP and self._decode_only(meta, logits_indices, input_ids.shape[0]):
                    plan = self._decode_plan(ck)
                    if plan is not None:
                        return self._forward_decode(ck, plan, input_ids, positions, meta, kv)
                return self._forward_fused(ck, input_ids, positions, meta, kv, logits_indices)
        c = self.cfg
        T = input_ids.shape[0]
        H, KVH, hd = c.num_heads, c.num_kv_heads, c.head_dim
        q_size, kv_size = H * hd, KVH * hd
        inter = c.intermediate_size
        cos = self.rope.cos[positions].unsqueeze(1)
        sin = self.rope.sin[positions].unsqueeze(1)
        x = self.embed(input_ids)
        linear = self._reference_linear
        for li, layer in enumerate(self.layers):
            h = rms_norm(x, layer.ln1, c.rms_norm_eps)
            qkv = linear(li, "qkv", h, layer.qkv)
            q = self.rope.apply(qkv[:, :q_size].view(T, H, hd), cos, sin)
            k = self.rope.apply(qkv[:, q_size:q_size + kv_size].view(T, KVH, hd), cos, sin)
            v = qkv[:, q_size + kv_size:].view(T, KVH, hd)
            a = paged_attention(q, k, v, kv.k[li], kv.v[li], meta, self.scale)
            x = x + linear(li, "o", a.reshape(T, q_size), layer.o)
            h = rms_norm(x, layer.ln2, c.rms_norm_eps)
            gu = linear(li, "gate_up", h, layer.gate_up)
            x = x + linear(li, "down", F.silu(gu[:, :inter]) * gu[:, inter:], layer.down)
        x = rms_norm(x[logits_indices], self.norm, c.rms_norm_eps)
        return self.lm_head.reference(x)

    def _reference_linear(self, li: int, name: str, x: torch.Tensor, lin: QLinear) -> torch.Tensor:
        if self.observer is not None:
            self.observer(li, name, x)
        return lin.reference(x)

    def _forward_fused(self, ck, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                       kv: KVCache, logits_indices: torch.Tensor) -> torch.Tensor:
        """`forward` with the C++ CPU ops: the same computation, fewer and fused calls.

        After the last layer's K/V are written, only the rows that sample are carried on
        (attention output, MLP, norm, LM head): for a prefill chunk that is its last row
        (unless an observer is calibrating: it sees every row)."""
        c = self.cfg
        T = input_ids.shape[0]
        H, KVH, hd = c.num_heads, c.num_kv_heads, c.head_dim
        q_size, kv_size = H * hd, KVH * hd
        eps = c.rms_norm_eps
        cos, sin = self.rope.cos, self.rope.sin
        skinny = self.skinny and ck.skinny_linear_supported()
        observer = self.observer

        def linear(li: int, name: str, a: torch.Tensor, lin: QLinear) -> torch.Tensor:
            if observer is not None:
                observer(li, name, a)
            return _fused_linear(ck, a, lin, skinny)

        x = self.embed(input_ids)  # the residual stream, updated in place
        delta = None  # what the previous layer's MLP adds to x
        last = len(self.layers) - 1
        for li, layer in enumerate(self.layers):
            h = ck.rms_norm(x, layer.ln1, eps) if delta is None else ck.add_rms_norm(x, delta, layer.ln1, eps)
            qkv = linear(li, "qkv", h, layer.qkv)
            ck.rope_write_kv(qkv, positions, cos, sin, kv.k[li], kv.v[li], meta.slot_blocks,
                             meta.slot_offsets, H, KVH)
            q, k, v = (qkv[:, :q_size].view(-1, H, hd), qkv[:, q_size:q_size + kv_size].view(-1, KVH, hd),
                       qkv[:, q_size + kv_size:].view(-1, KVH, hd))
            lmeta = meta
            if li == last and observer is None and (kept := _sampling_rows(meta, logits_indices, T)) is not None:
                lmeta = kept
                x, q, k, v = x[logits_indices], q[logits_indices], k[logits_indices], v[logits_indices]
            a = attend(q, k, v, kv.k[li], kv.v[li], lmeta, self.scale)
            h = ck.add_rms_norm(x, linear(li, "o", a.view(-1, q_size), layer.o), layer.ln2, eps)
            delta = linear(li, "down", ck.silu_mul(linear(li, "gate_up", h, layer.gate_up)), layer.down)
        if x.shape[0] == T:  # all rows were kept
            x = x.add_(delta)[logits_indices] if delta is not None else x[logits_indices]
        else:
            x = x.add_(delta)
        return _fused_linear(ck, ck.rms_norm(x, self.norm, eps), self.lm_head, skinny)


    def _decode_only(self, meta: AttentionMetadata, logits_indices: torch.Tensor, T: int) -> bool:
        """A step of decode tokens only, each sampled in order, nobody observing."""
        d = meta.decode
        return (self.observer is None and not meta.prefills and d is not None and d.n == T
                and d.context_lens is not None and logits_indices.tolist() == list(range(T)))

    def _decode_plan(self, ck) -> tuple[list[torch.Tensor], list[int]] | None:
        """decode_step's flat weight list and form codes, or None when some linear has no C++
        kernel here (built once)."""
        if self._step_plan is False:
            skinny = self.skinny and ck.skinny_linear_supported()
            none = torch.empty(0)
            weights: list[torch.Tensor] = []
            forms: list[int] = []

            def add(lin: QLinear) -> bool:
                code = _step_form(ck, lin, skinny)
                weights.extend(t if t is not None else none for t in (lin.weight, lin.scale, lin.row_sums))
                forms.extend((code if code is not None else -1, lin.act_group))
                return code is not None

            ok = True
            for layer in self.layers:
                weights.append(layer.ln1)
                ok &= add(layer.qkv) & add(layer.o)
                weights.append(layer.ln2)
                ok &= add(layer.gate_up) & add(layer.down)
            weights.append(self.norm)
            ok &= add(self.lm_head)
            self._step_plan = (weights, forms) if ok and self.layers else None
            self._region_rows = REGION_MAX_ROWS if self._step_plan and ck.decode_region_supported(
                forms, REGION_MAX_ROWS) else 0
        return self._step_plan

    def _forward_decode(self, ck, plan: tuple[list[torch.Tensor], list[int]], input_ids: torch.Tensor,
                        positions: torch.Tensor, meta: AttentionMetadata, kv: KVCache) -> torch.Tensor:
        """`_forward_fused` for a decode-only step, as one C++ call."""
        if self._step_caches is None or self._step_caches[0] != id(kv.tensor):
            n = len(self.layers)
            self._step_caches = (id(kv.tensor), [kv.k[li] for li in range(n)], [kv.v[li] for li in range(n)])
        c = self.cfg
        d = meta.decode
        weights, forms = plan
        step = ck.decode_region if DECODE_REGION and d.n <= self._region_rows else ck.decode_step
        return step(self.embed(input_ids), positions, meta.slot_blocks, meta.slot_offsets, d.block_tables,
                              d.context_lens, self.rope.cos, self.rope.sin, self._step_caches[1], self._step_caches[2],
                              weights, forms, c.num_heads, c.num_kv_heads, c.rms_norm_eps, self.scale,
                              self.skinny and ck.skinny_linear_supported())


def _step_form(ck, lin: QLinear, skinny: bool) -> int | None:
    """decode_step's code for `lin`, or None where `_fused_linear` would use the torch reference
    (so that decode_step runs exactly the kernels _fused_linear does)."""
    K = lin.weight.shape[1]
    if lin.form == "f32":
        return 0 if SPLIT_LINEAR else None
    if not ck.qgemm_supported() or K % (64 if lin.form in ("int8", "w8a16") else 32):
        return None
    if lin.form == "int8" and lin.act_group:
        return 3 if lin.act_group % 64 == 0 else None
    if lin.form in ("fp8b", "w8a16") and lin.w_group % 32:
        return None
    return _FORM_CODES[lin.form]


def _qlinear(w: dict[str, torch.Tensor], name: str, act_group: int = 0) -> QLinear:
    """The weight `name` in its stored form: the dtype of the codes says which."""
    t = w[name]
    form = {torch.float32: "f32", torch.bfloat16: "bf16", torch.int8: "int8", torch.float8_e4m3fn: "fp8"}.get(t.dtype)
    if form is None:
        raise ValueError(f"{name}: weights of dtype {t.dtype} are not supported")
    scale = w.get(name + "_scale")
    if form == "fp8" and scale is not None and scale.dim() == 2:
        form = "fp8b"  # scales per row and per group of input channels
    if form == "int8" and int(w.get(name + ACT_BITS, 8)) == 16:
        form = "w8a16"  # weight-only int8: activations in int16 (engine.quant_calib.quantize_state)
    return QLinear.make(form, t, scale, act_group if form == "int8" else 0)


def _fused_linear(ck, a: torch.Tensor, lin: QLinear, skinny: bool) -> torch.Tensor:
    """`lin.reference(a)` through the C++ kernels where they cover the form and shape
    (engine/csrc/gemm.cpp for fp32, qgemm.cpp for the others)."""
    M, K = a.shape
    if lin.form == "f32":
        if skinny and M <= SKINNY_MAX_ROWS:
            return ck.skinny_linear(a, lin.weight)
        return ck.split_linear(a, lin.weight) if SPLIT_LINEAR else F.linear(a, lin.weight)
    if not ck.qgemm_supported() or K % (64 if lin.form in ("int8", "w8a16") else 32):
        return lin.reference(a)
    if lin.form == "int8" and lin.act_group:
        if lin.act_group % 64:
            return lin.reference(a)
        return ck.int8_group_linear(a, lin.weight, lin.scale, lin.act_group)
    if lin.form == "int8":
        return ck.int8_linear(a, lin.weight, lin.scale, lin.row_sums)
    if lin.form == "w8a16":
        return ck.w8a16_linear(a, lin.weight, lin.scale) if lin.w_group % 32 == 0 else lin.reference(a)
    if lin.form == "fp8":
        return ck.fp8_linear(a, lin.weight.view(torch.uint8), lin.scale)
    if lin.form == "fp8b":
        if lin.w_group % 32:
            return lin.reference(a)
        return ck.fp8b_linear(a, lin.weight.view(torch.uint8), lin.scale)
    return ck.bf16_linear(a, lin.weight)


def _sampling_rows(meta: AttentionMetadata, logits_indices: torch.Tensor, T: int) -> AttentionMetadata | None:
    """Attention metadata for just the rows `logits_indices` (the decode rows, then the last row
    of each prefill chunk that completes), in that order; None when every row samples or the
    rows are not of that shape."""
    rows = logits_indices.tolist()
    if len(rows) == T:
        return None
    n = meta.decode.n if meta.decode is not None else 0
    if rows[:n] != list(range(n)):
        return None
    ends = {p.end - 1: p for p in meta.prefills}
    chunks = []
    for i, r in enumerate(rows[n:], start=n):
        p = ends.get(r)
        if p is None:
            return None
        chunks.append(PrefillChunk(i, i + 1, p.block_table, p.context_len))
    return AttentionMetadata(meta.slot_blocks, meta.slot_offsets, meta.decode, chunks)
