"""fp8 with GPTQ's rounding (engine.quant_calib.ensure_fp8): calibrated once, cached, loaded."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from engine import quant_calib
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.gptq import dequantize
from engine.loader import load_model
from engine.quant import QLinear, recipe, recipe_variant
from engine.sampling import SamplingParams

SMALL = {"n_seqs": 2, "seq_len": 64}  # calibration that fits a unit test


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HALFMOON_CACHE", str(tmp_path))
    return tmp_path


def test_the_cache_is_produced_once_and_reused(tiny_model_dir, cache, monkeypatch, capsys):
    calls = []
    real = quant_calib.collect_hessians
    monkeypatch.setattr(quant_calib, "collect_hessians", lambda *a: calls.append(a) or real(*a))
    out = quant_calib.ensure_fp8(tiny_model_dir, **SMALL)
    assert calls == [(tiny_model_dir, 2, 64)] and out.parent == cache / "models"
    assert "fp8: calibrating GPTQ on 2 x 64 tokens" in capsys.readouterr().out
    info = json.loads((out / "quantization.json").read_text())
    assert info["dtype"] == "fp8" and info["calibration"]["tokens_per_sequence"] == 64
    assert info["gptq"]["damp"] == quant_calib.GptqSettings().damp
    again = quant_calib.ensure_fp8(tiny_model_dir, **SMALL)
    assert again == out and len(calls) == 1  # the second call found it: no calibration
    other = quant_calib.ensure_fp8(tiny_model_dir, **SMALL, settings=quant_calib.GptqSettings(damp=0.5))
    assert other != out and len(calls) == 2  # other settings, another key


def test_the_cached_state_is_fp8b_codes_for_every_layer_linear(tiny_model_dir, cache):
    out = quant_calib.ensure_fp8(tiny_model_dir, **SMALL)
    state = load_file(str(out / "model.safetensors"))
    src = load_file(str(tiny_model_dir / "model.safetensors"))
    linears = [n for n in src if n.endswith("_proj.weight")]
    assert len(linears) == 2 * 7
    for n in linears:
        codes, scale = state[n], state[n + "_scale"]
        assert codes.dtype == torch.float8_e4m3fn and codes.shape == src[n].shape
        assert scale.shape == (src[n].shape[0], src[n].shape[1] // 32)
        err = (dequantize(codes, scale) - src[n]).pow(2).mean() / src[n].pow(2).mean()
        assert err < 0.01, (n, float(err))  # E4M3's ~2.5% RMS, some more for the error GPTQ moved
    assert state["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert state["model.norm.weight"].dtype == torch.float32
    rtn = {n: QLinear.make("fp8b", src[n]).weight for n in linears}
    assert any(not torch.equal(state[n].float(), rtn[n].float()) for n in linears)  # GPTQ chose other codes


def test_fp8_loads_the_gptq_cache_and_rtn_is_a_variant(tiny_model_dir, cache, monkeypatch):
    assert recipe("fp8").rounding in ("gptq", "rtn")
    made = []
    real = quant_calib.ensure_fp8
    monkeypatch.setattr(quant_calib, "ensure_fp8", lambda d, **kw: made.append(d) or real(d, **kw | SMALL))
    with recipe_variant("fp8", rounding="gptq"):
        m = load_model(tiny_model_dir, dtype="fp8", progress=False)
        eng = LLMEngine(tiny_model_dir, EngineConfig(num_blocks=32, dtype="fp8"))
    assert made == [tiny_model_dir, tiny_model_dir] and m.weights_dir == real(tiny_model_dir, **SMALL)
    cached = load_file(str(m.weights_dir / "model.safetensors"))
    qkv = eng.runner.model.layers[0].qkv
    assert qkv.form == "fp8b" and qkv.w_group == 32
    want = torch.cat([cached[f"model.layers.0.self_attn.{p}_proj.weight"].float() for p in "qkv"])
    assert torch.equal(qkv.weight.float(), want)
    with recipe_variant("fp8", rounding="rtn"):
        plain = load_model(tiny_model_dir, dtype="fp8", progress=False)
    assert plain.weights_dir == tiny_model_dir and len(made) == 2
    n = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(plain.weights[n].float(), QLinear.make("fp8b", load_file(
        str(tiny_model_dir / "model.safetensors"))[n]).weight.float())
    out = eng.generate([list(range(100, 140))], SamplingParams(max_tokens=6, ignore_eos=True))
    assert len(out[0]) == 6


def test_halfmoon_quantize_fp8(tiny_model_dir, cache, capsys):
    assert quant_calib.main(["--model", str(tiny_model_dir), "--dtype", "fp8", "--calib-seqs", "2",
                             "--calib-len", "64"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed == str(quant_calib.ensure_fp8(tiny_model_dir, **SMALL))
