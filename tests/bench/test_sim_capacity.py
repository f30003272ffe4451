"""Calibrated load: a workload's load 1.0 is the fastest replay the policy without admission
keeps within both SLOs for 90% of requests, found by bisection in the simulator."""
from __future__ import annotations

import json

import pytest

from bench.sim.capacity import attainment, calibrate, offered_fraction
from bench.sim.cluster import SimConfig
from bench.sim.compare import at_load, base_requests, main
from conductor.cost_model import gpu_class_default

COSTS = gpu_class_default()
CONFIG = SimConfig(prefill_nodes=2, decode_nodes=2)


@pytest.fixture(scope="module")
def uniform():
    return base_requests("uniform", 300, 1)


def test_the_capacity_meets_the_target_and_a_slightly_faster_replay_does_not(uniform):
    cap = calibrate(uniform, CONFIG, COSTS, steps=5)
    assert cap.attainment >= 0.9 and cap.target == 0.9 and cap.policy == str(CONFIG.policy)
    # the run at the capacity's speed-up is the probe that found it (the simulator is deterministic)
    assert attainment(uniform, cap.speedup, CONFIG, COSTS) == cap.attainment
    assert (cap.offered_load, cap.attainment) in cap.probes
    assert cap.speedup == pytest.approx(cap.offered_load / offered_fraction(uniform, CONFIG, COSTS))
    # the bracket closed on it: the nearest faster probe missed the target, within one bisection step
    faster = [(x, a) for x, a in cap.probes if x > cap.offered_load]
    nearest = min(faster)
    assert nearest[1] < 0.9
    assert nearest[0] / cap.offered_load <= (2.0 / 0.25) ** (1 / 2**5) + 1e-9
    scaled, speedup = at_load(uniform, 2.0, CONFIG, COSTS, cap)
    assert speedup == 2.0 * cap.speedup
    assert scaled[-1].arrival_s == pytest.approx(uniform[-1].arrival_s / speedup)


def test_the_bracket_widens_when_the_cluster_holds_more_than_its_upper_end(uniform):
    # SLOs no run misses, and KV for every request: every probe meets the target
    big = SimConfig(prefill_nodes=2, decode_nodes=2, ttft_slo_s=3600.0, tbt_slo_s=10.0, decode_kv_tokens=10**9)
    cap = calibrate(uniform, big, COSTS, low=0.25, high=0.5, steps=1)
    assert [x for x, _ in cap.probes[:6]] == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0]  # doubled 4 times, then gave up
    assert all(a == 1.0 for _, a in cap.probes)


def test_the_admission_grid_runs_on_the_calibrated_scale(tmp_path, capsys):
    out = tmp_path / "admission.json"
    assert main(["admission", "--workloads", "uniform", "--loads", "0.5,2.0", "--requests", "300", "--prefill", "2",
                 "--decode", "2", "--admissions", "none,early", "--reference", "", "--json", str(out)]) == 0
    cells = json.loads(out.read_text())
    assert [(c["workload"], c["load"], c["load_scale"]) for c in cells] == [
        ("uniform", 0.5, "calibrated"), ("uniform", 2.0, "calibrated")]
    cap = cells[0]["capacity"]
    assert cap == cells[1]["capacity"] and cap["attainment"] >= 0.9 and cap["policy"] == "cost_aware"
    for c in cells:
        assert c["speedup"] == pytest.approx(c["load"] * cap["speedup"])
        assert [r["admission"] for r in c["rows"]] == ["none", "early"]
    assert "capacity =" in capsys.readouterr().err


def test_the_policy_grid_keeps_the_offered_scale_unless_asked(tmp_path):
    out = tmp_path / "policies.json"
    assert main(["policies", "--workloads", "uniform", "--loads", "1.0", "--requests", "200", "--prefill", "2",
                 "--decode", "2", "--policies", "least_loaded", "--json", str(out)]) == 0
    cell = json.loads(out.read_text())[0]
    requests = base_requests("uniform", 200, 1)
    assert cell["load_scale"] == "offered" and "capacity" not in cell
    assert cell["speedup"] == pytest.approx(1.0 / offered_fraction(requests, CONFIG, COSTS))


def test_a_stopped_grid_keeps_the_cells_it_finished(tmp_path, monkeypatch):
    import bench.sim.compare as compare

    real, done = compare.run_cell, []

    def stops_on_the_second(*args, **kwargs):
        if done:
            raise KeyboardInterrupt
        done.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(compare, "run_cell", stops_on_the_second)
    out = tmp_path / "policies.json"
    with pytest.raises(KeyboardInterrupt):
        main(["policies", "--workloads", "uniform", "--loads", "0.5,1.0", "--requests", "200", "--prefill", "2",
              "--decode", "2", "--policies", "least_loaded", "--json", str(out)])
    assert [c["load"] for c in json.loads(out.read_text())] == [0.5]
