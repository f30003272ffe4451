"""Decode-only steps as one C++ call (engine/csrc/decode_step.cpp, `engine.model.DECODE_STEP`):
the same logits, bit for bit, as the layer-by-layer fused path in every dtype, and the same
tokens; steps with prefill rows, observers or linears without a kernel keep the old path."""
from __future__ import annotations

import pytest
import torch

import engine.model as em
from engine import cpu_kernels
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.quant import recipe_variant
from engine.sampling import SamplingParams
from tests.engine.test_quant_kernels import ck  # noqa: F401  (ck: the kernels fixture)


class Counting:
    """The kernels module, counting the calls to some of its functions."""

    def __init__(self, real, names):
        self.real, self.calls = real, {n: 0 for n in names}

    def __getattr__(self, name):
        if name in self.calls:
            self.calls[name] += 1
        return getattr(self.real, name)


def _engine(tiny_model_dir, dtype, head=None):
    if head is None:
        return LLMEngine(tiny_model_dir, EngineConfig(num_blocks=64, dtype=dtype))
    with recipe_variant(dtype, lm_head=head):
        return LLMEngine(tiny_model_dir, EngineConfig(num_blocks=64, dtype=dtype))


@pytest.mark.parametrize("dtype,head", [("float32", None), ("bfloat16", None), ("w8a8", None), ("w8a8", "bf16"),
                                        ("fp8", None)])
def test_decode_step_logits_equal_the_layer_by_layer_path(tiny_model_dir, tmp_path, monkeypatch, ck, dtype,
                                                          head):  # noqa: F811
    monkeypatch.setenv("HALFMOON_CACHE", str(tmp_path))
    eng = _engine(tiny_model_dir, dtype, head)
    model = eng.runner.model
    counting = Counting(cpu_kernels.kernels(), ["decode_step", "decode_region"])
    monkeypatch.setattr(cpu_kernels, "kernels", lambda: counting)
    forward = model.forward
    compared = []
    # w8a8 with its int8 layers and w8a16 head: one parallel region (engine/csrc/decode_region.cpp)
    region = dtype == "w8a8" and head is None

    def both(input_ids, positions, meta, kv, logits_indices):
        monkeypatch.setattr(em, "DECODE_STEP", False)
        before = dict(counting.calls)
        old = forward(input_ids, positions, meta, kv, logits_indices)
        assert counting.calls == before
        monkeypatch.setattr(em, "DECODE_STEP", True)
        new = forward(input_ids, positions, meta, kv, logits_indices)
        one_call = sum(counting.calls.values()) == sum(before.values()) + 1
        assert one_call == (not meta.prefills)  # decode-only steps, and only those, take the one call
        if one_call:
            assert counting.calls["decode_region"] == before["decode_region"] + region
        assert torch.equal(new, old)
        compared.append((len(input_ids), one_call))
        return new

    monkeypatch.setattr(model, "forward", both)
    prompts = [list(range(100 + 7 * i, 140 + 11 * i)) for i in range(3)]
    eng.generate(prompts, SamplingParams(max_tokens=5, ignore_eos=True))
    assert (3, True) in compared  # batch 3 decode steps went through it
    eng.generate([prompts[0]], SamplingParams(max_tokens=4, ignore_eos=True))
    assert compared[-1] == (1, True)  # and batch 1


def test_decode_step_generates_the_same_tokens(tiny_model_dir, tmp_path, monkeypatch, ck):  # noqa: F811
    monkeypatch.setenv("HALFMOON_CACHE", str(tmp_path))
    eng = _engine(tiny_model_dir, "w8a8")
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    prompts = [list(range(200, 260)), list(range(300, 317))]
    monkeypatch.setattr(em, "DECODE_STEP", False)
    old = eng.generate(prompts, params)
    monkeypatch.setattr(em, "DECODE_STEP", True)
    new = eng.generate(prompts, params)
    assert new == old and all(len(t) == 12 for t in new)


def test_decode_step_plan_refuses_a_linear_without_a_kernel(tiny_model_dir, ck):  # noqa: F811
    from dataclasses import replace

    from engine.quant import QLinear

    eng = _engine(tiny_model_dir, "w8a8")
    model = eng.runner.model
    weights, forms = model._decode_plan(ck)
    L = len(model.layers)
    assert len(weights) == 14 * L + 4 and len(forms) == 8 * L + 2
    assert forms[:8] == [3, 64, 3, 64, 3, 64, 3, 64] and forms[-2:] == [4, 0]  # grouped int8 layers, w8a16 head
    # an int8 linear whose activation group the kernel cannot take: the reference runs it, so the plan is off
    layer = model.layers[0]
    odd = QLinear(layer.o.form, layer.o.weight, layer.o.scale, layer.o.row_sums, 32)
    model.layers[0] = replace(layer, o=odd)
    model._step_plan = False
    assert model._decode_plan(ck) is None
