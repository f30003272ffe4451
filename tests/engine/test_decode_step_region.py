"""The decode step in one OpenMP parallel region (engine/csrc/decode_region.cpp): the same logits
and the same KV cache writes, bit for bit, as decode_step's kernel-by-kernel path, at batch 1-4, 8 and 33,
odd context lengths (split and unsplit attention), 1-3 threads, int8 layers per token and per
activation group, int8 and w8a16 heads; and the engine takes it for w8a8 steps of up to
REGION_MAX_ROWS rows, and only those."""
from __future__ import annotations

import pytest
import torch

import engine.model as em
from engine import cpu_kernels
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling import SamplingParams
from tests.engine.test_model_decode_step import Counting
from tests.engine.test_quant_kernels import ck  # noqa: F401  (ck: the kernels fixture)

HIDDEN, HEADS, KV_HEADS, HD, INTER, VOCAB, LAYERS, BS = 128, 6, 3, 32, 192, 320, 2, 16
NUM_BLOCKS = 160


def _int8_linear(g, n, k, form):
    """(weight, scale, row sums) of an int8 linear [n, k]: per-row scales (form 2, 3) or per
    row and 32 columns (form 4, w8a16)."""
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int32).to(torch.int8)
    if form == 4:
        return w, torch.rand(n, k // 32, generator=g) * 0.02 + 1e-3, torch.empty(0)
    return w, torch.rand(n, generator=g) * 0.02 + 1e-3, w.sum(1, dtype=torch.int32)


def _model(seed, layer_form, head_form):
    g = torch.Generator().manual_seed(seed)
    weights, forms = [], []
    width = (HEADS + 2 * KV_HEADS) * HD
    for _ in range(LAYERS):
        weights.append(1 + 0.1 * torch.randn(HIDDEN, generator=g))
        for n, k in ((width, HIDDEN), (HIDDEN, HEADS * HD)):
            weights.extend(_int8_linear(g, n, k, layer_form))
            forms.extend((layer_form, 64 if layer_form == 3 else 0))
        weights.append(1 + 0.1 * torch.randn(HIDDEN, generator=g))
        for n, k in ((2 * INTER, HIDDEN), (HIDDEN, INTER)):
            weights.extend(_int8_linear(g, n, k, layer_form))
            forms.extend((layer_form, 64 if layer_form == 3 else 0))
    weights.append(1 + 0.1 * torch.randn(HIDDEN, generator=g))
    weights.extend(_int8_linear(g, VOCAB, HIDDEN, head_form))
    forms.extend((head_form, 64 if head_form == 3 else 0))
    return weights, forms


def _step_inputs(seed, lens, last_slot=True):
    """A step's operands for sequences of `lens` tokens (their new token last), each with its own
    blocks; `last_slot` False: each new K/V goes to a spare block the attention does not read."""
    g = torch.Generator().manual_seed(seed)
    n = len(lens)
    # the engine's KV region [num_blocks, layers, 2, block_size, kv_heads, head_dim], bf16
    region = (torch.randn(NUM_BLOCKS, LAYERS, 2, BS, KV_HEADS, HD, generator=g) * 0.5).to(torch.bfloat16)
    perm = torch.randperm(NUM_BLOCKS - n, generator=g).tolist()
    max_blocks = max(-(-c // BS) for c in lens)
    tables, used = [], 0
    for c in lens:
        nb = -(-c // BS)
        tables.append(perm[used:used + nb] + [0] * (max_blocks - nb))
        used += nb
    tables_t = torch.tensor(tables, dtype=torch.long)
    pos = torch.tensor([c - 1 for c in lens])
    if last_slot:
        sb = torch.tensor([tables[s][(c - 1) // BS] for s, c in enumerate(lens)])
        so = pos % BS
    else:
        sb = torch.tensor([NUM_BLOCKS - 1 - s for s in range(n)])
        so = torch.tensor([s % BS for s in range(n)])
    x = torch.randn(n, HIDDEN, generator=g)
    return x, pos, sb, so, tables_t, torch.tensor(lens), region


def _rope(max_pos=1024):
    inv = 1.0 / (10000 ** (torch.arange(0, HD, 2).float() / HD))
    f = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv)
    emb = torch.cat([f, f], -1)
    return emb.cos(), emb.sin()


def _run(ck, fn, weights, forms, inputs):  # noqa: F811
    x, pos, sb, so, tables, lens, region = inputs
    region = region.clone()
    x = x.clone()
    ks = [region[:, li, 0] for li in range(LAYERS)]
    vs = [region[:, li, 1] for li in range(LAYERS)]
    cos, sin = _rope()
    logits = fn(x, pos, sb, so, tables, lens, cos, sin, ks, vs, weights, forms, HEADS, KV_HEADS, 1e-5,
                HD ** -0.5, True)
    return logits, x, region


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("lens", [[1], [17], [401], [700], [5, 33], [401, 230, 129], [63, 1, 400, 97],
                                  [9, 300, 41, 1, 77, 230, 16, 129]])
def test_region_equals_decode_step(ck, threads, lens):  # noqa: F811
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for seed, (layer_form, head_form) in enumerate([(3, 4), (2, 2), (2, 4), (3, 3)]):
            weights, forms = _model(seed, layer_form, head_form)
            assert ck.decode_region_supported(forms, len(lens))
            inputs = _step_inputs(seed + 10 * len(lens), lens)
            ref, ref_x, ref_kv = _run(ck, ck.decode_step, weights, forms, inputs)
            new, new_x, new_kv = _run(ck, ck.decode_region, weights, forms, inputs)
            assert ref.shape == (len(lens), VOCAB) and torch.isfinite(ref).all()
            assert torch.equal(new, ref), (layer_form, head_form, (new - ref).abs().max())
            assert torch.equal(new_x, ref_x)  # the residual stream left in x
            assert torch.equal(new_kv, ref_kv)  # the same K/V written, nothing else touched
            assert not torch.equal(new_kv, inputs[-1])
    finally:
        torch.set_num_threads(old_threads)


def test_region_equals_decode_step_at_33_rows(ck):  # noqa: F811
    weights, forms = _model(5, 3, 4)
    inputs = _step_inputs(5, [1 + 3 * i for i in range(33)])
    ref, _, ref_kv = _run(ck, ck.decode_step, weights, forms, inputs)
    new, _, new_kv = _run(ck, ck.decode_region, weights, forms, inputs)
    assert torch.equal(new, ref) and torch.equal(new_kv, ref_kv)


@pytest.mark.parametrize("threads", [1, 2])
def test_region_writes_slots_off_the_last_position(ck, threads):  # noqa: F811
    torch.set_num_threads(threads)
    try:
        weights, forms = _model(7, 3, 4)
        inputs = _step_inputs(3, [401, 40], last_slot=False)
        ref, _, ref_kv = _run(ck, ck.decode_step, weights, forms, inputs)
        new, _, new_kv = _run(ck, ck.decode_region, weights, forms, inputs)
        assert torch.equal(new, ref) and torch.equal(new_kv, ref_kv)
        spare = new_kv[NUM_BLOCKS - 2:]
        assert not torch.equal(spare, inputs[-1][NUM_BLOCKS - 2:])  # the K/V went to the spare blocks
    finally:
        torch.set_num_threads(2)


def test_region_refuses_what_it_does_not_cover(ck):  # noqa: F811
    weights, forms = _model(1, 3, 4)
    assert [ck.decode_region_supported(forms, n) for n in (0, 1, 8, 64, 65)] == [False, True, True, True, False]
    bf16_head = forms[:-2] + [1, 0]
    fp32_layer = [0, 0] + forms[2:]
    assert not ck.decode_region_supported(bf16_head, 1) and not ck.decode_region_supported(fp32_layer, 1)
    inputs = _step_inputs(0, [5])
    with pytest.raises(RuntimeError, match="not supported"):
        _run(ck, ck.decode_region, weights, bf16_head, inputs)


def test_engine_takes_the_region_for_small_w8a8_steps(tiny_model_dir, tmp_path, monkeypatch, ck):  # noqa: F811
    monkeypatch.setenv("HALFMOON_CACHE", str(tmp_path))
    eng = LLMEngine(tiny_model_dir, EngineConfig(num_blocks=96, dtype="w8a8"))
    counting = Counting(cpu_kernels.kernels(), ["decode_step", "decode_region"])
    monkeypatch.setattr(cpu_kernels, "kernels", lambda: counting)
    model = eng.runner.model
    forward = model.forward
    paths = []

    def spy(input_ids, positions, meta, kv, logits_indices):
        before = dict(counting.calls)
        out = forward(input_ids, positions, meta, kv, logits_indices)
        if not meta.prefills:
            paths.append((len(input_ids), "region" if counting.calls["decode_region"] > before["decode_region"]
                          else "step" if counting.calls["decode_step"] > before["decode_step"] else "layers"))
        return out

    monkeypatch.setattr(model, "forward", spy)
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    prompts = [list(range(100 + 3 * i, 130 + 5 * i)) for i in range(6)]
    monkeypatch.setattr(em, "REGION_MAX_ROWS", 4)  # the limit is read when the step plan is built
    with_region = eng.generate(prompts, params) + eng.generate(prompts[:1], params)
    assert {(6, "step"), (1, "region")} <= set(paths)
    assert all(p == ("region" if n <= 4 else "step") for n, p in paths)
    paths.clear()
    monkeypatch.setattr(em, "DECODE_REGION", False)
    without = eng.generate(prompts, params) + eng.generate(prompts[:1], params)
    assert without == with_region and paths and all(p == "step" for _, p in paths)


def test_region_barrier_and_solo_steps_with_more_threads_than_cores(ck):  # noqa: F811
    """More threads than cores: the region's barrier waiters outlast their spin and sleep on the
    futex while a partner is descheduled, such a step sends the next ones to a single thread,
    and the full team is tried again later; every step equals decode_step bit for bit (the
    attention splits stay the asked-for thread count's)."""
    import os

    threads = (os.cpu_count() or 1) + 3
    torch.set_num_threads(threads)
    try:
        weights, forms = _model(11, 3, 4)
        for rep in range(4):
            inputs = _step_inputs(20 + rep, [401, 230, 129] if rep % 2 else [700])
            ref, ref_x, ref_kv = _run(ck, ck.decode_step, weights, forms, inputs)
            teams = []
            for _ in range(600):
                new, new_x, new_kv = _run(ck, ck.decode_region, weights, forms, inputs)
                assert torch.equal(new, ref) and torch.equal(new_x, ref_x) and torch.equal(new_kv, ref_kv)
                team, sleeps = ck.decode_region_last()
                assert team in (1, threads) and (sleeps == 0 or team > 1)
                teams.append(team)
                if teams.count(threads) >= 2 and 1 in teams[teams.index(threads):]:
                    break
            assert teams.count(threads) >= 2 and 1 in teams[teams.index(threads):], teams
    finally:
        torch.set_num_threads(2)
