"""bench.engine's verdicts and arithmetic on hand-made rows (no model runs)."""
from __future__ import annotations

import pytest

from bench.engine import Row, arithmetic, bandwidth_notes, matmul_params, summary_table, targets


def row(system, dtype, phase, batch, tps, weight_mb=100.0):
    return Row(system, dtype, phase, batch, tps, tps, 500.0, weight_mb)


ROWS = [
    row("halfmoon", "float32", "decode", 1, 50.0, 538.0),
    row("halfmoon", "bfloat16", "decode", 1, 85.0, 269.0),
    row("halfmoon", "w8a8", "prefill", 1, 2800.0, 164.0),
    row("halfmoon", "w8a8", "decode", 1, 120.0, 164.0),
    row("halfmoon", "w8a8", "decode", 8, 400.0, 164.0),
    row("halfmoon", "fp8", "decode", 8, 150.0, 164.0),
    row("hf-sdpa", "float32", "decode", 8, 100.0, 538.0),
    row("llama.cpp", "Q4_1", "prefill", 1, 1500.0, 100.0),
    row("llama.cpp", "Q4_1", "decode", 1, 85.0, 100.0),
]


def test_targets_give_each_ratio_its_goal_and_verdict():
    t = targets(ROWS)
    assert t["w8a8 decode b1 vs llama.cpp"] == {"ratio": round(120 / 85, 3), "goal": 1.2, "met": True}
    assert t["w8a8 prefill vs llama.cpp"] == {"ratio": round(2800 / 1500, 3), "goal": 2.0, "met": False}
    assert t["w8a8 decode b8 vs hf-sdpa fp32"] == {"ratio": 4.0, "goal": 2.0, "met": True}
    assert t["bfloat16 decode b1 vs float32"] == {"ratio": 1.7, "goal": 1.6, "met": True}
    assert t["fp8 decode b8 vs hf-sdpa fp32"] == {"ratio": 1.5, "goal": None, "met": None}
    assert "w8a8 decode b32 vs hf-sdpa fp32" not in t  # no b32 rows: left out, not guessed


def test_targets_leave_out_what_was_not_measured():
    assert "w8a8 decode b1 vs llama.cpp" not in targets([r for r in ROWS if r.system != "llama.cpp"])


def test_arithmetic_is_weight_bandwidth_for_decode_and_flops_for_prefill():
    assert arithmetic(ROWS[0], 10**8) == {"weight_gb_per_s": round(0.538 * 50, 2)}
    assert arithmetic(ROWS[4], 10**8) == {"weight_gb_per_s": round(0.164 * 400 / 8, 2)}
    assert arithmetic(ROWS[2], 10**8) == {"linear_gflop_per_s": 560.0}  # 2 * 1e8 * 2800 / 1e9


def test_bandwidth_notes_scale_the_fastest_streaming_rate_to_each_dtype():
    notes = bandwidth_notes(ROWS)
    # float32 streams 538 MB x 50 = 26.9 GB/s, the fastest: w8a8's 164 MB could go 164 tok/s
    assert notes[0].startswith("float32: 538 MB a step -> ceiling 50 tok/s at 26.9 GB/s (float32's rate)")
    assert notes[2].startswith("w8a8: 164 MB a step -> ceiling 164 tok/s")


def test_summary_table_has_one_line_per_system_and_dtype():
    t = summary_table(ROWS, [1, 8])
    assert [c.header for c in t.columns] == ["system", "dtype", "prefill", "decode b1", "decode b8"]
    assert t.row_count == 6
    assert list(t.columns[2].cells)[2] == "2800.0" and list(t.columns[3].cells)[0] == "50.0"


@pytest.mark.real_model
def test_matmul_params_of_smollm2_135m(real_model_dir):
    # 30 layers x (576 x 960 + 576 x 576 + 3 x 576 x 1536) + 49152 x 576 (the tied LM head)
    assert matmul_params(real_model_dir) == 30 * (576 * 960 + 576 * 576 + 3 * 576 * 1536) + 49152 * 576


def test_halfmoon_variants_parse_into_recipe_changes_and_the_step_mode():
    from bench.engine import halfmoon_variant

    assert halfmoon_variant("w8a8") == ("w8a8", {}, "one")
    assert halfmoon_variant("w8a8:lm_head=bf16") == ("w8a8", {"lm_head": "bf16"}, "one")
    assert halfmoon_variant("w8a8:lm_head=bf16+step=layers") == ("w8a8", {"lm_head": "bf16"}, "layers")
    assert halfmoon_variant("w8a8:step=calls") == ("w8a8", {}, "calls")
    assert halfmoon_variant("fp8:linear=fp8+step=one") == ("fp8", {"linear": "fp8"}, "one")
    for bad in ("w8a8:step=fast", "w8a8:threads=3", "w8a8:lm_head"):
        with pytest.raises(ValueError, match="options are linear=FORM, lm_head=FORM, step=one.calls.layers"):
            halfmoon_variant(bad)


@pytest.mark.slow  # (calibrates the tiny model twice: ~10 s quiet)
def test_a_variant_worker_runs_in_its_form_and_step_mode(tiny_model_dir, tmp_path, monkeypatch):
    """The worker of `w8a8:lm_head=bf16+step=layers` loads w8a8 with a bf16 head and runs decode
    steps layer by layer; its rows carry the variant as their dtype."""
    import engine.model
    from bench import engine as be

    monkeypatch.setenv("HALFMOON_CACHE", str(tmp_path))
    monkeypatch.setattr(be, "PROMPT_LEN", 24)
    seen = {}

    class Conn:
        def send(self, x):
            pass

    def answer(conn, prefill, decode_start, step, decode_end, weight_mb):
        seen["step_mode"] = (engine.model.DECODE_STEP, engine.model.DECODE_REGION)
        seen["weight_mb"] = weight_mb

    import engine.engine

    real = engine.engine.LLMEngine

    def make(*a, **k):
        if "config" not in k:  # the w8a8 calibration's own float32 engine
            return real(*a, **k)
        eng = real(tiny_model_dir, k["config"])
        seen["head"] = eng.runner.model.lm_head.form
        return eng

    monkeypatch.setattr(engine.engine, "LLMEngine", make)
    monkeypatch.setattr(be, "_answer", answer)
    monkeypatch.setattr(engine.model, "DECODE_STEP", True)
    monkeypatch.setattr(engine.model, "DECODE_REGION", True)
    be._serve_halfmoon(Conn(), 1, 1, 2, 1, "w8a8:lm_head=bf16+step=layers")
    assert seen["head"] == "bf16" and seen["step_mode"] == (False, False)
    be._serve_halfmoon(Conn(), 1, 1, 2, 1, "w8a8:step=calls")
    assert seen["head"] == "w8a16" and seen["step_mode"] == (True, False)
    be._serve_halfmoon(Conn(), 1, 1, 2, 1, "w8a8")
    assert seen["head"] == "w8a16" and seen["step_mode"] == (True, True)
    assert be.system_dtype("halfmoon/w8a8:lm_head=bf16") == "w8a8:lm_head=bf16"
