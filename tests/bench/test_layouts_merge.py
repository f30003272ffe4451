"""`bench.layouts --merge`: sweeps of the same layout pooled into one, every request
re-judged under one pair of SLOs, capacity recomputed over all loads."""
import json

from bench.layouts import main as layouts_main
from bench.replay import main as replay_main
from test_replay_sweep import write_trace


def fake_sweep(tmp_path, name, speedups, ttft_slo=1.0):
    trace = write_trace(tmp_path / "trace.jsonl")
    out = tmp_path / name
    out.mkdir()
    assert replay_main(["--trace", str(trace), "--target", "fake", "--label", "1p1d", "--duration", "3",
                        "--speedups", speedups, "--output-scale", "0.1", "--fake-ttft-base", "0.001",
                        "--fake-tbt", "0.002", "--cooldown", "0", "--ttft-slo", str(ttft_slo), "--tbt-slo", "0.5",
                        "--json", str(out / "1p1d.json")]) == 0
    runs = [{"speedup": r["summary"]["speedup"], "request_rate": r["summary"]["request_rate"],
             "slo_attainment": r["summary"]["slo_attainment"], "goodput": r["summary"]["goodput"],
             "tbt_p99_s": 0.01} for r in json.loads((out / "1p1d.json").read_text())["runs"]]
    (out / "summary.json").write_text(json.dumps({
        "layouts": {"1p1d": {"unloaded_ttft_s": 0.1, "unloaded_tbt_s": 0.01, "capacity_req_s": None, "runs": runs}},
        "slo": {"ttft_s": ttft_slo, "tbt_s": 0.5}}))
    return out


def test_merge_pools_runs_and_recomputes_capacity(tmp_path):
    low, high = fake_sweep(tmp_path, "low", "1,2"), fake_sweep(tmp_path, "high", "4")
    out = tmp_path / "merged"
    assert layouts_main(["--merge", str(low), str(high), "--out", str(out), "--layouts", "1p1d"]) == 0
    doc = json.loads((out / "1p1d.json").read_text())
    assert [r["summary"]["speedup"] for r in doc["runs"]] == [1.0, 2.0, 4.0]
    # the fake serves every request well within the SLOs: capacity is the highest pooled load
    assert doc["capacity"]["speedup"] == 4.0
    assert doc["capacity"]["request_rate"] == doc["runs"][-1]["summary"]["request_rate"]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["speedup"] for r in summary["layouts"]["1p1d"]["runs"]] == [1.0, 2.0, 4.0]
    assert (out / "plots" / "goodput_vs_rate.png").stat().st_size > 0


def test_merge_rejudges_every_request_under_one_pair_of_slos(tmp_path):
    a, b = fake_sweep(tmp_path, "a", "1"), fake_sweep(tmp_path, "b", "2", ttft_slo=2.0)
    out = tmp_path / "m"
    # the fake's TTFTs are milliseconds: a 1 us TTFT SLO fails every request of both sweeps
    assert layouts_main(["--merge", str(a), str(b), "--out", str(out), "--layouts", "1p1d",
                         "--ttft-slo", "0.000001", "--tbt-slo", "0.5"]) == 0
    doc = json.loads((out / "1p1d.json").read_text())
    assert doc["config"]["slo"] == {"ttft_s": 0.000001, "tbt_s": 0.5}
    assert [r["summary"]["slo_attainment"] for r in doc["runs"]] == [0.0, 0.0]
    assert [r["summary"]["goodput"] for r in doc["runs"]] == [0.0, 0.0]
    assert not any(q["meets_slo"] for r in doc["runs"] for q in r["requests"])
    assert doc["capacity"]["request_rate"] is None
