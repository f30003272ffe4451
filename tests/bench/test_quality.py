"""bench.quality on the tiny random-weight model: float32 scores itself perfectly, recipe
variants load beside their dtype and score apart from it, MMLU answers are paired."""
from __future__ import annotations

import pytest
import torch

from bench import quality


def test_parse_variant():
    assert quality.parse_variant("w8a8") == ("w8a8", {})
    assert quality.parse_variant("w8a8:lm_head=int8") == ("w8a8", {"lm_head": "int8"})
    assert quality.parse_variant("fp8:linear=fp8+lm_head=int8") == ("fp8", {"linear": "fp8", "lm_head": "int8"})
    assert quality.parse_variant("fp8:rounding=rtn") == ("fp8", {"rounding": "rtn"})
    with pytest.raises(SystemExit, match="options are linear=FORM, lm_head=FORM or rounding=rtn|gptq"):
        quality.parse_variant("w8a8:head=int8")


def test_mcnemar_counts_only_discordant_pairs():
    ref = [True, True, False, False, True]
    got = [True, False, True, True, True]  # one lost, two gained
    delta, se = quality.mcnemar(ref, got)
    assert delta == pytest.approx(20.0)
    assert se == pytest.approx(100 * (3 - 1 / 5) ** 0.5 / 5)


def test_run_scores_dtypes_and_variants_against_float32(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HALFMOON_CACHE", str(tmp_path))  # the tiny w8a8 caches go here
    windows = [list(range(300 + 7 * i, 364 + 7 * i)) for i in range(3)]
    questions = [{"topic": "t", "question": f"q{i}?", "answer_a": "x", "answer_b": "y", "answer_c": "z",
                  "answer_d": "w", "correct_answer": "ABCD"[i % 4]} for i in range(6)]
    res = quality.run(["w8a8", "w8a8:lm_head=bf16", "bfloat16"], windows, questions, 1, log=lambda *_: None,
                      model=tiny_model_dir)
    rows = {r["dtype"]: r for r in res["rows"]}
    assert list(rows) == ["float32", "w8a8", "w8a8:lm_head=bf16", "bfloat16"]  # float32 first, always
    f = rows["float32"]
    assert (f["top1_agreement"], f["kl_mean"], f["mmlu_delta"], f["mmlu_delta_se"]) == (1.0, 0.0, 0.0, 0.0)
    assert all(r["positions"] == 3 * 64 and r["mmlu_questions"] == 6 for r in rows.values())
    for d in ("w8a8", "w8a8:lm_head=bf16", "bfloat16"):
        assert 0 < rows[d]["kl_mean"] and 0 < rows[d]["top1_agreement"] <= 1.0
    assert rows["w8a8:lm_head=bf16"]["kl_mean"] != rows["w8a8"]["kl_mean"]
    # w8a8's w8a16 head halves the head's bytes: 2 bytes a weight -> 1 (+ a 4-byte scale per 32)
    vocab, hidden = 49152, 64
    assert res["weight_mb"]["w8a8:lm_head=bf16"] - res["weight_mb"]["w8a8"] == pytest.approx(
        (vocab * hidden - vocab * hidden // 32 * 4) / 1e6, abs=0.1)  # (each rounded to 0.1 MB)


def test_e4m3_weights_and_significand_rounding():
    from engine.quant import QLinear

    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(3))
    assert torch.equal(quality.e4m3_weights(w), QLinear.make("fp8", w).dequantized())
    assert torch.equal(quality.e4m3_weights(w, 32), QLinear.make("fp8b", w).dequantized())
    # in E4M3's normal range and at scale 1, its rounding is the 3-bit significand's
    x = torch.rand(4096, generator=torch.Generator().manual_seed(4)) * 400 + 0.02
    assert torch.equal(x.to(torch.float8_e4m3fn).float(), quality.significand_round(x, 3))
    assert torch.equal(quality.significand_round(torch.tensor([1.0625, 1.1875, 3.0]), 3), torch.tensor([1.0, 1.25, 3.0]))


def test_fp8_study_scores_each_variant(tiny_model_dir):
    windows = [list(range(300 + 7 * i, 364 + 7 * i)) for i in range(2)]
    study = [("fp32 W", lambda w: w, quality.LINEARS, "fp32"),
             ("E4M3 W, E4M3 A", quality.e4m3_weights, quality.LINEARS, "e4m3"),
             ("E4M3 W in down only", quality.e4m3_weights, ("down",), "fp32")]
    rows = {r["variant"]: r for r in quality.fp8_study(windows, 1, log=lambda *_: None, model=tiny_model_dir,
                                                        study=study)["rows"]}
    assert rows["fp32 W"]["weight_rel_rms_error"] == 0.0 and rows["fp32 W"]["positions"] == 128
    assert 0.01 < rows["E4M3 W, E4M3 A"]["weight_rel_rms_error"] < 0.05  # E4M3: ~2.6% RMS for smooth weights
    assert 0.01 < rows["E4M3 W in down only"]["weight_rel_rms_error"] < 0.05
    kl = {k: r["kl_mean"] for k, r in rows.items()}
    assert kl["fp32 W"] < kl["E4M3 W in down only"] < kl["E4M3 W, E4M3 A"], kl  # (fp32 W: the bf16 head alone)


def test_gptq_study_scores_each_setting_on_the_fp8_engine(tiny_model_dir):
    from engine.quant_calib import GptqSettings

    windows = [list(range(300 + 7 * i, 364 + 7 * i)) for i in range(2)]
    study = [("rtn", None), ("gptq", GptqSettings(damp=0.01, act_order=True))]
    res = quality.gptq_study(windows, 1, log=lambda *_: None, model=tiny_model_dir, study=study, calib=(2, 64))
    rows = {r["variant"]: r for r in res["rows"]}
    assert res["calibration"] == [2, 64] and all(r["positions"] == 128 for r in rows.values())
    assert rows["rtn"]["settings"] is None and rows["gptq"]["settings"]["act_order"] is True
    assert 0.01 < rows["rtn"]["weight_rel_rms_error"] < 0.05  # E4M3 per 32 columns
    # with the same scales, round to nearest has each weight's least error: GPTQ trades some for output error
    assert rows["gptq"]["weight_rel_rms_error"] > rows["rtn"]["weight_rel_rms_error"]
    assert rows["gptq"]["kl_mean"] != rows["rtn"]["kl_mean"] and rows["rtn"]["kl_mean"] > 0
