"""Trace records -> simulator requests: time speed-up and an optional request limit.

The simulator keeps the trace's own lengths and its 512-token `hash_ids` as block hashes
(no token ids are needed: equal ids mean equal prefixes).
"""
from __future__ import annotations

from pathlib import Path

from bench.replay.trace import TraceRecord, load_trace
from bench.sim.cluster import SimRequest
from bench.sim.workloads import repeated_share

# Mooncake's released conversation trace, beside the checkout (DESIGN.md §5).
DEFAULT_TRACE = Path(__file__).resolve().parents[3] / "shared" / "traces" / "conversation_trace.jsonl"


def to_sim_requests(records: list[TraceRecord], *, speedup: float = 1.0, limit: int | None = None) -> list[SimRequest]:
    if not speedup > 0:
        raise ValueError(f"speedup must be > 0, got {speedup}")
    chosen = records[:limit] if limit is not None else records
    if not chosen:
        return []
    start = chosen[0].timestamp_ms
    # (index, arrival_s, input_tokens, output_tokens, block_hashes), positionally: a million
    # keyword calls take a second longer
    return [SimRequest(i, (r.timestamp_ms - start) / 1000.0 / speedup, r.input_length if r.input_length > 1 else 1,
                       r.output_length, r.hash_ids)
            for i, r in enumerate(chosen)]


def load_sim_requests(path: str | Path, *, speedup: float = 1.0, limit: int | None = None) -> list[SimRequest]:
    return to_sim_requests(load_trace(path), speedup=speedup, limit=limit)


def repeat_fraction(requests: list[SimRequest]) -> float:
    """Share of prompt blocks seen before in the trace: the hit rate of an unbounded cache."""
    return repeated_share(r.block_hashes for r in requests)
