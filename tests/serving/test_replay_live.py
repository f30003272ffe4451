"""A short live trace replay (about a minute) against a small cluster: every request is
accounted for (completed, rejected with a reason, or failed with a reason)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import start_cluster

pytestmark = pytest.mark.slow

TRACE = Path(__file__).resolve().parents[2].parent / "shared" / "traces" / "conversation_trace.jsonl"


def test_short_replay_accounts_for_every_request(tiny_model_dir, tmp_path):
    if not TRACE.is_file():
        pytest.skip(f"trace not found at {TRACE}")
    from bench.replay import main

    cluster = start_cluster(1, 1, model=str(tiny_model_dir), max_model_len=1024,
                            settings={"ttft_slo_s": 5.0, "tbt_slo_s": 1.0})
    try:
        out = tmp_path / "replay.json"
        rc = main(["--trace", str(TRACE), "--target", f"grpc://{cluster.address}", "--label", "1p1d-tiny",
                   "--duration", "60", "--speedup", "2", "--max-requests", "40", "--output-scale", "0.05",
                   "--max-output-tokens", "16", "--max-input-tokens", "512", "--request-timeout", "60",
                   "--ttft-slo", "5", "--tbt-slo", "1", "--json", str(out), "--plot-dir", str(tmp_path / "plots")])
        assert rc == 0
        result = json.loads(out.read_text())
        (run,) = result["runs"]
        assert run["summary"]["accounted"] is True
        reqs = run["requests"]
        assert len(reqs) >= 20
        outcomes = {r["outcome"] for r in reqs}
        assert outcomes <= {"completed", "rejected", "failed"}
        for r in reqs:
            if r["outcome"] == "completed":
                assert 1 <= r["output_tokens"] <= 16 and r["ttft_s"] > 0
            else:
                assert r["reason"], r
        assert sum(r["outcome"] == "completed" for r in reqs) >= len(reqs) // 2
        assert (tmp_path / "plots" / "latency_cdf.png").is_file()
    finally:
        cluster.stop()
