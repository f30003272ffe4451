"""Our Llama-family forward pass: RMSNorm, RoPE, grouped-query attention over paged KV,
SwiGLU MLP, (tied) LM head. Weights are held as plain tensors with Q/K/V and gate/up fused
so each layer runs four matmuls.

On CPU in fp32 the layer runs through the fused C++ ops of `engine.cpu_kernels` (RMSNorm with
the residual add, RoPE with the K/V write, SiLU * up, decode attention): eight calls a layer
instead of some forty torch ops. The torch code below is the reference and the fallback."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine import cpu_kernels
from engine.attention import AttentionMetadata, PrefillChunk, attend, paged_attention
from engine.config import ModelConfig
from engine.kv_cache import KVCache

# Up to this many rows (a decode step's batch) the matmuls use the C++ skinny kernel, which
# streams each weight once without packing it; beyond, MKL's blocked GEMM (prefill chunks).
SKINNY_MAX_ROWS = 64
# Beyond, each thread multiplies its share of the weight rows with a single-threaded BLAS GEMM
# (engine/csrc/gemm.cpp split_linear): ~4% faster prefill than one two-thread MKL GEMM here.
SPLIT_LINEAR = True


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


class LlamaModel:
    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> None:
        self.cfg = cfg
        w = weights
        self.embed = w["model.embed_tokens.weight"]
        self.norm = w["model.norm.weight"]
        self.lm_head = self.embed if cfg.tie_word_embeddings else w["lm_head.weight"]
        self.layers = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            self.layers.append((
                w[p + "input_layernorm.weight"],
                torch.cat([w[p + "self_attn.q_proj.weight"], w[p + "self_attn.k_proj.weight"],
                           w[p + "self_attn.v_proj.weight"]]).contiguous(),
                w[p + "self_attn.o_proj.weight"],
                w[p + "post_attention_layernorm.weight"],
                torch.cat([w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"]]).contiguous(),
                w[p + "mlp.down_proj.weight"],
            ))
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings)
        self.scale = cfg.head_dim ** -0.5
        if self.embed.device.type == "cpu" and self.embed.dtype == torch.float32:
            cpu_kernels.kernels()  # build or load the C++ ops now, at start-up, not in the first request
        # the skinny kernel wants contiguous fp32 weights with K a multiple of 8
        self.skinny = all(w.dtype == torch.float32 and w.is_contiguous() and w.shape[1] % 8 == 0
                          for layer in self.layers for w in (layer[1], layer[2], layer[4], layer[5])) \
            and self.lm_head.is_contiguous() and self.lm_head.shape[1] % 8 == 0

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv: KVCache, logits_indices: torch.Tensor) -> torch.Tensor:
        """Run the flat batch of `T` tokens; return float32 logits for rows `logits_indices`."""
        if self.embed.device.type == "cpu" and self.embed.dtype == torch.float32:
            ck = cpu_kernels.kernels()
            if ck is not None:
                return self._forward_fused(ck, input_ids, positions, meta, kv, logits_indices)
        c = self.cfg
        T = input_ids.shape[0]
        H, KVH, hd = c.num_heads, c.num_kv_heads, c.head_dim
        q_size, kv_size = H * hd, KVH * hd
        inter = c.intermediate_size
        cos = self.rope.cos[positions].unsqueeze(1)
        sin = self.rope.sin[positions].unsqueeze(1)
        x = F.embedding(input_ids, self.embed)
        for li, (ln1, wqkv, wo, ln2, wgu, wd) in enumerate(self.layers):
            h = rms_norm(x, ln1, c.rms_norm_eps)
            qkv = F.linear(h, wqkv)
            q = self.rope.apply(qkv[:, :q_size].view(T, H, hd), cos, sin)
            k = self.rope.apply(qkv[:, q_size:q_size + kv_size].view(T, KVH, hd), cos, sin)
            v = qkv[:, q_size + kv_size:].view(T, KVH, hd)
            a = paged_attention(q, k, v, kv.k[li], kv.v[li], meta, self.scale)
            x = x + F.linear(a.reshape(T, q_size), wo)
            h = rms_norm(x, ln2, c.rms_norm_eps)
            gu = F.linear(h, wgu)
            x = x + F.linear(F.silu(gu[:, :inter]) * gu[:, inter:], wd)
        x = rms_norm(x[logits_indices], self.norm, c.rms_norm_eps)
        return F.linear(x, self.lm_head)

    def _forward_fused(self, ck, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                       kv: KVCache, logits_indices: torch.Tensor) -> torch.Tensor:
        """`forward` with the C++ CPU ops: the same computation, fewer and fused calls.

        After the last layer's K/V are written, only the rows that sample are carried on
        (attention output, MLP, norm, LM head): for a prefill chunk that is its last row."""
        c = self.cfg
        T = input_ids.shape[0]
        H, KVH, hd = c.num_heads, c.num_kv_heads, c.head_dim
        q_size, kv_size = H * hd, KVH * hd
        eps = c.rms_norm_eps
        cos, sin = self.rope.cos, self.rope.sin
        skinny = self.skinny and ck.skinny_linear_supported()

        def linear(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            if skinny and a.shape[0] <= SKINNY_MAX_ROWS:
                return ck.skinny_linear(a, w)
            return ck.split_linear(a, w) if SPLIT_LINEAR else F.linear(a, w)

        x = F.embedding(input_ids, self.embed)  # the residual stream, updated in place
        delta = None  # what the previous layer's MLP adds to x
        last = len(self.layers) - 1
        for li, (ln1, wqkv, wo, ln2, wgu, wd) in enumerate(self.layers):
            h = ck.rms_norm(x, ln1, eps) if delta is None else ck.add_rms_norm(x, delta, ln1, eps)
            qkv = linear(h, wqkv)
            ck.rope_write_kv(qkv, positions, cos, sin, kv.k[li], kv.v[li], meta.slot_blocks,
                             meta.slot_offsets, H, KVH)
            q, k, v = (qkv[:, :q_size].view(-1, H, hd), qkv[:, q_size:q_size + kv_size].view(-1, KVH, hd),
                       qkv[:, q_size + kv_size:].view(-1, KVH, hd))
            lmeta = meta
            if li == last and (kept := _sampling_rows(meta, logits_indices, T)) is not None:
                lmeta = kept
                x, q, k, v = x[logits_indices], q[logits_indices], k[logits_indices], v[logits_indices]
            a = attend(q, k, v, kv.k[li], kv.v[li], lmeta, self.scale)
            h = ck.add_rms_norm(x, linear(a.view(-1, q_size), wo), ln2, eps)
            delta = linear(ck.silu_mul(linear(h, wgu)), wd)
        if x.shape[0] == T:  # all rows were kept
            x = x.add_(delta)[logits_indices] if delta is not None else x[logits_indices]
        else:
            x = x.add_(delta)
        return linear(ck.rms_norm(x, self.norm, eps), self.lm_head)


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
