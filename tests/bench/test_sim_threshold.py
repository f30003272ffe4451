"""The threshold sweep: one row per cell and threshold, judged against `none` of the same
cell; a threshold that rejects on a lower predicted load rejects more, and more wrongly."""
from __future__ import annotations

import json

import pytest

from bench.sim.threshold import main


def test_the_sweep_judges_every_threshold_against_none_of_its_cell(tmp_path, capsys):
    out = tmp_path / "threshold.json"
    assert main(["--workloads", "uniform", "--loads", "1.5", "--thresholds", "0.3,1.0,4.0", "--requests", "1000",
                 "--sample", "5", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["workload"], r["load"], r["threshold"]) for r in rows] == [("uniform", 1.5, t) for t in (0.3, 1.0, 4.0)]
    assert len({r["none_goodput_rps"] for r in rows}) == 1  # one `none` run per cell
    for r in rows:
        assert abs(r["goodput_vs_none"] - r["goodput_rps"] / r["none_goodput_rps"]) < 1e-12
        assert r["judged"] == (r["rejections"] + 4) // 5  # every 5th rejection, the first one too
    rejected = [r["row"]["rejected"] for r in rows]
    assert rejected[0] > rejected[1] >= rejected[2] > 0
    # a threshold under the SLO rejects requests that would have met it: precision falls
    assert rows[0]["precision"] < 0.5 < rows[1]["precision"]
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "3 rows" in capsys.readouterr().out


def test_bad_arguments_are_named_not_raised(capsys):
    for argv in (["--thresholds", "1.0,x"], ["--loads", "-1"], ["--workloads", "nope"], ["--thresholds", "0"],
                 ["--requests", "0"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2, argv
        assert f"argument {argv[0]}" in capsys.readouterr().err
