"""w8a8's LM head option (engine.quant.W8A8_LM_HEAD): bfloat16, or int8 rows with the layers'
grouped int8 activations; the tied embedding follows the head's form, each in its own cache."""
from __future__ import annotations

import pytest
import torch

from engine import quant_calib
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.quant import quantize_int8_rows, recipe, recipe_variant
from engine.sampling import SamplingParams
from tests.engine.test_quant_kernels import ck, rand  # noqa: F401 (ck: the kernels fixture)


def test_quantize_state_puts_the_head_in_the_form_asked():
    w = {"model.embed_tokens.weight": rand(50, 64, seed=1), "model.norm.weight": torch.ones(64),
         "model.layers.0.mlp.down_proj.weight": rand(64, 128, seed=2)}
    bf16 = quant_calib.quantize_state(w)
    assert bf16["model.embed_tokens.weight"].dtype == torch.bfloat16 and "model.embed_tokens.weight_scale" not in bf16
    int8 = quant_calib.quantize_state(w, lm_head="int8")
    codes, scale = quantize_int8_rows(w["model.embed_tokens.weight"])
    assert torch.equal(int8["model.embed_tokens.weight"], codes)
    assert torch.equal(int8["model.embed_tokens.weight_scale"], scale)
    assert int8["model.norm.weight"] is w["model.norm.weight"]
    assert torch.equal(int8["model.layers.0.mlp.down_proj.weight"], bf16["model.layers.0.mlp.down_proj.weight"])
    with pytest.raises(ValueError, match="w8a8 LM head must be one of bf16, int8, w8a16, got 'fp8'"):
        quant_calib.quantize_state(w, lm_head="fp8")


def test_recipe_variant_applies_inside_the_block_only():
    assert recipe("w8a8").lm_head == "w8a16"
    with recipe_variant("w8a8", lm_head="int8") as r:
        assert r.lm_head == "int8" and recipe("w8a8") is r and r.linear == "int8"
    assert recipe("w8a8").lm_head == "w8a16"
    with pytest.raises(ValueError, match="dtype must be one of"):
        with recipe_variant("int4", lm_head="int8"):
            pass


def test_int8_head_engine_uses_grouped_int8_rows_in_its_own_cache(tiny_model_dir, tmp_path, monkeypatch, ck):
    monkeypatch.setenv("HALFMOON_CACHE", str(tmp_path))
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    prompt = [list(range(100, 140))]
    with recipe_variant("w8a8", lm_head="bf16"):
        base = LLMEngine(tiny_model_dir, EngineConfig(num_blocks=32, dtype="w8a8"))
    with recipe_variant("w8a8", lm_head="int8"):
        eng = LLMEngine(tiny_model_dir, EngineConfig(num_blocks=32, dtype="w8a8"))
    assert len(list((tmp_path / "models").glob(f"{tiny_model_dir.name}-w8a8-*"))) == 2  # one cache per head form
    head, emb = eng.runner.model.lm_head, eng.runner.model.embed
    assert (head.form, head.act_group, head.weight.dtype) == ("int8", 64, torch.int8)
    assert head.weight is emb.weight and emb.scale is not None  # tied: one int8 table and its row scales
    assert base.runner.model.lm_head.form == "bf16"
    # the embedding rows are the bf16 table's to int8 rounding; the head's logits follow the reference
    ids = torch.tensor([3, 77, 1000])
    bf16_rows = base.runner.model.embed(ids)
    assert (emb(ids) - bf16_rows).abs().max() <= 0.6 * emb.scale[ids].max() + 1e-2 * bf16_rows.abs().max()
    x = rand(5, 64, seed=9)
    from engine import cpu_kernels
    from engine.model import _fused_linear

    got = _fused_linear(cpu_kernels.kernels(), x, head, skinny=True)
    ref = head.reference(x)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert len(eng.generate(prompt, params)[0]) == 6
