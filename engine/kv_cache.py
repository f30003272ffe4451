"""One preallocated KV region per node, split into fixed-size blocks.

Layout: ``[num_blocks, num_layers, 2 (K, V), block_size, num_kv_heads, head_dim]`` in the KV
dtype (float32 or bfloat16, `EngineConfig.kv_dtype`). A block is one contiguous run of
``block_bytes`` bytes holding every layer's K and V for its tokens, so a KV transfer is one
(offset, length) pair per block -- or per run of adjacent blocks. Two nodes exchanging KV must
agree on the whole layout, dtype included (KVLayout.kv_dtype, checked at registration).
"""
from __future__ import annotations

import torch

from engine.config import ModelConfig


def kv_shape(cfg: ModelConfig, num_blocks: int, block_size: int) -> tuple[int, ...]:
    return (num_blocks, cfg.num_layers, 2, block_size, cfg.num_kv_heads, cfg.head_dim)


class KVCache:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int,
                 tensor: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> None:
        shape = kv_shape(cfg, num_blocks, block_size)
        if tensor is None:
            tensor = torch.zeros(shape, dtype=dtype)
        elif tuple(tensor.shape) != shape or not tensor.is_contiguous():
            raise ValueError(f"KV tensor must be contiguous with shape {shape}, got {tuple(tensor.shape)}")
        elif tensor.dtype != dtype:
            raise ValueError(f"KV tensor must be {dtype}, got {tensor.dtype}")
        self.tensor = tensor
        self.num_blocks = num_blocks
        self.block_size = block_size
        # per-layer strided views [num_blocks, block_size, kv_heads, head_dim]
        self.k = [tensor[:, layer, 0] for layer in range(cfg.num_layers)]
        self.v = [tensor[:, layer, 1] for layer in range(cfg.num_layers)]

    @property
    def dtype_name(self) -> str:
        """'float32' | 'bfloat16': the name KVLayout.kv_dtype carries."""
        return str(self.tensor.dtype).removeprefix("torch.")

    @property
    def block_bytes(self) -> int:
        return self.tensor[0].numel() * self.tensor.element_size()

    def block_offset(self, block: int) -> int:
        return block * self.block_bytes

    def runs(self, blocks: list[int]) -> list[tuple[int, int]]:
        """Coalesce block ids into (byte_offset, byte_length) runs of adjacent blocks."""
        out: list[tuple[int, int]] = []
        bb = self.block_bytes
        for b in blocks:
            if out and out[-1][0] + out[-1][1] == b * bb:
                out[-1] = (out[-1][0], out[-1][1] + bb)
            else:
                out.append((b * bb, bb))
        return out
