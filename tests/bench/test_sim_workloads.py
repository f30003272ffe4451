"""The seeded workload generators: deterministic per seed, Mooncake's format, and the shape
each one promises (statistics over 6,000 requests)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from bench.replay.trace import load_trace
from bench.sim.load import offered_load
from bench.sim.trace import to_sim_requests
from bench.sim.workloads import (BLOCK, GENERATORS, ShiftingShape, main, prefill_heavy_share, shifting,
                                 shifting_requests, stats, tool_agent, uniform, write_trace)
from conductor.cost_model import gpu_class_default

N = 6000


@pytest.fixture(scope="module", params=sorted(GENERATORS))
def generated(request):
    return request.param, GENERATORS[request.param](N, seed=7)


def test_same_seed_same_trace_other_seed_another(generated):
    name, records = generated
    assert GENERATORS[name](N, seed=7) == records
    assert GENERATORS[name](N, seed=8) != records


def test_records_follow_mooncakes_format(generated, tmp_path):
    _, records = generated
    assert len(records) == N
    assert all(len(r.hash_ids) == math.ceil(r.input_length / BLOCK) for r in records)
    assert [r.timestamp_ms for r in records] == sorted(r.timestamp_ms for r in records)
    assert records[0].timestamp_ms == 0
    # chained ids: the same id at a position means the same prefix up to it
    prefix_of: dict[int, tuple[int, ...]] = {}
    for r in records:
        for i, h in enumerate(r.hash_ids):
            assert prefix_of.setdefault(h, r.hash_ids[:i]) == r.hash_ids[:i]
    path = tmp_path / "trace.jsonl"
    write_trace(records, path)
    assert [(r.timestamp_ms, r.input_length, r.output_length, r.hash_ids) for r in load_trace(path)] == [
        (r.timestamp_ms, r.input_length, r.output_length, r.hash_ids) for r in records]


def test_tool_agent_sessions_share_a_dozen_skewed_prefixes_and_extend_their_history():
    records = tool_agent(N, seed=3)
    s = stats(records)
    assert s.distinct_first_blocks == 12
    assert s.repeat_fraction > 0.85
    firsts = np.array([r.hash_ids[0] for r in records])
    _, counts = np.unique(firsts, return_counts=True)
    assert counts.max() / N > 0.25 and counts.min() / N < 0.05  # Zipf popularity
    # deep multi-turn reuse: the prefix a turn shares with earlier prompts is longer than any
    # shared prefix (40 blocks at most): it runs on into its own session's history
    seen: set[int] = set()
    deep = 0
    for r in records:
        depth = 0
        while depth < len(r.hash_ids) and r.hash_ids[depth] in seen:
            depth += 1
        deep += depth > 40
        seen.update(r.hash_ids)
    assert deep / N > 0.3
    gaps = np.diff([r.timestamp_ms for r in records]) / 1000.0
    assert gaps.std() / gaps.mean() > 1.5  # bursty: far from Poisson's 1


def test_uniform_shares_nothing_and_spreads_lengths_evenly():
    records = uniform(N, seed=3)
    s = stats(records)
    assert s.repeat_fraction == 0.0 and s.distinct_first_blocks == N
    ins = np.array([r.input_length for r in records])
    outs = np.array([r.output_length for r in records])
    assert 1000 <= ins.min() and ins.max() <= 12_000 and abs(ins.mean() - 6500) < 200
    assert 20 <= outs.min() and outs.max() <= 700 and abs(outs.mean() - 360) < 15
    gaps = np.diff([r.timestamp_ms for r in records]) / 1000.0
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.1 and abs(1 / gaps.mean() - 3.5) < 0.2  # Poisson, 3.5/s


def test_shifting_swings_the_prompt_output_ratio_over_each_period():
    shape = ShiftingShape()
    records = shifting(4 * N, seed=3, shape=shape)
    assert prefill_heavy_share(0.0, shape) == 1.0 and prefill_heavy_share(shape.period_s / 2, shape) == 0.0

    def ratio(lo: float, hi: float) -> float:
        window = [r for r in records if lo * shape.period_s <= r.timestamp_s < hi * shape.period_s]
        return sum(r.input_length for r in window) / sum(r.output_length for r in window)

    assert ratio(0.0, 0.1) > 20 and ratio(0.4, 0.6) < 2 and ratio(0.95, 1.05) > 20
    assert records[-1].timestamp_s > 1.5 * shape.period_s  # 24,000 requests: one and a half swings
    load = offered_load(to_sim_requests(records), gpu_class_default(), block_tokens=BLOCK, tbt_slo_s=0.1,
                        kv_capacity_tokens=1_300_000)
    assert load.prefill_node_s_per_s > 3 and load.decode_node_s_per_s > 2  # both pools matter


@pytest.mark.parametrize("periods", [1, 2])
def test_shifting_requests_cover_the_periods_asked_for(periods):
    """What `bench.sim.compare` sizes the shifting trace by: it must end near the end of its
    last swing, wherever the swing's share of each stream and their rates are set."""
    for shape in (ShiftingShape(), ShiftingShape(prefill_heavy_rate=20.0, decode_heavy_rate=5.0, period_s=200.0,
                                                 sharpness=3.0)):
        for seed in (1, 2):
            end = shifting(shifting_requests(periods, shape), seed=seed, shape=shape)[-1].timestamp_s
            assert abs(end / shape.period_s - periods) < 0.05 * periods, (shape, seed, end)


def test_the_cli_writes_a_trace_and_refuses_a_bad_count(tmp_path, capsys):
    out = tmp_path / "agent.jsonl"
    assert main(["tool_agent", "--requests", "300", "--seed", "2", "--out", str(out)]) == 0
    assert len(load_trace(out)) == 300 and "tool_agent: 300 requests" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["uniform", "--requests", "0", "--out", str(out)])
    assert exc.value.code == 2
    assert "argument --requests: at least 1" in capsys.readouterr().err


def test_offered_load_of_the_conversation_trace_is_the_designs():
    from bench.sim.trace import DEFAULT_TRACE, load_sim_requests

    if not DEFAULT_TRACE.is_file():
        pytest.skip("needs ../shared/traces/conversation_trace.jsonl")
    load = offered_load(load_sim_requests(DEFAULT_TRACE), gpu_class_default(), block_tokens=BLOCK, tbt_slo_s=0.1,
                        kv_capacity_tokens=1_300_000)
    # DESIGN.md §4: 6.7 prefill-node-seconds per second without reuse, ~4.3 with perfect reuse
    assert load.prefill_no_reuse_node_s_per_s == pytest.approx(6.7, abs=0.05)
    assert load.prefill_node_s_per_s == pytest.approx(4.4, abs=0.15)
    assert load.of(8, 8) == pytest.approx(load.prefill_node_s_per_s / 8)  # prefill binds on 8P+8D
