"""The triton paged-KV kernels give exactly what the torch path gives, checked on CPU.

triton reads TRITON_INTERPRET when its kernels are defined, so the checks run once in a child
process started with TRITON_INTERPRET=1 (this file run as a script); the variable never
reaches the rest of the test session. Each check below is one test here, reported from that run.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

BLOCK_SIZE, KV_HEADS, HEAD_DIM = 16, 3, 64
NUM_BLOCKS, NUM_LAYERS = 12, 3
REPO = Path(__file__).resolve().parents[2]
RESULT_MARK = "TRITON-CHECKS:"


def full_kv(seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A whole node's KV region, laid out as engine/kv_cache.py lays it out."""
    g = torch.Generator().manual_seed(seed)
    shape = (NUM_BLOCKS, NUM_LAYERS, 2, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    return torch.randn(shape, generator=g).to(dtype)


def new_kv(n: int, seed: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """This step's K and V, [n, kv_heads, head_dim], as strided slices of one projection."""
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(n, 2, KV_HEADS, HEAD_DIM, generator=g).to(dtype)
    return kv[:, 0], kv[:, 1]


def slots_of(tables: list[list[int]], lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(block, offset) of every token 0..len-1 of each sequence, through its block table."""
    blocks, offsets = [], []
    for table, n in zip(tables, lengths):
        for pos in range(n):
            blocks.append(table[pos // BLOCK_SIZE])
            offsets.append(pos % BLOCK_SIZE)
    return torch.tensor(blocks), torch.tensor(offsets)


def scatter_both(kv: torch.Tensor, layer: int, k, v, blocks, offsets) -> tuple[torch.Tensor, torch.Tensor]:
    from engine import triton_kernels as tk
    from engine.attention import AttentionMetadata, write_kv

    ref, got = kv.clone(), kv.clone()
    meta = AttentionMetadata(slot_blocks=blocks, slot_offsets=offsets, decode=None, prefills=[])
    write_kv(ref[:, layer, 0], ref[:, layer, 1], k, v, meta)
    tk.paged_kv_scatter(got[:, layer, 0], got[:, layer, 1], k, v, blocks, offsets)
    return ref, got


# --- checks (run in the interpreted child process) ---------------------------------------

def check_scatter_random_slots_into_strided_layer_view():
    g = torch.Generator().manual_seed(1)
    flat = torch.randperm(NUM_BLOCKS * BLOCK_SIZE, generator=g)[:40]  # distinct, any order
    k, v = new_kv(40, seed=2)
    assert not k.is_contiguous()
    ref, got = scatter_both(full_kv(0), 1, k, v, flat // BLOCK_SIZE, flat % BLOCK_SIZE)
    assert torch.equal(got, ref)  # the whole region: other layers and K/V halves untouched


def check_scatter_prefill_and_decode_partial_blocks():
    tables = [[7, 2], [11, 0, 5, 3], [4]]  # out-of-order blocks
    lengths = [20, 37, 5]  # every last block partly filled
    kv = full_kv(3)
    blocks, offsets = slots_of(tables, lengths)
    k, v = new_kv(len(blocks), seed=4)
    ref, got = scatter_both(kv, 2, k, v, blocks, offsets)
    assert torch.equal(got, ref)
    # then one decode token per sequence at position len
    db = torch.tensor([t[n // BLOCK_SIZE] for t, n in zip(tables, lengths)])
    do = torch.tensor([n % BLOCK_SIZE for n in lengths])
    k, v = new_kv(3, seed=5)
    ref2, got2 = scatter_both(ref, 0, k, v, db, do)
    assert torch.equal(got2, ref2)


def check_scatter_half_precision_and_empty_step():
    g = torch.Generator().manual_seed(6)
    flat = torch.randperm(NUM_BLOCKS * BLOCK_SIZE, generator=g)[:9]
    k, v = new_kv(9, seed=7, dtype=torch.float16)
    ref, got = scatter_both(full_kv(8, torch.float16), 0, k, v, flat // BLOCK_SIZE, flat % BLOCK_SIZE)
    assert torch.equal(got, ref)
    empty = torch.zeros(0, dtype=torch.long)
    k0, v0 = new_kv(0, seed=9)
    ref, got = scatter_both(full_kv(10), 1, k0, v0, empty, empty)
    assert torch.equal(got, ref)


def check_gather_2d_tables_with_repeats_and_disorder():
    from engine import triton_kernels as tk
    from engine.attention import _gather

    kv = full_kv(11)
    g = torch.Generator().manual_seed(12)
    tables = [torch.tensor([[7, 7, 2, 0, 11], [3, 1, 0, 0, 0], [11, 10, 9, 8, 4]]),  # 0 = padding
              torch.randint(0, NUM_BLOCKS, (4, 6), generator=g)]
    for layer in range(NUM_LAYERS):
        for kv_half in range(2):
            cache = kv[:, layer, kv_half]
            for table in tables:
                got = tk.paged_kv_gather(cache, table)
                assert got.shape == (table.shape[0], table.shape[1] * BLOCK_SIZE, KV_HEADS, HEAD_DIM)
                assert got.is_contiguous()
                assert torch.equal(got, _gather(cache, table).transpose(-3, -2))


def check_gather_1d_table_and_half_precision():
    from engine import triton_kernels as tk
    from engine.attention import _gather

    for dtype in (torch.float32, torch.float16):
        cache = full_kv(13, dtype)[:, 2, 1]
        table = torch.tensor([5, 9, 5, 0])  # a prefill chunk's table
        got = tk.paged_kv_gather(cache, table)
        assert got.shape == (4 * BLOCK_SIZE, KV_HEADS, HEAD_DIM) and got.dtype == dtype
        assert torch.equal(got, _gather(cache, table).transpose(-3, -2))
        # a strided table: a column slice of a wider one
        wide = torch.tensor([[1, 4, 6, 8], [2, 3, 0, 10]])
        assert torch.equal(tk.paged_kv_gather(cache, wide[:, ::2]),
                           _gather(cache, wide[:, ::2].contiguous()).transpose(-3, -2))


def check_decode_attention_matches_torch_decode_path():
    from engine import triton_kernels as tk
    from engine.attention import AttentionMetadata, DecodeGroup, paged_attention

    for heads in (9, 3):  # groups of 3 query heads per KV head, and plain multi-head
        tables = [[7, 2, 0, 0], [11, 0, 5, 3], [4, 0, 0, 0], [1, 6, 8, 0]]  # padded with 0
        lengths = [20, 64, 1, 33]  # new token included: partial, full, single, partial
        kv = full_kv(14)
        layer = 1
        blocks = torch.tensor([t[(n - 1) // BLOCK_SIZE] for t, n in zip(tables, lengths)])
        offsets = torch.tensor([(n - 1) % BLOCK_SIZE for n in lengths])
        table_t = torch.tensor(tables)
        width = table_t.shape[1] * BLOCK_SIZE
        mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :]
        meta = AttentionMetadata(slot_blocks=blocks, slot_offsets=offsets,
                                 decode=DecodeGroup(n=4, block_tables=table_t, mask=mask), prefills=[])
        g = torch.Generator().manual_seed(15 + heads)
        q = torch.randn(4, heads, HEAD_DIM, generator=g)
        k, v = new_kv(4, seed=16)
        scale = HEAD_DIM ** -0.5

        ref_kv = kv.clone()
        ref = paged_attention(q, k, v, ref_kv[:, layer, 0], ref_kv[:, layer, 1], meta, scale)
        got_kv = kv.clone()
        kc, vc = got_kv[:, layer, 0], got_kv[:, layer, 1]
        tk.paged_kv_scatter(kc, vc, k, v, blocks, offsets)
        got = tk.paged_decode_attention(q, kc, vc, table_t, torch.tensor(lengths), scale)
        assert torch.equal(got_kv, ref_kv)
        err = (got - ref).abs().max().item()
        assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), f"max abs error {err}"


CHECKS = {name[len("check_"):]: fn for name, fn in list(globals().items()) if name.startswith("check_")}


def _run_checks() -> dict:
    """The child process: run every check under the interpreter, report {name: error or None}."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    torch.set_num_threads(1)
    try:
        import triton  # noqa: F401
    except Exception as e:  # noqa: BLE001 -- any failure to import means: skip, with the reason
        return {"skip": f"triton cannot import: {type(e).__name__}: {e}"}
    results = {}
    for name, fn in CHECKS.items():
        try:
            fn()
            results[name] = None
        except Exception:  # noqa: BLE001 -- reported to the parent test as its failure
            results[name] = traceback.format_exc()
    return {"results": results}


# --- the tests (in the pytest session, no triton imported here) ---------------------------

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture(scope="module")
def interpreted() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, __file__], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"interpreted checks crashed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    report = json.loads(lines[-1][len(RESULT_MARK):])
    if "skip" in report:
        pytest.skip(report["skip"])
    return report["results"]


@pytest.mark.parametrize("name", list(CHECKS))
def test_triton_kernel_matches_torch_path(interpreted, name):
    error = interpreted[name]
    assert error is None, f"{name} under TRITON_INTERPRET=1:\n{error}"


if __name__ == "__main__":
    print(RESULT_MARK + json.dumps(_run_checks()))
