"""bench.engine end to end, tiny settings: both systems run, rows and ratios are written."""
from __future__ import annotations

import json

import pytest

from bench.engine import main

pytestmark = [pytest.mark.real_model, pytest.mark.slow]


def test_bench_engine_writes_rows_for_both_systems(tmp_path):
    out = tmp_path / "engine.json"
    assert main(["--batches", "1,2", "--new-tokens", "2", "--prefill-repeats", "1", "--threads", "1",
                 "--systems", "halfmoon,hf", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    got = {(r["system"], r["phase"], r["batch"]) for r in data["rows"]}
    assert got == {(s, p, b) for s in ("halfmoon", "hf") for p, b in (("prefill", 1), ("decode", 1), ("decode", 2))}
    assert all(r["tokens_per_s"] > 0 and r["mean_tokens_per_s"] > 0 and r["peak_rss_mb"] > 0 for r in data["rows"])
    assert set(data["halfmoon_vs_hf"]) == {"prefill_b1", "decode_b1", "decode_b2"}
    assert data["machine_load"]["before"]["cpus"] >= 1
