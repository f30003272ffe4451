"""The quantized weight forms (engine/quant.py) and their C++ kernels (engine/csrc/qgemm.cpp,
bfloat16 KV in attention.cpp / layer_ops.cpp) against the torch reference; the tiny model in
every dtype through the fused path and the torch path."""
from __future__ import annotations

import pytest
import torch

from engine import cpu_kernels
from engine.attention import _gather
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.quant import QLinear, int_mm, quantize_fp8_rows, quantize_int8_rows
from engine.sampling import SamplingParams

from tests.engine.test_cpu_kernels import random_decode, region_views, torch_reference

SHAPES = [(10, 64), (960, 576), (576, 1536)]
ROWS = [1, 2, 3, 5, 17, 64, 65, 130]  # 64 is the last skinny-kernel size, 65+ the GEMM path


def qgemm_built() -> bool:
    """Whether the AVX-512 VNNI/BF16 kernels are built on this CPU (else torch's run)."""
    mod = cpu_kernels.kernels()
    return mod is not None and mod.qgemm_supported()


@pytest.fixture(scope="module")
def ck():
    mod = cpu_kernels.kernels()
    if not qgemm_built():
        pytest.skip("the AVX-512 VNNI/BF16 kernels are not built on this CPU")
    return mod


def rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def test_int8_row_quantizer_codes_and_scales():
    x = torch.tensor([[0.5, -1.0, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0], [3.0, 1.5, -0.75, 2.999]])
    q, s = quantize_int8_rows(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert q.tolist() == [[64, -127, 32, 0], [0, 0, 0, 0], [127, 64, -32, 127]]  # 63.5 -> 64, 31.75 -> 32
    assert s.tolist() == pytest.approx([1 / 127, 0.0, 3 / 127])


def test_int_mm_is_exact():
    a = torch.randint(-127, 128, (5, 576), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    w = torch.randint(-127, 128, (96, 576), dtype=torch.int8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(int_mm(a, w), a.int() @ w.int().t())


@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("M", ROWS)
def test_int8_linear_matches_reference_exactly(ck, M, N, K):
    lin = QLinear.make("int8", rand(N, K, seed=N, scale=0.05))
    x = rand(M, K, seed=M)
    x[0, 3] = 40.0  # an outlier channel, as SmoothQuant sees them
    got = ck.int8_linear(x, lin.weight, lin.scale, lin.row_sums)
    assert torch.equal(got, lin.reference(x))


def test_int8_linear_of_a_zero_row_is_zero(ck):
    lin = QLinear.make("int8", rand(8, 64, scale=0.1))
    x = rand(3, 64)
    x[1] = 0
    assert ck.int8_linear(x, lin.weight, lin.scale, lin.row_sums)[1].abs().max().item() == 0


@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("M", [1, 3, 17, 64])
def test_bf16_linear_matches_reference(ck, M, N, K):
    lin = QLinear.make("bf16", rand(N, K, seed=N, scale=0.05))
    x = rand(M, K, seed=M)
    exact = x.bfloat16().double() @ lin.weight.double().t()  # what bf16 inputs with no rounding give
    got = ck.bf16_linear(x, lin.weight)
    assert (got.double() - exact).abs().max().item() < 1e-5 * exact.abs().max().item()
    # the torch reference (oneDNN) rounds its output to bf16: within that rounding
    assert torch.allclose(got, lin.reference(x), rtol=2 ** -8, atol=1e-3)


@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("M", ROWS)
def test_fp8_linear_matches_reference(ck, M, N, K):
    lin = QLinear.make("fp8", rand(N, K, seed=N, scale=0.05))
    x = rand(M, K, seed=M)
    ref = lin.reference(x)
    got = ck.fp8_linear(x, lin.weight.view(torch.uint8), lin.scale)
    # the same exact products, summed in another order
    tol = 1e-5
    assert (got - ref).abs().max().item() < tol * ref.abs().max().item()


def test_fp8_kernel_rounds_activations_like_torch(ck):
    """One-hot weights make each output one quantized input: E4M3 rounding (ties to even,
    the subnormal range, the top of the range) bit for bit as torch's float8_e4m3fn cast."""
    K = 64
    x = torch.cat([torch.linspace(-448, 448, 4 * K), torch.linspace(-0.05, 0.05, 4 * K), rand(8 * K)]).view(-1, K)
    x[:, 0] = 448.0  # pin each row's absmax so codes equal x itself (scale = 1)
    w = torch.eye(K)
    lin = QLinear.make("fp8", w)
    got = ck.fp8_linear(x, lin.weight.view(torch.uint8), lin.scale)
    xq, xs = quantize_fp8_rows(x)
    assert xs.tolist() == [1.0] * x.shape[0]
    assert torch.equal(got, (xq.float() @ lin.weight.float().t()) * xs.unsqueeze(1) * lin.scale)  # one product each


def test_qlinear_forms_and_sizes():
    w = rand(96, 64, scale=0.1)
    sizes = {f: QLinear.make(f, w).nbytes for f in ("f32", "bf16", "int8", "fp8")}
    assert sizes == {"f32": 96 * 64 * 4, "bf16": 96 * 64 * 2, "int8": 96 * 64 + 96 * 8, "fp8": 96 * 64 + 96 * 4}
    for f, tol in (("bf16", 2 ** -8), ("int8", 1 / 254), ("fp8", 2 ** -4)):
        err = (QLinear.make(f, w).dequantized() - w).abs() / w.abs().amax(dim=1, keepdim=True)
        assert err.max().item() <= tol * 1.0001, f


@pytest.mark.parametrize("n", [1, 5, 32])
def test_decode_attention_reads_bfloat16_kv(ck, n):
    heads, kvh, hd, bs, nb = 9, 3, 64, 16, 96
    k32, v32 = region_views(nb, bs, kvh, hd, seed=n)
    kb, vb = k32.bfloat16(), v32.bfloat16()
    tables, lens = random_decode(n, nb, bs, max_len=200, seed=n)
    q = rand(n, heads, hd, seed=3)
    out = torch.full_like(q, float("nan"))
    ck.decode_attention(out, q, kb, vb, tables, lens, hd ** -0.5)
    ref = torch_reference(q, kb.float(), vb.float(), tables, lens, hd ** -0.5)
    assert torch.allclose(out, ref, atol=2e-5, rtol=1e-4)


def test_prefill_attention_reads_bfloat16_kv(ck):
    heads, kvh, hd, bs, nb = 9, 3, 64, 16, 64
    k32, v32 = region_views(nb, bs, kvh, hd, seed=5)
    kb, vb = k32.bfloat16(), v32.bfloat16()
    table = torch.randperm(nb, generator=torch.Generator().manual_seed(4))[:10]
    ctx, n = 150, 37
    q = rand(n, heads, hd, seed=6)
    out = torch.full_like(q, float("nan"))
    ck.prefill_attention(out, q, kb, vb, table, ctx, hd ** -0.5)
    kk = _gather(kb, table)[:, :ctx].unsqueeze(0)
    vv = _gather(vb, table)[:, :ctx].unsqueeze(0)
    mask = torch.arange(ctx)[None] <= (torch.arange(n)[:, None] + ctx - n)
    ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1)[None], kk, vv, attn_mask=mask,
                                                           scale=hd ** -0.5, enable_gqa=True)[0].transpose(0, 1)
    assert torch.allclose(out, ref, atol=2e-5, rtol=1e-4)


def test_rope_write_kv_rounds_into_a_bfloat16_cache(ck):
    heads, kvh, hd, bs, nb, T = 4, 2, 16, 8, 6, 5
    qkv = rand(T, (heads + 2 * kvh) * hd, seed=7)
    pos = torch.tensor([0, 3, 9, 10, 2])
    blocks, offs = torch.tensor([1, 1, 4, 5, 0]), torch.tensor([0, 7, 3, 3, 6])
    cos, sin = rand(16, hd, seed=8), rand(16, hd, seed=9)
    caches = {}
    for dt in (torch.float32, torch.bfloat16):
        region = torch.zeros(nb, 2, 2, bs, kvh, hd, dtype=dt)
        x = qkv.clone()
        ck.rope_write_kv(x, pos, cos, sin, region[:, 1, 0], region[:, 1, 1], blocks, offs, heads, kvh)
        caches[dt] = region
    assert torch.equal(caches[torch.bfloat16], caches[torch.float32].bfloat16())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "fp8"])
