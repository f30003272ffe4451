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
