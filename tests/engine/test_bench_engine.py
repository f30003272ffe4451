"""bench.engine end to end, tiny settings: every system and halfmoon dtype runs, rows and ratios are written."""
from __future__ import annotations

import json

import pytest

from bench.engine import main

pytestmark = [pytest.mark.real_model, pytest.mark.slow]


def test_bench_engine_writes_rows_for_every_system_and_dtype(tmp_path):
    out = tmp_path / "engine.json"
    assert main(["--batches", "1,2", "--new-tokens", "2", "--prefill-repeats", "1", "--threads", "1",
                 "--systems", "halfmoon,hf", "--dtypes", "float32,w8a8", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    got = {(r["system"], r["dtype"], r["phase"], r["batch"]) for r in data["rows"]}
    assert got == {(s, d, p, b) for s, d in (("halfmoon", "float32"), ("halfmoon", "w8a8"), ("hf", "float32"))
                   for p, b in (("prefill", 1), ("decode", 1), ("decode", 2))}
    assert all(r["tokens_per_s"] > 0 and r["mean_tokens_per_s"] > 0 and r["peak_rss_mb"] > 0 for r in data["rows"])
    weights = {(r["system"], r["dtype"]): r["weight_mb"] for r in data["rows"]}
    assert 537 < weights[("halfmoon", "float32")] < 539 and 138 < weights[("halfmoon", "w8a8")] < 140
    assert 537 < weights[("hf", "float32")] < 539  # the same fp32 parameters (tied embedding once)
    assert set(data["halfmoon_vs_hf"]) == {"prefill_b1", "decode_b1", "decode_b2",
                                           "w8a8_prefill_b1", "w8a8_decode_b1", "w8a8_decode_b2"}
    assert data["machine_load"]["before"]["cpus"] >= 1
    for r in data["rows"]:  # the hardware arithmetic of each row
        key = "weight_gb_per_s" if r["phase"] == "decode" else "linear_gflop_per_s"
        assert r[key] > 0, r
    assert len(data["bandwidth_notes"]) == 2  # one per halfmoon dtype's batch-1 decode row
