"""engine.hugepages: weights copied into one 2 MiB-aligned, MADV_HUGEPAGE-advised buffer, values
unchanged; the CPU model keeps every weight a decode step streams there and generates as before."""
from __future__ import annotations

import gc

import pytest
import torch

import engine.model as em
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.hugepages import HUGE_PAGE, huge_copies
from engine.sampling import SamplingParams


def _advised(ptr: int) -> bool:
    """Whether the mapping holding address `ptr` is advised MADV_HUGEPAGE (smaps VmFlags 'hg')."""
    vma = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(x, 16) for x in head.split("-"))
                vma = lo <= ptr < hi
            elif head == "VmFlags:" and vma:
                return "hg" in line.split()[1:]
    return False


def test_huge_copies_are_equal_aligned_and_advised():
    g = torch.Generator().manual_seed(0)
    ts = [torch.randint(-127, 128, (300, 64), generator=g, dtype=torch.int32).to(torch.int8),
          torch.rand(7, generator=g), torch.randint(0, 1000, (5,), generator=g, dtype=torch.int32),
          torch.empty(0), torch.randn(33, 17, generator=g).to(torch.bfloat16)]
    want = [t.clone() for t in ts]
    out = huge_copies(ts)
    del ts
    gc.collect()  # the copies keep their buffer alive without the originals
    assert len(out) == len(want)
    for o, w in zip(out, want):
        assert o.dtype == w.dtype and o.shape == w.shape and o.is_contiguous() and torch.equal(o, w)
    ptrs = [o.data_ptr() for o in out if o.numel()]
    assert ptrs[0] % HUGE_PAGE == 0 and all(p % 64 == 0 for p in ptrs)
    assert ptrs == sorted(ptrs) and ptrs[-1] - ptrs[0] < HUGE_PAGE  # one after another in one buffer
    assert all(_advised(p) for p in ptrs)
    assert not _advised(want[0].data_ptr())  # (torch's own allocations are not)
    out[1][0] = 5.0  # writable, and a copy
    assert want[1][0] != 5.0


@pytest.mark.parametrize("dtype", ["float32", "w8a8"])
def test_model_weights_live_in_huge_pages_and_generate_the_same(tiny_model_dir, tmp_path, monkeypatch, dtype):
    monkeypatch.setenv("HALFMOON_CACHE", str(tmp_path))
    prompts = [[5, 9, 33, 2, 71, 4], [8, 1, 1, 40]]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    outs, logits, models = [], [], []
    for huge in (False, True):
        monkeypatch.setattr(em, "HUGE_PAGES", huge)
        eng = LLMEngine(tiny_model_dir, EngineConfig(num_blocks=32, dtype=dtype))
        model = eng.runner.model
        forward, seen = model.forward, []
        model.forward = lambda *a, forward=forward, seen=seen: seen.append(forward(*a)) or seen[-1]
        outs.append(eng.generate(prompts, params))
        models.append(model)
        logits.append(seen)
    assert outs[0] == outs[1] and len(logits[0]) == len(logits[1]) > 10
    assert all(torch.equal(a, b) for a, b in zip(*logits))  # bit for bit, every step
    plain, model = models
    streamed = [t for layer in model.layers for t in (layer.ln1, layer.ln2)] + [model.norm] + [
        t for q in model.linears() for t in (q.weight, q.scale, q.row_sums) if t is not None]
    assert all(_advised(t.data_ptr()) for t in streamed)
    assert not any(_advised(t.data_ptr()) for q in plain.linears() for t in (q.weight,))
    assert model.weight_bytes == plain.weight_bytes
    if dtype == "float32":  # tied: the embedding reads the head's (huge-page) table, one copy
        assert model.embed.weight is model.lm_head.weight
