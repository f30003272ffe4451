"""bench.quality on the tiny random-weight model: float32 scores itself perfectly, recipe
variants load beside their dtype and score apart from it, MMLU answers are paired."""
from __future__ import annotations

import pytest

from bench import quality


def test_parse_variant():
    assert quality.parse_variant("w8a8") == ("w8a8", {})
    assert quality.parse_variant("w8a8:lm_head=int8") == ("w8a8", {"lm_head": "int8"})
    assert quality.parse_variant("fp8:linear=fp8+lm_head=int8") == ("fp8", {"linear": "fp8", "lm_head": "int8"})
    with pytest.raises(SystemExit, match="options are linear=FORM or lm_head=FORM"):
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
    res = quality.run(["w8a8", "w8a8:lm_head=int8", "bfloat16"], windows, questions, 1, log=lambda *_: None,
                      model=tiny_model_dir)
    rows = {r["dtype"]: r for r in res["rows"]}
    assert list(rows) == ["float32", "w8a8", "w8a8:lm_head=int8", "bfloat16"]  # float32 first, always
    f = rows["float32"]
    assert (f["top1_agreement"], f["kl_mean"], f["mmlu_delta"], f["mmlu_delta_se"]) == (1.0, 0.0, 0.0, 0.0)
    assert all(r["positions"] == 3 * 64 and r["mmlu_questions"] == 6 for r in rows.values())
    for d in ("w8a8", "w8a8:lm_head=int8", "bfloat16"):
        assert 0 < rows[d]["kl_mean"] and 0 < rows[d]["top1_agreement"] <= 1.0
    assert rows["w8a8:lm_head=int8"]["kl_mean"] != rows["w8a8"]["kl_mean"]
    # the int8 head halves the head's bytes: 2 bytes a weight -> 1 (+ a 4-byte scale per row)
    vocab, hidden = 49152, 64
    assert res["weight_mb"]["w8a8"] - res["weight_mb"]["w8a8:lm_head=int8"] == pytest.approx(
        (vocab * hidden - vocab * 4) / 1e6, abs=0.15)
