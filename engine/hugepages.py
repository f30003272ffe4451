"""Weights in transparent huge pages (CPU).

A decode step streams every weight once (w8a8 SmolLM2-135M: 139 MB a step). In torch's own
allocations those sit in 4 KiB pages -- ~34k pages a step, each a TLB miss and page walk;
the machine's THP setting is usually ``madvise``, so nothing gets huge pages unless it asks.
`huge_copies` copies tensors into one private anonymous mapping, 2 MiB aligned and advised
MADV_HUGEPAGE before it is touched, so the kernel backs it with 2 MiB pages where it can (it
falls back to 4 KiB pages silently; /proc/self/smaps' AnonHugePages shows which).
"""
from __future__ import annotations

import mmap

import torch

HUGE_PAGE = 2 << 20
ALIGN = 64  # each tensor starts on a cache line


def huge_copies(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Contiguous copies of `tensors` (same dtypes, shapes, values) laid out one after another
    in one huge-page-advised buffer (each 64-byte aligned, the first at a 2 MiB boundary); the
    tensors keep the buffer alive. The inputs themselves where the platform has no
    MADV_HUGEPAGE or the mapping fails."""
    if not tensors or not hasattr(mmap, "MADV_HUGEPAGE"):
        return list(tensors)
    sizes = [-(-t.numel() * t.element_size() // ALIGN) * ALIGN for t in tensors]
    length = -(-(sum(sizes) + HUGE_PAGE) // HUGE_PAGE) * HUGE_PAGE  # room to align the start
    try:
        buf = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        buf.madvise(mmap.MADV_HUGEPAGE)  # before the first touch: the faults then take 2 MiB pages
    except (OSError, ValueError):
        return list(tensors)
    base = torch.frombuffer(buf, dtype=torch.uint8)
    off = -base.data_ptr() % HUGE_PAGE
    out = []
    for t, size in zip(tensors, sizes):
        nbytes = t.numel() * t.element_size()
        u = base[off:off + nbytes].view(t.dtype).view(t.shape)
        u.copy_(t)
        out.append(u)
        off += size
    return out
