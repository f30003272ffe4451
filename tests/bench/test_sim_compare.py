"""The policy-comparison program on a small grid: it runs every cell, judges the default
policy against the best of the others, and writes rows and a plot."""
from __future__ import annotations

import json

import pytest

from bench.sim.compare import main


def test_the_policy_grid_runs_every_cell_and_judges_the_default(tmp_path, capsys):
    out = tmp_path / "policies.json"
    assert main(["policies", "--workloads", "tool_agent,uniform", "--loads", "0.6,1.2", "--requests", "400",
                 "--policies", "kv_centric,longest_prefix", "--json", str(out)]) == 0
    cells = json.loads(out.read_text())
    assert [(c["workload"], c["load"]) for c in cells] == [("tool_agent", 0.6), ("tool_agent", 1.2),
                                                            ("uniform", 0.6), ("uniform", 1.2)]
    for c in cells:
        assert [r["policy"] for r in c["rows"]] == ["kv_centric", "longest_prefix", "cost_aware"]
        assert all(r["requests"] == 400 and r["admission"] == "none" for r in c["rows"])
        by = {r["policy"]: r for r in c["rows"]}
        best = min(by["kv_centric"]["ttft_mean_s"], by["longest_prefix"]["ttft_mean_s"])
        assert abs(c["ttft_ratio"] - by["cost_aware"]["ttft_mean_s"] / best) < 1e-9
        assert c["speedup"] > 0
    assert cells[1]["speedup"] == 2 * cells[0]["speedup"]  # twice the load: twice as fast
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = capsys.readouterr().out
    assert "cells meet both targets" in text and "ratio = default / best other" in text


def test_too_few_requests_are_named_not_raised(capsys):
    for what in ("policies", "admission"):
        with pytest.raises(SystemExit) as exc:
            main([what, "--requests", "0", "--workloads", "uniform"])
        assert exc.value.code == 2
        assert "argument --requests: at least 2" in capsys.readouterr().err


def test_the_admission_grid_splits_precision_by_stage_and_bounds_the_gain_over_none(tmp_path, capsys):
    """Cells at 2x: the ceiling is 1 / none's SLO attainment and no mode's goodput passes it;
    the TTFT and TBT precisions split the judged rejections by reason, and their counts are
    the run's (a decode-bound run's split: tests/bench/test_sim_counterfactual.py)."""
    out = tmp_path / "admission.json"
    assert main(["admission", "--workloads", "uniform,shifting", "--loads", "2", "--requests", "600",
                 "--sample", "3", "--reference", "", "--json", str(out)]) == 0
    cells = json.loads(out.read_text())
    for c in cells:
        by = {r["admission"]: r for r in c["rows"]}
        none, early = by["none"], by["early"]
        assert c["goodput_ceiling_vs_none"] == pytest.approx(1 / none["slo_attainment"])
        for r in c["rows"]:  # every request within both SLOs is the most any mode can do
            assert r["goodput_rps"] <= c["goodput_ceiling_vs_none"] * none["goodput_rps"] * (1 + 1e-12)
        assert c["prefill_judged"] + c["decode_judged"] == c["judged"] == early["judged"]
        reasons = early["rejections_by_reason"]
        assert c["prefill_rejections"] == reasons.get("prefill_overloaded", 0)
        assert c["decode_rejections"] == reasons.get("decode_overloaded", 0)
        assert c["prefill_rejections"] + c["decode_rejections"] == c["rejections"]
    assert cells[0]["prefill_judged"] > 0
    text = capsys.readouterr().out
    assert "ceiling = the most any admission could gain over none" in text
    assert f"MISS (5x > ceiling {cells[0]['goodput_ceiling_vs_none']:.2f}x)" in text  # 600 requests: < 5x
