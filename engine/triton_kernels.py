"""Triton kernels over the paged KV cache: the GPU twin of `engine/attention.py`'s torch path.

Each kernel reads the per-layer K or V view ``[num_blocks, block_size, kv_heads, head_dim]``
through explicit strides -- the view is strided inside the 6-D region of `engine/kv_cache.py`.
`engine/attention.py` calls these only for CUDA tensors; on CPU their logic is checked under
``TRITON_INTERPRET=1`` (tests/engine/test_triton_kernels.py).

- `paged_kv_scatter`: this step's K/V rows into their (block, offset) slots (fp32 rows into a
  bfloat16 cache round to nearest even, as the torch path does).
- `paged_kv_gather`: a block table into a contiguous ``[..., n * block_size, kv_heads, head_dim]``.
- `paged_decode_attention`: one query token per sequence attending over its blocks
  (online softmax), each program serving one KV head's group of query heads.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path in engine/attention.py still works
    triton = None
    tl = None

AVAILABLE = triton is not None
_GATHER_CHUNK = 1024  # elements of one block copied per gather program


def _require_triton() -> None:
    if not AVAILABLE:
        raise RuntimeError("triton is not installed: use the torch path in engine/attention.py")


def _check_cache(cache: torch.Tensor) -> None:
    if cache.dim() != 4:
        raise ValueError(f"a per-layer KV cache view is [num_blocks, block_size, kv_heads, head_dim], "
                         f"got shape {tuple(cache.shape)}")


if AVAILABLE:

    @triton.jit
    def _bf16_rne(x):
        """float32 -> bfloat16, round to nearest even (bit arithmetic: the same under the interpreter)."""
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _scatter_kernel(kc_ptr, vc_ptr, k_ptr, v_ptr, blk_ptr, off_ptr,
                        c_sb, c_so, c_sh, c_sd, vc_sb, vc_so, vc_sh, vc_sd,
                        k_st, k_sh, k_sd, v_st, v_sh, v_sd,
                        HEAD_DIM: tl.constexpr, ROW: tl.constexpr, ROW_P: tl.constexpr,
                        TO_BF16: tl.constexpr):
        t = tl.program_id(0)
        blk = tl.load(blk_ptr + t).to(tl.int64)
        off = tl.load(off_ptr + t).to(tl.int64)
        i = tl.arange(0, ROW_P)
        live = i < ROW
        h = (i // HEAD_DIM).to(tl.int64)
        d = (i % HEAD_DIM).to(tl.int64)
        t64 = t.to(tl.int64)
        kr = tl.load(k_ptr + t64 * k_st + h * k_sh + d * k_sd, mask=live)
        vr = tl.load(v_ptr + t64 * v_st + h * v_sh + d * v_sd, mask=live)
        if TO_BF16:  # fp32 K/V into a bfloat16 cache: round to nearest even as torch's .to() (a store truncates)
            kr = _bf16_rne(kr)
            vr = _bf16_rne(vr)
        tl.store(kc_ptr + blk * c_sb + off * c_so + h * c_sh + d * c_sd, kr, mask=live)
        tl.store(vc_ptr + blk * vc_sb + off * vc_so + h * vc_sh + d * vc_sd, vr, mask=live)

    @triton.jit
    def _gather_kernel(c_ptr, tab_ptr, out_ptr, c_sb, c_so, c_sh, c_sd, tab_sr, tab_sc, n_cols,
                       KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_ELEMS: tl.constexpr,
                       CHUNK: tl.constexpr):
        r = tl.program_id(0)  # table row
        j = tl.program_id(1)  # table column: which block of the row
        c = tl.program_id(2)  # chunk of that block's elements
        blk = tl.load(tab_ptr + r.to(tl.int64) * tab_sr + j.to(tl.int64) * tab_sc).to(tl.int64)
        i = c * CHUNK + tl.arange(0, CHUNK)
        live = i < BLOCK_ELEMS
        o = (i // (KV_HEADS * HEAD_DIM)).to(tl.int64)
        h = ((i // HEAD_DIM) % KV_HEADS).to(tl.int64)
        d = (i % HEAD_DIM).to(tl.int64)
        x = tl.load(c_ptr + blk * c_sb + o * c_so + h * c_sh + d * c_sd, mask=live)
        dst = (r.to(tl.int64) * n_cols + j) * BLOCK_ELEMS + i
        tl.store(out_ptr + dst, x, mask=live)

    @triton.jit
    def _decode_kernel(q_ptr, kc_ptr, vc_ptr, tab_ptr, len_ptr, out_ptr, scale,
                       q_sb, q_sh, q_sd, o_sb, o_sh, o_sd,
                       k_sb, k_so, k_sh, k_sd, v_sb, v_so, v_sh, v_sd, tab_sr, tab_sc,
                       BLOCK_SIZE: tl.constexpr, BS_P: tl.constexpr, HEAD_DIM: tl.constexpr,
                       HD_P: tl.constexpr, GROUP: tl.constexpr, GROUP_P: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)  # sequence
        kvh = tl.program_id(1).to(tl.int64)  # KV head; query heads kvh*GROUP .. +GROUP-1 share it
        g = tl.arange(0, GROUP_P)
        d = tl.arange(0, HD_P)
        t = tl.arange(0, BS_P)
        g_live = g < GROUP
        d_live = d < HEAD_DIM
        t_live = t < BLOCK_SIZE
        heads = kvh * GROUP + g
        q = tl.load(q_ptr + b * q_sb + heads[:, None] * q_sh + d[None, :] * q_sd,
                    mask=g_live[:, None] & d_live[None, :], other=0.0).to(tl.float32)
        ctx = tl.load(len_ptr + b)
        m = tl.full((GROUP_P,), float("-inf"), tl.float32)
        s_sum = tl.zeros((GROUP_P,), tl.float32)
        acc = tl.zeros((GROUP_P, HD_P), tl.float32)
        for j in range(0, tl.cdiv(ctx, BLOCK_SIZE)):
            blk = tl.load(tab_ptr + b * tab_sr + j * tab_sc).to(tl.int64)
            pos = j * BLOCK_SIZE + t
            live = t_live & (pos < ctx)
            kv_mask = live[:, None] & d_live[None, :]
            kb = tl.load(kc_ptr + blk * k_sb + t[:, None] * k_so + kvh * k_sh + d[None, :] * k_sd,
                         mask=kv_mask, other=0.0).to(tl.float32)  # [BS_P, HD_P]
            vb = tl.load(vc_ptr + blk * v_sb + t[:, None] * v_so + kvh * v_sh + d[None, :] * v_sd,
                         mask=kv_mask, other=0.0).to(tl.float32)
            s = tl.sum(q[:, None, :] * kb[None, :, :], axis=2) * scale  # [GROUP_P, BS_P]
            s = tl.where(live[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            s_sum = s_sum * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vb[None, :, :], axis=1)
            m = m_new
        res = tl.where(s_sum[:, None] > 0, acc / s_sum[:, None], 0.0)
        tl.store(out_ptr + b * o_sb + heads[:, None] * o_sh + d[None, :] * o_sd,
                 res.to(out_ptr.dtype.element_ty), mask=g_live[:, None] & d_live[None, :])


def paged_kv_scatter(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     slot_blocks: torch.Tensor, slot_offsets: torch.Tensor) -> None:
    """Write k[t], v[t] ([T, kv_heads, head_dim]) into block slot_blocks[t], offset slot_offsets[t].

    Same result as ``k_cache[slot_blocks, slot_offsets] = k`` (and for v) when slots are distinct.
    """
    _require_triton()
    _check_cache(k_cache)
    _check_cache(v_cache)
    n = k.shape[0]
    if n == 0:
        return
    _, _, kvh, hd = k_cache.shape
    if k.shape != (n, kvh, hd) or v.shape != (n, kvh, hd) or v_cache.shape != k_cache.shape:
        raise ValueError(f"k, v must be [T, {kvh}, {hd}] for caches {tuple(k_cache.shape)}, "
                         f"got {tuple(k.shape)}, {tuple(v.shape)}, v cache {tuple(v_cache.shape)}")
    blocks = slot_blocks.contiguous()
    offsets = slot_offsets.contiguous()
    row = kvh * hd
    _scatter_kernel[(n,)](k_cache, v_cache, k, v, blocks, offsets,
                          *k_cache.stride(), *v_cache.stride(), *k.stride(), *v.stride(),
                          HEAD_DIM=hd, ROW=row, ROW_P=triton.next_power_of_2(row),
                          TO_BF16=k.dtype == torch.float32 and k_cache.dtype == torch.bfloat16)


def paged_kv_gather(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """[..., n] block ids -> a new contiguous [..., n * block_size, kv_heads, head_dim]."""
    _require_triton()
    _check_cache(cache)
    _, bs, kvh, hd = cache.shape
    n = block_table.shape[-1]
    table = block_table.reshape(-1, n)
    rows = table.shape[0]
    out = torch.empty(*block_table.shape[:-1], n * bs, kvh, hd, dtype=cache.dtype, device=cache.device)
    if rows == 0 or n == 0:
        return out
    elems = bs * kvh * hd
    chunk = min(_GATHER_CHUNK, triton.next_power_of_2(elems))
    grid = (rows, n, triton.cdiv(elems, chunk))
    _gather_kernel[grid](cache, table, out, *cache.stride(), *table.stride(), n,
                         KV_HEADS=kvh, HEAD_DIM=hd, BLOCK_ELEMS=elems, CHUNK=chunk)
    return out


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """One query token per sequence over its paged K/V. q: [B, H, hd] -> [B, H, hd].

    Sequence b attends to its first context_lens[b] tokens, read through block_tables[b]
    ([B, max_blocks]); query head h uses KV head h // (H // kv_heads), as SDPA's enable_gqa.
    A sequence with context length 0 gets zeros.
    """
    _require_triton()
    _check_cache(k_cache)
    _check_cache(v_cache)
    nb, heads, hd = q.shape
    _, bs, kvh, chd = k_cache.shape
    if chd != hd or heads % kvh or v_cache.shape != k_cache.shape:
        raise ValueError(f"q {tuple(q.shape)} does not fit KV caches {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)}: head_dim must match and heads divide by kv_heads")
    if block_tables.shape[0] != nb or context_lens.shape != (nb,):
        raise ValueError(f"need block_tables [{nb}, max_blocks] and context_lens [{nb}], "
                         f"got {tuple(block_tables.shape)}, {tuple(context_lens.shape)}")
    out = torch.empty_like(q)
    if nb == 0:
        return out
    group = heads // kvh
    lens = context_lens.contiguous()
    _decode_kernel[(nb, kvh)](q, k_cache, v_cache, block_tables, lens, out, float(scale),
                              *q.stride(), *out.stride(), *k_cache.stride(), *v_cache.stride(),
                              *block_tables.stride(),
                              BLOCK_SIZE=bs, BS_P=triton.next_power_of_2(bs), HEAD_DIM=hd,
                              HD_P=triton.next_power_of_2(hd), GROUP=group,
                              GROUP_P=triton.next_power_of_2(group))
    return out
