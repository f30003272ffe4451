"""Capacity pick on fake sweep results, and the CLI end to end on the fake target."""

import asyncio
import json

import pytest

from bench.replay import main
from bench.replay.fake_client import FakeClient
from bench.replay.report import group_reasons
from bench.replay.runner import ReplayConfig, run_sweep
from bench.replay.summary import SLO
from bench.replay.sweep import SweepPoint, effective_capacity, speedups_for_rates
from bench.replay.workload import ScaleConfig, TraceWindow


def points(*pairs):
    return [SweepPoint(speedup=rate, request_rate=rate, slo_attainment=met) for rate, met in pairs]


def test_capacity_is_the_highest_load_with_ninety_percent_meeting_slos():
    capacity = effective_capacity(points((1.0, 1.0), (2.0, 0.95), (4.0, 0.9), (8.0, 0.6)))
    assert capacity.request_rate == 4.0  # exactly 90% passes
    assert capacity.first_miss_below_capacity is None


def test_capacity_is_none_when_every_load_misses():
    capacity = effective_capacity(points((1.0, 0.89), (2.0, 0.5)))
    assert capacity.point is None and capacity.request_rate is None


def test_a_noisy_dip_below_capacity_is_flagged_not_hidden():
    capacity = effective_capacity(points((1.0, 0.99), (2.0, 0.85), (4.0, 0.92), (8.0, 0.3)))
    assert capacity.request_rate == 4.0
    assert capacity.first_miss_below_capacity.request_rate == 2.0


def test_capacity_threshold_is_configurable_and_checked():
    assert effective_capacity(points((1.0, 0.99), (2.0, 0.97)), threshold=0.98).request_rate == 1.0
    with pytest.raises(ValueError, match="threshold"):
        effective_capacity([], threshold=0.0)


def test_rates_become_speedups_of_the_window():
    assert speedups_for_rates([1.0, 4.0], base_rate=2.0) == [0.5, 2.0]
    with pytest.raises(ValueError):
        speedups_for_rates([0.0], base_rate=2.0)


def write_trace(path):
    rows = [
        {
            "timestamp": ts,
            "input_length": 704 if i < 2 else 720,
            "output_length": 40,
            "hash_ids": [0, 100 + i],
        }
        for i, ts in enumerate([0, 0, 500, 1000, 1500, 2000, 2500, 3000])
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_cli_sweeps_the_fake_target_and_writes_json_and_plots(tmp_path, capsys):
    trace = write_trace(tmp_path / "trace.jsonl")
    out = tmp_path / "result.json"
    status = main(
        [
            "--trace",
            str(trace),
            "--target",
            "fake",
            "--label",
            "fake-disagg",
            "--duration",
            "3",
            "--speedups",
            "4,8",
            "--output-scale",
            "0.1",
            "--fake-ttft-base",
            "0.001",
            "--fake-tbt",
            "0.002",
            "--fake-max-prompt-tokens",
            "22",
            "--cooldown",
            "0",
            "--json",
            str(out),
            "--plot-dir",
            str(tmp_path / "plots"),
        ]
    )
    assert status == 0
    doc = json.loads(out.read_text())
    assert doc["schema"] == "halfmoon.replay/1" and doc["label"] == "fake-disagg"
    assert [run["summary"]["speedup"] for run in doc["runs"]] == [4.0, 8.0]
    for run in doc["runs"]:
        summary = run["summary"]
        assert summary["requests"] == 7 and summary["accounted"]
        assert summary["request_rate"] == pytest.approx(7 * summary["speedup"] / 3.0)
        # prompts are 704 * 16 / 512 = 22 tokens, or ceil(720 * 16 / 512) = 23 (rejected)
        assert summary["rejected"] == 5 and summary["completed"] == 2
        assert all(r["reason"] == "prompt of 23 tokens exceeds 22" for r in run["requests"][2:])
    assert doc["capacity"]["request_rate"] is None  # 2/7 meet the SLOs at every load
    assert (tmp_path / "plots" / "latency_cdf.png").stat().st_size > 0
    assert (tmp_path / "plots" / "goodput_vs_rate.png").stat().st_size > 0
    assert "effective request capacity: below every load tried" in capsys.readouterr().out

    overlay = main(
        [
            "--trace",
            str(trace),
            "--max-requests",
            "2",
            "--overlay",
            str(out),
            "--plot-dir",
            str(tmp_path / "both"),
        ]
    )
    assert overlay == 0 and (tmp_path / "both" / "goodput_vs_rate.png").exists()


def test_overlay_must_be_a_replay_result(tmp_path, capsys):
    trace = write_trace(tmp_path / "trace.jsonl")
    other = tmp_path / "other.json"
    other.write_text('{"schema": "halfmoon.replay/1", "label": "x"}')
    assert main(["--trace", str(trace), "--overlay", str(other)]) == 2
    assert "malformed replay result" in capsys.readouterr().out


def test_cli_names_an_unreachable_http_target(tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    trace = write_trace(tmp_path / "trace.jsonl")
    assert main(["--trace", str(trace), "--target", f"http://127.0.0.1:{port}"]) == 2
    assert f"no HTTP frontend at 127.0.0.1:{port}" in capsys.readouterr().out


def test_cli_names_an_unreachable_grpc_target(tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    trace = write_trace(tmp_path / "trace.jsonl")
    assert main(["--trace", str(trace), "--target", f"grpc://127.0.0.1:{port}"]) == 2
    assert f"no conductor at 127.0.0.1:{port}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--target", "tcp://x"], "expected 'fake'"),
        (["--start", "100"], "no trace requests"),
        (["--start", "3", "--rates", "1,2"], "--rates needs a window"),
    ],
)
def test_cli_reports_bad_settings_clearly(tmp_path, capsys, argv, message):
    trace = write_trace(tmp_path / "trace.jsonl")
    assert main(["--trace", str(trace), *argv]) == 2
    assert message in capsys.readouterr().out


def test_report_groups_reasons_that_differ_only_in_numbers():
    reasons = {"queue wait 3.1s exceeds 3s": 2, "queue wait 12s exceeds 3s": 1, "node 7 died": 4}
    assert group_reasons(reasons) == {"queue wait #s exceeds #s": 3, "node # died": 4}


def test_each_sweep_run_starts_with_a_cold_prefix_cache(tmp_path):
    config = ReplayConfig(
        trace=write_trace(tmp_path / "trace.jsonl"),
        label="cold",
        scale=ScaleConfig(output_scale=0.05),
        window=TraceWindow(duration_s=3.0),
        speedups=(8.0, 8.0),
        slo=SLO(ttft_s=1.0, tbt_s=0.1),
        cooldown_s=0.0,
    )
    result = asyncio.run(run_sweep(config, FakeClient()))
    first, second = (run.summary for run in result.runs)
    # Block 0 opens every prompt: 6 of 7 requests hit its 16 tokens, of 22 or 23 each.
    assert first.prefix_hit_rate == pytest.approx(6 * 16 / (2 * 22 + 5 * 23))
    assert second.prefix_hit_rate == first.prefix_hit_rate  # run 1's prompts did not help
