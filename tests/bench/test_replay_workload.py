"""Trace loading, windows and scaling into replay requests."""

import json

import pytest

from bench.replay.tokens import TokenMapper
from bench.replay.trace import TraceError, TraceRecord, load_trace
from bench.replay.workload import (
    ScaleConfig,
    TraceWindow,
    WorkloadError,
    build_workload,
    select_window,
)


def record(line, ts_ms, input_length=1024, output_length=100, hash_ids=(0, 1)):
    return TraceRecord(line, ts_ms, input_length, output_length, tuple(hash_ids))


def write_trace(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_load_trace_reads_typed_records_sorted_by_time(tmp_path):
    path = write_trace(
        tmp_path / "t.jsonl",
        [
            {"timestamp": 3000, "input_length": 600, "output_length": 5, "hash_ids": [0, 2]},
            {"timestamp": 0, "input_length": 10, "output_length": 7, "hash_ids": [0]},
        ],
    )
    records = load_trace(path)
    assert records == [record(2, 0, 10, 7, (0,)), record(1, 3000, 600, 5, (0, 2))]
    assert records[1].timestamp_s == 3.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "line 1: not JSON"),
        ('{"timestamp": 0, "input_length": 1, "output_length": 1}', "line 1: missing field"),
        (
            '{"timestamp": -1, "input_length": 1, "output_length": 1, "hash_ids": [0]}',
            "timestamp must be",
        ),
        (
            '{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": ["a"]}',
            "hash_ids must be",
        ),
    ],
)
def test_load_trace_names_the_bad_line(tmp_path, text, message):
    path = tmp_path / "t.jsonl"
    path.write_text(text + "\n")
    with pytest.raises(TraceError, match=message):
        load_trace(path)


def test_missing_trace_file_is_a_clear_error(tmp_path):
    with pytest.raises(TraceError, match="not found"):
        load_trace(tmp_path / "nope.jsonl")


def test_input_scaling_rounds_up_and_output_rounds_half_up_with_a_cap():
    scale = ScaleConfig(block_tokens=16, output_scale=0.1, max_output_tokens=30)
    assert scale.input_tokens(record(1, 0, input_length=6758, hash_ids=range(14))) == 212
    assert scale.input_tokens(record(1, 0, input_length=1, hash_ids=(0,))) == 1
    assert scale.output_tokens(record(1, 0, output_length=25)) == 3  # 2.5 -> 3
    assert scale.output_tokens(record(1, 0, output_length=24)) == 2  # 2.4 -> 2
    assert scale.output_tokens(record(1, 0, output_length=3)) == 1  # never 0
    assert scale.output_tokens(record(1, 0, output_length=1000)) == 30  # capped


def test_input_length_inconsistent_with_hash_ids_is_refused():
    with pytest.raises(
        WorkloadError, match="trace line 4: input_length 2000 does not fit 2 hash id"
    ):
        ScaleConfig().input_tokens(record(4, 0, input_length=2000, hash_ids=(0, 1)))


def test_window_by_duration_keeps_the_duration_as_its_length():
    records = [record(i + 1, ts) for i, ts in enumerate([0, 0, 3000, 6000, 9000])]
    selection = select_window(records, TraceWindow(start_s=3.0, duration_s=6.0))
    assert [r.line for r in selection.records] == [3, 4]
    assert selection.length_s == 6.0
    assert selection.request_rate(speedup=2.0) == pytest.approx(2 * 2 / 6.0)


def test_window_cut_by_max_requests_ends_at_the_next_later_arrival():
    records = [record(i + 1, ts) for i, ts in enumerate([0, 0, 0, 3000, 6000])]
    selection = select_window(records, TraceWindow(max_requests=2))
    assert [r.line for r in selection.records] == [1, 2]
    assert selection.length_s == 3.0


def test_window_to_the_end_of_the_trace_ends_at_the_last_arrival():
    records = [record(i + 1, ts) for i, ts in enumerate([1000, 3000, 6000])]
    assert select_window(records, TraceWindow(start_s=1.0)).length_s == 5.0
    assert select_window(records, TraceWindow(start_s=6.0)).length_s is None


def test_empty_window_is_an_error():
    with pytest.raises(WorkloadError, match="no trace requests"):
        select_window([record(1, 0)], TraceWindow(start_s=5.0))


def test_build_workload_scales_time_lengths_and_counts_repeated_blocks():
    records = [
        record(1, 2000, input_length=1024, output_length=10, hash_ids=(0, 1)),
        record(2, 4000, input_length=1100, output_length=20, hash_ids=(0, 1, 2)),
    ]
    selection = select_window(records, TraceWindow(start_s=1.0, duration_s=4.0))
    mapper = TokenMapper(16)
    workload = build_workload(selection, ScaleConfig(block_tokens=16, speedup=2.0), mapper, "x")
    first, second = workload.requests
    assert (first.request_id, first.send_offset_s, first.max_tokens) == ("x-1", 0.5, 10)
    assert (second.request_id, second.send_offset_s, second.max_tokens) == ("x-2", 1.5, 20)
    assert len(first.prompt_token_ids) == 32 and len(second.prompt_token_ids) == 35
    assert second.prompt_token_ids[:32] == first.prompt_token_ids
    assert workload.window_s == 2.0 and workload.request_rate == 1.0
    stats = workload.stats
    assert (stats.blocks, stats.repeated_blocks, stats.prompt_tokens, stats.output_tokens) == (
        5,
        2,
        67,
        30,
    )
    assert stats.ideal_block_hit_rate == 2 / 5


def test_max_input_tokens_cuts_prompts_to_a_prefix():
    records = [record(1, 0, input_length=2048, hash_ids=(0, 1, 2, 3))]
    selection = select_window(records, TraceWindow())
    mapper = TokenMapper(16)
    full = build_workload(selection, ScaleConfig(), mapper).requests[0]
    cut = build_workload(selection, ScaleConfig(max_input_tokens=20), mapper)
    assert cut.requests[0].prompt_token_ids == full.prompt_token_ids[:20]
    assert cut.requests[0].hash_ids == (0, 1)
    assert cut.stats.truncated_prompts == 1


def test_spread_places_requests_sharing_a_timestamp_evenly_after_it():
    records = [record(1, 0), record(2, 0), record(3, 0), record(4, 0), record(5, 3000), record(6, 3000)]
    selection = select_window(records, TraceWindow())
    mapper = TokenMapper(16)
    as_recorded = build_workload(selection, ScaleConfig(speedup=0.5), mapper)
    assert [r.send_offset_s for r in as_recorded.requests] == [0, 0, 0, 0, 6, 6]
    spread = build_workload(selection, ScaleConfig(speedup=0.5, spread_ms=3000), mapper)
    # 4 at t=0 over 3 s: 0, 0.75, 1.5, 2.25 trace s; 2 at t=3 s: 3, 4.5; halved speed doubles
    assert [r.send_offset_s for r in spread.requests] == [0, 1.5, 3.0, 4.5, 6.0, 9.0]
    assert [r.request_id for r in spread.requests] == [r.request_id for r in as_recorded.requests]
    assert [r.prompt_token_ids for r in spread.requests] == [r.prompt_token_ids for r in as_recorded.requests]
    assert spread.window_s == as_recorded.window_s
    with pytest.raises(WorkloadError, match="spread_ms"):
        ScaleConfig(spread_ms=-1)