def test_tiny_model_fused_path_matches_torch_path(tiny_model_dir, monkeypatch, dtype):
    """Logits of the fused C++ path and of the torch reference path, same weights and dtype."""
    from engine.attention import AttentionMetadata, PrefillChunk

    eng = LLMEngine(tiny_model_dir, EngineConfig(num_blocks=16, dtype=dtype))
    model, kv = eng.runner.model, eng.kv
    T = 20
    ids = torch.arange(100, 100 + T)
    meta = AttentionMetadata(torch.arange(T) // 16, torch.arange(T) % 16, None, [PrefillChunk(0, T, torch.arange(2), T)])
    rows = torch.arange(T)
    fused = model.forward(ids, torch.arange(T), meta, kv, rows)
    monkeypatch.setenv(cpu_kernels.DISABLE_ENV, "1")
    cpu_kernels.reset()
    try:
        ref = model.forward(ids, torch.arange(T), meta, kv, rows)
    finally:
        monkeypatch.delenv(cpu_kernels.DISABLE_ENV)
        cpu_kernels.reset()
    assert fused.shape == ref.shape == (T, eng.model_config.vocab_size)
    # bf16: the reference rounds GEMM outputs to bf16; fp8: fp32 differences upstream flip a few E4M3 codes
    tol = {"float32": 1e-4, "bfloat16": 3e-2, "fp8": 3e-2}[dtype]
    assert (fused - ref).abs().max().item() < tol * ref.abs().max().item()


def test_tiny_model_generates_in_every_dtype_with_its_kv_dtype(tiny_model_dir):
    expect_kv = {"float32": torch.float32, "bfloat16": torch.bfloat16, "fp8": torch.bfloat16}
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    for dtype, kv in expect_kv.items():
        eng = LLMEngine(tiny_model_dir, EngineConfig(num_blocks=32, dtype=dtype))
        assert eng.kv.tensor.dtype == kv and eng.kv.dtype_name == str(kv).removeprefix("torch.")
        assert eng.kv.block_bytes == 16 * 2 * 2 * 2 * 16 * kv.itemsize  # block x layers x K/V x kv_heads x head_dim
        outs = eng.generate([list(range(100, 130))], params)
        assert len(outs[0]) == 6
    eng = LLMEngine(tiny_model_dir, EngineConfig(num_blocks=32, dtype="bfloat16", kv_dtype="float32"))
    assert eng.kv.tensor.dtype == torch.float32


def test_bad_dtypes_are_refused_by_name(tiny_model_dir):
    with pytest.raises(ValueError, match="engine.dtype must be one of float32, bfloat16, w8a8, fp8, got 'float16'"):
        LLMEngine(tiny_model_dir, EngineConfig(dtype="float16"))
    with pytest.raises(ValueError, match="engine.kv_dtype must be auto or one of float32, bfloat16, got 'int4'"):
        LLMEngine(tiny_model_dir, EngineConfig(kv_dtype="int4"))


def test_smoothquant_folding_keeps_the_fp32_function(tiny_model_dir):
    """Scales folded into the norms, the Q/K/V / gate / up columns and the up rows: the fp32
    model computes the same logits (before any quantization)."""
    from engine import quant_calib
    from engine.loader import load_model
    from engine.model import LlamaModel

    loaded = load_model(tiny_model_dir)
    stats = quant_calib.collect_input_absmax(tiny_model_dir, n_seqs=2, seq_len=64)
    assert set(stats) == {(i, n) for i in range(2) for n in ("qkv", "o", "gate_up", "down")}
    assert stats[(0, "qkv")].shape == (64,) and stats[(0, "down")].shape == (128,)
    smoothed = quant_calib.smooth(loaded.weights, stats, loaded.config.num_layers)
    assert not torch.equal(smoothed["model.layers.0.input_layernorm.weight"],
                           loaded.weights["model.layers.0.input_layernorm.weight"])
    logits = []
    for w in (loaded.weights, smoothed):
        eng = LLMEngine(tiny_model_dir, EngineConfig(num_blocks=16))
        eng.runner.model = LlamaModel(loaded.config, w)
        from engine.attention import AttentionMetadata, PrefillChunk

        T = 24
        meta = AttentionMetadata(torch.arange(T) // 16, torch.arange(T) % 16, None,
                                 [PrefillChunk(0, T, torch.arange(2), T)])
        logits.append(eng.runner.model.forward(torch.arange(200, 200 + T), torch.arange(T), meta, eng.kv,
                                               torch.arange(T)))
    assert torch.allclose(logits[0], logits[1], rtol=1e-4, atol=1e-4)


def test_w8a8_is_calibrated_once_then_loaded_from_the_cache(tiny_model_dir, tmp_path, monkeypatch, ck):
    import json

    from engine import quant_calib

    monkeypatch.setenv("HALFMOON_CACHE", str(tmp_path))  # (the C++ kernels are already loaded)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    eng = LLMEngine(tiny_model_dir, EngineConfig(num_blocks=32, dtype="w8a8"))
    (qdir,) = (tmp_path / "models").glob(f"{tiny_model_dir.name}-w8a8-*")
    info = json.loads((qdir / "quantization.json").read_text())
    assert info["smoothquant"]["alpha"] == 0.5 and info["calibration"]["sequences"] == quant_calib.CALIB_SEQS
    model = eng.runner.model
    assert {q.form for q in model.linears()[:-1]} == {"int8"} and model.lm_head.form == "w8a16"
    assert model.embed.weight.dtype == torch.bfloat16  # the head untied: int8, the embedding table bf16
    assert eng.kv.tensor.dtype == torch.bfloat16
    first = eng.generate([list(range(100, 140))], params)

    def no_calibration(*a, **k):
        raise AssertionError("calibrated again instead of reading the cache")

    monkeypatch.setattr(quant_calib, "collect_input_absmax", no_calibration)
    again = LLMEngine(tiny_model_dir, EngineConfig(num_blocks=32, dtype="w8a8"))
    assert again.generate([list(range(100, 140))], params) == first


_TRITON_BF16_CHECK = r'''
import torch
from engine import triton_kernels as tk
from engine.attention import AttentionMetadata, DecodeGroup, paged_attention
g = torch.Generator().manual_seed(0)
region = torch.randn(12, 2, 2, 16, 3, 64, generator=g).bfloat16()
tables, lengths = [[7, 2, 0], [11, 0, 5], [4, 0, 0]], [20, 40, 1]
blocks = torch.tensor([t[(n - 1) // 16] for t, n in zip(tables, lengths)])
offsets = torch.tensor([(n - 1) % 16 for n in lengths])
table_t = torch.tensor(tables)
mask = (torch.arange(48)[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :]
meta = AttentionMetadata(blocks, offsets, DecodeGroup(3, table_t, mask), [])
q = torch.randn(3, 9, 64, generator=g)
k, v = torch.randn(3, 3, 64, generator=g), torch.randn(3, 3, 64, generator=g)
ref_kv, got_kv = region.clone(), region.clone()
ref = paged_attention(q, k, v, ref_kv[:, 1, 0], ref_kv[:, 1, 1], meta, 0.125)  # the torch path
kc, vc = got_kv[:, 1, 0], got_kv[:, 1, 1]
tk.paged_kv_scatter(kc, vc, k, v, blocks, offsets)
got = tk.paged_decode_attention(q, kc, vc, table_t, torch.tensor(lengths), 0.125)
assert torch.equal(got_kv, ref_kv), "scatter into a bfloat16 cache differs from the torch path's rounding"
assert got.dtype == torch.float32 and torch.allclose(got, ref, atol=1e-5, rtol=1e-5), (got - ref).abs().max()
print("TRITON-BF16-OK")
'''


def test_triton_kernels_take_a_bfloat16_kv_cache():
    """The GPU path's scatter and decode attention with a bfloat16 cache and fp32 queries, under
    TRITON_INTERPRET=1 in a child process (triton reads it at import)."""
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "HALFMOON_DISABLE_CPU_KERNELS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", _TRITON_BF16_CHECK], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=300)
    assert "TRITON-BF16-OK" in proc.stdout, proc.stdout + proc.stderr
