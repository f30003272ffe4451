"""The C++ CPU paged-attention kernel against the torch reference path, and the fallback."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from engine import cpu_kernels
from engine.attention import AttentionMetadata, DecodeGroup, PrefillChunk, _gather, paged_attention
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling import SamplingParams


@pytest.fixture(scope="module")
def ck():
    mod = cpu_kernels.kernels()
    if mod is None:
        pytest.skip("C++ CPU kernels could not be built here (see the logged warning)")
    return mod


def region_views(num_blocks: int, block_size: int, kvh: int, hd: int, layers: int = 3, seed: int = 0):
    """Per-layer K/V views of a KV region laid out like engine/kv_cache.py."""
    g = torch.Generator().manual_seed(seed)
    region = torch.randn(num_blocks, layers, 2, block_size, kvh, hd, generator=g)
    return region[:, 1, 0], region[:, 1, 1]


def random_decode(n: int, num_blocks: int, block_size: int, max_len: int, seed: int):
    """Random context lengths (many ending mid-block) and random, distinct block ids."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_len + 1, (n,), generator=g)
    lens[0] = max_len  # one sequence fills its table row
    max_blocks = -(-max_len // block_size)
    tables = torch.zeros(n, max_blocks, dtype=torch.long)
    for i in range(n):
        used = -(-int(lens[i]) // block_size)
        tables[i, :used] = torch.randperm(num_blocks, generator=g)[:used]
    return tables, lens


def torch_reference(q, k_cache, v_cache, tables, lens, scale):
    mask = (torch.arange(tables.shape[1] * k_cache.shape[1])[None] < lens[:, None])[:, None, None]
    out = F.scaled_dot_product_attention(q.unsqueeze(2), _gather(k_cache, tables), _gather(v_cache, tables),
                                         attn_mask=mask, scale=scale, enable_gqa=True)
    return out.squeeze(2)


@pytest.mark.parametrize("n", [1, 2, 7, 32])
@pytest.mark.parametrize("heads,kvh,hd", [(9, 3, 64), (6, 1, 64), (4, 2, 16), (4, 4, 128), (6, 2, 12)])
def test_decode_kernel_matches_torch(ck, n, heads, kvh, hd):
    bs, nb = 16, 96
    k_cache, v_cache = region_views(nb, bs, kvh, hd, seed=n)
    tables, lens = random_decode(n, nb, bs, max_len=70 if n > 8 else 300, seed=n + hd)
    q = torch.randn(n, heads, hd, generator=torch.Generator().manual_seed(1))
    out = torch.full_like(q, float("nan"))
    ck.decode_attention(out, q, k_cache, v_cache, tables, lens, hd ** -0.5)
    ref = torch_reference(q, k_cache, v_cache, tables, lens, hd ** -0.5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def torch_prefill_reference(q, k_cache, v_cache, table, context_len, scale):
    n = q.shape[0]
    kp = _gather(k_cache, table)[:, :context_len].unsqueeze(0)
    vp = _gather(v_cache, table)[:, :context_len].unsqueeze(0)
    mask = torch.arange(context_len)[None] <= torch.arange(n)[:, None] + (context_len - n)
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kp, vp, attn_mask=mask, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


@pytest.mark.parametrize("n,context_len", [(1, 1), (3, 3), (1, 37), (7, 30), (13, 200), (64, 64), (130, 260)])
@pytest.mark.parametrize("heads,kvh,hd", [(9, 3, 64), (4, 2, 16), (6, 2, 12)])
def test_prefill_kernel_matches_torch(ck, n, context_len, heads, kvh, hd):
    """A chunk of n new tokens after context_len - n cached ones, causal, blocks in random order."""
    bs, nb = 16, 40
    k_cache, v_cache = region_views(nb, bs, kvh, hd, seed=n)
    g = torch.Generator().manual_seed(context_len)
    table = torch.randperm(nb, generator=g)[: -(-context_len // bs)]
    q = torch.randn(n, heads + 3, hd, generator=g)[:, :heads]  # strided rows, as views of the QKV matmul
    out = torch.full((n, heads, hd), float("nan"))
    ck.prefill_attention(out, q, k_cache, v_cache, table, context_len, hd ** -0.5)
    torch.testing.assert_close(out, torch_prefill_reference(q, k_cache, v_cache, table, context_len, hd ** -0.5),
                               rtol=1e-5, atol=1e-5)


def test_prefill_kernel_rows_do_not_depend_on_the_chunking(ck):
    """Row i's output is bit-identical whether it is prefilled in one chunk or in pieces."""
    k_cache, v_cache = region_views(20, 16, 3, 64, seed=2)
    table = torch.tensor([4, 9, 1, 17, 3])
    q = torch.randn(70, 9, 64, generator=torch.Generator().manual_seed(8))
    whole = torch.empty_like(q)
    ck.prefill_attention(whole, q, k_cache, v_cache, table, 70, 0.125)
    pieces = torch.empty_like(q)
    for lo, hi in ((0, 5), (5, 6), (6, 37), (37, 70)):
        ck.prefill_attention(pieces[lo:hi], q[lo:hi], k_cache, v_cache, table, hi, 0.125)
    assert torch.equal(pieces, whole)


def test_decode_kernel_writes_strided_rows_and_reads_large_scores(ck):
    """Query/output rows inside a bigger tensor, one key far above the rest."""
    k_cache, v_cache = region_views(8, 16, 3, 64)
    k_cache[2, 5] *= 40  # a dominant score: the softmax must subtract the max
    tables = torch.tensor([[2, 0], [7, 2]])
    lens = torch.tensor([9, 32])
    big_q = torch.randn(5, 9, 64)
    big_out = torch.zeros(5, 9, 64)
    ck.decode_attention(big_out[1:3], big_q[1:3], k_cache, v_cache, tables, lens, 0.125)
    torch.testing.assert_close(big_out[1:3], torch_reference(big_q[1:3], k_cache, v_cache, tables, lens, 0.125),
                               rtol=1e-5, atol=1e-5)
    assert big_out[0].abs().sum() == 0 and big_out[3:].abs().sum() == 0


@pytest.mark.parametrize("threads", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_kernel_split_across_threads_matches_reference(ck, threads, dtype):
    """Few (sequence, kv head) tasks on several threads: each task's keys are split into ranges
    computed on different threads and combined (max-rescaled sums). One and two long sequences
    of 3 kv heads, with a dominant key in one range, must match the reference and the
    one-thread (unsplit) result."""
    k_cache, v_cache = region_views(96, 16, 3, 64)
    k_cache[5, 3] *= 30  # a dominant score in one range only: the ranges' maxima differ
    if dtype is torch.bfloat16:
        k_cache, v_cache = k_cache.to(dtype), v_cache.to(dtype)
    g = torch.Generator().manual_seed(3)
    cases = [(torch.randperm(96, generator=g)[:40].view(1, 40), torch.tensor([611])),
             (torch.randperm(96, generator=g)[:64].view(2, 32), torch.tensor([512, 289]))]
    cases[0][0][0, 7] = 5
    before = torch.get_num_threads()
    try:
        for tables, lens in cases:
            q = torch.randn(tables.shape[0], 9, 64, generator=g)
            ref = torch_reference(q, k_cache.float(), v_cache.float(), tables, lens, 0.125)
            outs = []
            for t in (1, threads):
                torch.set_num_threads(t)
                out = torch.empty_like(q)
                ck.decode_attention(out, q, k_cache, v_cache, tables, lens, 0.125)
                outs.append(out)
            for out in outs:
                torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(before)


def test_decode_kernel_rejects_bad_input(ck):
    k_cache, v_cache = region_views(4, 16, 3, 64)
    q = torch.randn(1, 9, 64)
    with pytest.raises(RuntimeError, match="block id out of range"):
        ck.decode_attention(torch.empty_like(q), q, k_cache, v_cache, torch.tensor([[9]]), torch.tensor([3]), 1.0)
    with pytest.raises(RuntimeError, match="context length"):
        ck.decode_attention(torch.empty_like(q), q, k_cache, v_cache, torch.tensor([[1]]), torch.tensor([17]), 1.0)


def test_paged_attention_uses_kernel_and_matches_fallback(ck, monkeypatch):
    """A mixed step (decodes + a prefill chunk with context) gives the same result either way."""
    heads, kvh, hd, bs, nb = 9, 3, 64, 16, 64
    k_cache, v_cache = region_views(nb, bs, kvh, hd, seed=5)
    tables, lens = random_decode(5, nb // 2, bs, max_len=100, seed=6)
    mask = (torch.arange(tables.shape[1] * bs)[None] < lens[:, None])[:, None, None]
    slot_b = [int(tables[i, (lens[i] - 1) // bs]) for i in range(5)]
    slot_o = [int(lens[i] - 1) % bs for i in range(5)]
    chunk_table = torch.arange(nb // 2, nb // 2 + 3)  # prefill: 10 earlier tokens + 20 new
    slot_b += [int(chunk_table[p // bs]) for p in range(10, 30)]
    slot_o += [p % bs for p in range(10, 30)]
    meta = AttentionMetadata(torch.tensor(slot_b), torch.tensor(slot_o), DecodeGroup(5, tables, mask, lens),
                             [PrefillChunk(5, 25, chunk_table, 30)])
    g = torch.Generator().manual_seed(7)
    q, k, v = torch.randn(25, heads, hd, generator=g), torch.randn(25, kvh, hd, generator=g), torch.randn(25, kvh, hd, generator=g)
    fast = paged_attention(q, k, v, k_cache, v_cache, meta, hd ** -0.5)
    monkeypatch.setenv(cpu_kernels.DISABLE_ENV, "1")
    cpu_kernels.reset()
    try:
        assert cpu_kernels.kernels() is None
        ref = paged_attention(q, k, v, k_cache, v_cache, meta, hd ** -0.5)
    finally:
        monkeypatch.delenv(cpu_kernels.DISABLE_ENV)
        cpu_kernels.reset()
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_engine_falls_back_when_kernels_cannot_build(tiny_model_dir, monkeypatch, caplog):
    """No compiler / no ninja: one warning, then the torch path gives the same tokens."""
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    prompts = [list(range(100, 100 + n)) for n in (3, 20, 37)]
    with_kernels = LLMEngine(tiny_model_dir, EngineConfig(num_blocks=64)).generate(prompts, params)

    def broken_build():
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpu_kernels, "_build", broken_build)
    cpu_kernels.reset()
    try:
        with caplog.at_level(logging.WARNING, logger="engine.cpu_kernels"):
            fallback = LLMEngine(tiny_model_dir, EngineConfig(num_blocks=64)).generate(prompts, params)
        assert cpu_kernels.kernels() is None
    finally:
        monkeypatch.undo()
        cpu_kernels.reset()
    warnings = [r for r in caplog.records if r.name == "engine.cpu_kernels"]
    assert len(warnings) == 1 and "Ninja is required" in warnings[0].getMessage()
    assert fallback == with_kernels


def test_norm_ops_match_torch(ck):
    from engine.model import rms_norm

    g = torch.Generator().manual_seed(3)
    for rows, d in ((1, 576), (130, 576), (5, 20)):
        x = torch.randn(rows, d, generator=g) * 3
        w = 1 + 0.1 * torch.randn(d, generator=g)
        delta = torch.randn(rows, d, generator=g)
        torch.testing.assert_close(ck.rms_norm(x, w, 1e-5), rms_norm(x, w, 1e-5), rtol=1e-6, atol=1e-6)
        x2 = x.clone()
        h = ck.add_rms_norm(x2, delta, w, 1e-5)
        assert torch.equal(x2, x + delta)  # the residual stream is updated in place
        torch.testing.assert_close(h, rms_norm(x + delta, w, 1e-5), rtol=1e-6, atol=1e-6)


def test_silu_mul_matches_torch(ck):
    gu = torch.randn(70, 2 * 100, generator=torch.Generator().manual_seed(4)) * 6
    ref = F.silu(gu[:, :100]) * gu[:, 100:]
    torch.testing.assert_close(ck.silu_mul(gu), ref, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("T", [1, 3, 100])
def test_rope_write_kv_matches_torch(ck, T):
    from engine.model import RotaryEmbedding

    heads, kvh, hd, bs, nb = 9, 3, 64, 16, 40
    rope = RotaryEmbedding(hd, 10000.0, 2048)
    g = torch.Generator().manual_seed(T)
    qkv = torch.randn(T, (heads + 2 * kvh) * hd, generator=g)
    positions = torch.randint(0, 2048, (T,), generator=g)
    slots = torch.randperm(nb * bs, generator=g)[:T]
    meta = AttentionMetadata(slots // bs, slots % bs, None, [])
    k_ref, v_ref = region_views(nb, bs, kvh, hd, seed=9)
    k_out, v_out = k_ref.clone(), v_ref.clone()
    cos, sin = rope.cos[positions].unsqueeze(1), rope.sin[positions].unsqueeze(1)
    q_ref = rope.apply(qkv[:, : heads * hd].view(T, heads, hd), cos, sin)
    k_new = rope.apply(qkv[:, heads * hd:(heads + kvh) * hd].view(T, kvh, hd), cos, sin)
    v_new = qkv[:, (heads + kvh) * hd:].view(T, kvh, hd)
    from engine.attention import write_kv

    write_kv(k_ref, v_ref, k_new, v_new, meta)
    out = qkv.clone()
    ck.rope_write_kv(out, positions, rope.cos, rope.sin, k_out, v_out, meta.slot_blocks, meta.slot_offsets, heads, kvh)
    assert torch.equal(out[:, : heads * hd].view(T, heads, hd), q_ref)  # same operations, same rounding
    assert torch.equal(out[:, heads * hd:(heads + kvh) * hd].view(T, kvh, hd), k_new)
    assert torch.equal(k_out, k_ref) and torch.equal(v_out, v_ref)


def test_fused_forward_matches_torch_forward(ck, tiny_model_dir, monkeypatch):
    """The whole model: logits of a mixed step (prefill chunk + decodes) agree with the torch path."""
    eng = LLMEngine(tiny_model_dir, EngineConfig(num_blocks=64, max_num_batched_tokens=40))
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    for i, n in enumerate((5, 30, 70)):
        eng.add_request(f"r{i}", params, prompt_token_ids=list(range(200 + i, 200 + i + n)))
    captured = []
    model = eng.runner.model
    real_forward = model.forward

    def both(*args):
        fused = real_forward(*args)
        monkeypatch.setenv(cpu_kernels.DISABLE_ENV, "1")
        cpu_kernels.reset()
        ref = real_forward(*args)  # rewrites the same K/V values into the cache
        monkeypatch.delenv(cpu_kernels.DISABLE_ENV)
        cpu_kernels.reset()
        captured.append((fused, ref))
        return fused

    monkeypatch.setattr(model, "forward", both)
    while eng.has_unfinished():
        eng.step()
    assert len(captured) >= 5
    for fused, ref in captured:
        torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("M", [1, 2, 3, 8, 33])
@pytest.mark.parametrize("N,K", [(960, 576), (13, 64), (576, 1536), (6, 8)])
def test_skinny_linear_matches_torch(ck, M, N, K):
    if not ck.skinny_linear_supported():
        pytest.skip("built without AVX2 + FMA")
    g = torch.Generator().manual_seed(M * N + K)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) / K ** 0.5
    torch.testing.assert_close(ck.skinny_linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_skinny_linear_rows_do_not_depend_on_the_batch(ck):
    """A decode token's numbers are the same alone or in a batch of any size (bit for bit)."""
    if not ck.skinny_linear_supported():
        pytest.skip("built without AVX2 + FMA")
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(37, 576, generator=g), torch.randn(1539, 576, generator=g)
    full = ck.skinny_linear(x, w)
    for lo, hi in ((0, 1), (5, 6), (3, 11), (0, 36)):
        assert torch.equal(ck.skinny_linear(x[lo:hi].contiguous(), w), full[lo:hi])


def test_a_stale_torch_build_lock_does_not_hang_the_next_start(tmp_path):
    """A process killed mid-build leaves torch's `lock` file; the next start must not wait on it."""
    import subprocess
    import sys

    from engine.cpu_kernels import disabled, kernels
    from engine.loader import cache_root

    if disabled() or kernels() is None:
        pytest.skip("C++ CPU kernels unavailable here")
    dirs = list((cache_root() / "torch_extensions").glob("halfmoon_cpu_*"))
    assert dirs
    for d in dirs:
        (d / "lock").write_text("")
    code = "from engine.cpu_kernels import kernels; import sys; sys.exit(0 if kernels() is not None else 3)"
    res = subprocess.run([sys.executable, "-c", code], timeout=240, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.parametrize("M,N,K", [(512, 960, 576), (100, 3072, 576), (65, 576, 1536), (70, 50, 64), (3, 17, 8)])
def test_split_linear_matches_torch(ck, M, N, K):
    g = torch.Generator().manual_seed(M + N)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) / K ** 0.5
    with torch.inference_mode():  # as the model calls it
        got = ck.split_linear(x, w)
    torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ck.split_linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_every_kernel_is_bound_releasing_the_gil(ck):
    """A node's other threads (gRPC streams, KV transfers) run while its engine thread is in a
    kernel: holding the GIL through a one-call decode step delivered tokens a step late."""
    lines = {line.split('"')[1]: line for line in cpu_kernels._bindings().splitlines() if "m.def(" in line}
    assert set(lines) == set(cpu_kernels._FUNCTIONS) and all(hasattr(ck, f) for f in lines)
    assert all("call_guard<pybind11::gil_scoped_release>" in line for line in lines.values())


def test_a_long_kernel_call_lets_another_python_thread_run(ck):
    import threading
    import time

    w = torch.randn(8192, 2048)
    ticks, stop = [0], threading.Event()

    def ticker():
        while not stop.is_set():
            ticks[0] += 1
            time.sleep(0.0005)

    t = threading.Thread(target=ticker)
    t.start()
    time.sleep(0.01)
    try:
        for rows in (64, 128, 256, 512, 1024, 2048):  # until one call takes tens of ms
            x = torch.randn(rows, 2048)
            before, t0 = ticks[0], time.perf_counter()
            ck.split_linear(x, w)
            took, ran = time.perf_counter() - t0, ticks[0] - before
            if took > 0.03:
                break
    finally:
        stop.set()
        t.join()
    assert took > 0.03, f"the call took {took * 1e3:.1f} ms: too short to judge"
    assert ran >= 5, f"the other thread ran {ran} times during a {took * 1e3:.0f} ms kernel call"
