"""bench.first_token_hop's summary: the hop's share of TTFT and of the first token gap."""
from __future__ import annotations

import pytest

from bench.first_token_hop import summarize
from bench.serve import Sample


def sample(hop: float, ttft: float, gap: float) -> Sample:
    return Sample(ttft_s=ttft, gaps_s=[gap, 0.5], tokens=3, e2e_s=ttft + gap + 0.5, queue_s=0.01, prefill_s=0.2,
                  kv_transfer_s=0.001, first_decode_s=hop, server_ttft_s=ttft - 0.002)


def test_the_summary_gives_the_hops_share_of_ttft_and_of_the_first_gap():
    s = summarize([sample(0.002, 0.4, 0.05), sample(0.004, 0.2, 0.04), sample(0.001, 0.5, 0.1)])
    assert s["requests"] == 3
    assert s["hop_p50_ms"] == pytest.approx(2.0) and s["hop_max_ms"] == pytest.approx(4.0)
    assert s["hop_mean_ms"] == pytest.approx(7 / 3)
    assert s["hop_share_of_ttft"] == pytest.approx(0.005)  # median of 0.005, 0.02, 0.002
    assert s["hop_share_of_first_gap"] == pytest.approx(0.04)  # median of 0.04, 0.1, 0.01
    assert s["other_p50_ms"] == pytest.approx(400 - 2 - 211 - 2, abs=1e-6)  # 0.4 - 0.002 - parts - hop
    assert s["ttft_p50_ms"] == pytest.approx(400.0) and s["first_gap_p50_ms"] == pytest.approx(50.0)
