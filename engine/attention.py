"""Attention over the paged KV cache, in torch (the reference path).

Decode requests of a step attend as one padded batch (one SDPA call per layer); each prefill
chunk attends on its own with a causal mask offset by the tokens already in its blocks. On
CPU both go to the C++ kernels of `engine.cpu_kernels` when they are built (they read K/V
straight from the blocks); this torch code is their reference and fallback.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine import cpu_kernels


@dataclass(slots=True)
class DecodeGroup:
    """The first `n` tokens of the flat batch: one new token per decoding request."""

    n: int
    block_tables: torch.Tensor  # [n, max_blocks] long, padded with block 0
    mask: torch.Tensor | None = None  # [n, 1, 1, max_blocks * block_size] bool, True = attend (None: from context_lens)
    context_lens: torch.Tensor | None = None  # [n] long: tokens each attends to (None: from mask)

    def attend_mask(self, block_size: int) -> torch.Tensor:
        """`mask`, built from `context_lens` when it was not given (only the torch path needs it)."""
        if self.mask is None:
            width = self.block_tables.shape[1] * block_size
            self.mask = (torch.arange(width).unsqueeze(0) < self.context_lens.unsqueeze(1))[:, None, None, :]
        return self.mask


@dataclass(slots=True)
class PrefillChunk:
    """Tokens [start, end) of the flat batch: a chunk of one request's prompt."""

    start: int
    end: int
    block_table: torch.Tensor  # [num_blocks] long, covering all context_len tokens
    context_len: int  # tokens in the blocks after this chunk is written


@dataclass(slots=True)
class AttentionMetadata:
    slot_blocks: torch.Tensor  # [T] block id where each token's K/V goes
    slot_offsets: torch.Tensor  # [T] offset inside that block
    decode: DecodeGroup | None
    prefills: list[PrefillChunk]


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             meta: AttentionMetadata) -> None:
    if k_cache.is_cuda:  # GPU: the triton kernel when triton imports (engine/triton_kernels.py)
        from engine import triton_kernels as tk
        if tk.AVAILABLE:
            return tk.paged_kv_scatter(k_cache, v_cache, k, v, meta.slot_blocks, meta.slot_offsets)
    k_cache[meta.slot_blocks, meta.slot_offsets] = k.to(k_cache.dtype)  # (a bfloat16 cache rounds)
    v_cache[meta.slot_blocks, meta.slot_offsets] = v.to(v_cache.dtype)


def _gather(cache: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """[..., nb] block ids -> [..., kv_heads, nb * block_size, head_dim]."""
    if cache.is_cuda:
        from engine import triton_kernels as tk
        if tk.AVAILABLE:
            return tk.paged_kv_gather(cache, table).float().transpose(-3, -2)  # (fp32 math for any KV dtype)
    nblocks, bs, kvh, hd = cache.shape
    # Each block's rows are contiguous inside the strided per-layer view: select them as
    # flat rows (index_select on 2-D is a straight row copy, much faster than 4-D indexing).
    rows = torch.as_strided(cache, (nblocks, bs * kvh * hd), (cache.stride(0), 1))
    g = torch.index_select(rows, 0, table.reshape(-1)).float()  # (the math is fp32 for any KV dtype)
    return g.view(*table.shape[:-1], table.shape[-1] * bs, kvh, hd).transpose(-3, -2)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, H, hd]; k, v: [T, KVH, hd] (this step's new keys/values). Returns [T, H, hd]."""
    write_kv(k_cache, v_cache, k, v, meta)
    return attend(q, k, v, k_cache, v_cache, meta, scale)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
           v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """`paged_attention` once this step's K/V are already in the cache."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    d = meta.decode
    ck = cpu_kernels.kernels() if k_cache.device.type == "cpu" else None
    if ck is not None:  # C++ kernels reading the blocks in place
        if d is not None and d.n:
            lens = d.context_lens if d.context_lens is not None else d.mask.reshape(d.n, -1).sum(-1)
            ck.decode_attention(out[: d.n], q[: d.n], k_cache, v_cache, d.block_tables, lens, scale)
        for p in meta.prefills:
            ck.prefill_attention(out[p.start:p.end], q[p.start:p.end], k_cache, v_cache, p.block_table,
                                 p.context_len, scale)
        return out
    if d is not None and d.n:
        qd = q[: d.n].unsqueeze(2)  # [n, H, 1, hd]
        kd = _gather(k_cache, d.block_tables)
        vd = _gather(v_cache, d.block_tables)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=d.attend_mask(k_cache.shape[1]), scale=scale,
                                            enable_gqa=True)
        out[: d.n] = od.squeeze(2)
    # 4-D [1, heads, L, hd] operands: with 3-D ones SDPA on CPU takes its slow math path, not flash
    for p in meta.prefills:
        qp = q[p.start:p.end].transpose(0, 1).unsqueeze(0)  # [1, H, L, hd]
        n_new = p.end - p.start
        if p.context_len == n_new:  # no earlier tokens: attend to this chunk's own K/V
            kp = k[p.start:p.end].transpose(0, 1).unsqueeze(0)
            vp = v[p.start:p.end].transpose(0, 1).unsqueeze(0)
            op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=True)
        else:
            kp = _gather(k_cache, p.block_table)[:, : p.context_len].unsqueeze(0)
            vp = _gather(v_cache, p.block_table)[:, : p.context_len].unsqueeze(0)
            past = p.context_len - n_new
            rows = torch.arange(n_new).unsqueeze(1) + past
            mask = torch.arange(p.context_len).unsqueeze(0) <= rows
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale, enable_gqa=True)
        out[p.start:p.end] = op[0].transpose(0, 1)
    return out
