"""`halfmoon bench tiers`: the tier sets it starts, the rows it computes from a run's
requests (hit rate, repeat fraction, SLO attainment, goodput) and the capacity verdict."""
from __future__ import annotations


import pytest

from bench.tiers import ChatWorkload, Record, Sizes, capacity, chat_row, size_tiers, tier_config


class Master:
    address = "127.0.0.1:7000"
    metadata_url = "http://127.0.0.1:7001/metadata"


def test_tier_sets_map_to_tier_configs(tmp_path):
    sizes = Sizes(device_blocks=72, host_blocks=100, disk_blocks=300, store_gb=1.0)
    rb = 1 << 20
    assert tier_config("device", sizes, rb, None, tmp_path) is None
    host = tier_config("host", sizes, rb, None, tmp_path)
    assert host.host_gib == pytest.approx(100 / 1024) and host.disk_gib == 0 and not host.store
    disk = tier_config("host+disk", sizes, rb, None, tmp_path)
    assert disk.disk_gib == pytest.approx(300 / 1024) and not disk.store and disk.disk_dir == str(tmp_path)
    store = tier_config("host+disk+store", sizes, rb, Master(), tmp_path)
    assert store.store and store.store_master == Master.address and store.store_segment_gib == 0.0


def test_chat_rows_count_hits_repeats_slos_and_goodput():
    ok = dict(outcome="completed", gaps=[0.01] * 9)
    recs = [Record(100, 0, ttft_s=0.5, cached_tokens=0, **ok),  # a first turn: nothing to reuse
            Record(200, 96, ttft_s=0.2, cached_tokens=96, **ok),  # reuses turn 1
            Record(300, 192, ttft_s=9.0, cached_tokens=176, **ok),  # late: misses the TTFT SLO
            Record(50, 0, outcome="rejected")]
    row = chat_row(recs, window_s=10.0, slo=(1.0, 0.05))
    assert row["rate_rps"] == pytest.approx(0.4)
    assert row["hit_rate"] == pytest.approx(272 / 600) and row["repeat_fraction"] == pytest.approx(288 / 600)
    assert row["goodput_rps"] == pytest.approx(0.2) and row["slo_attainment"] == pytest.approx(0.5)
    assert (row["completed"], row["rejected"], row["failed"]) == (3, 1, 0)
    assert row["ttft_p50_s"] == pytest.approx(0.5) and row["tbt_p99_s"] == pytest.approx(0.01)
    slow = [Record(100, 0, outcome="completed", ttft_s=0.1, gaps=[0.01] * 9 + [0.5], cached_tokens=0)]
    assert chat_row(slow, 1.0, (1.0, 0.05))["goodput_rps"] == 0.0  # the Mooncake TBT (longest 10%) misses


def test_capacity_is_the_highest_rate_meeting_the_slos_for_90_percent():
    rows = [{"rate_rps": 0.2, "slo_attainment": 1.0}, {"rate_rps": 0.4, "slo_attainment": 0.92},
            {"rate_rps": 0.8, "slo_attainment": 0.5}]
    assert capacity(rows) == 0.4
    assert capacity([{"rate_rps": 0.2, "slo_attainment": 0.3}]) is None


def test_chat_working_set_counts_every_conversation_and_the_system_prompts():
    wl = ChatWorkload(systems=2, system_tokens=160, turns=2, user_tokens=8, answer_tokens=8)
    assert wl.working_set_blocks(10) == (2 * 160 + 10 * 2 * 16) // 16


def test_the_device_tier_is_sized_below_the_shared_system_prompts():
    wl = ChatWorkload()  # 6 x 384-token system prompts: 144 blocks every conversation starts from
    s = size_tiers(wl, 600, 1 << 20)
    assert (s.device_blocks, s.host_blocks, s.disk_blocks) == (72, 300, 1712)
    assert size_tiers(wl, 100, 1 << 20).host_blocks == 160  # the host pool holds every system prompt
    assert size_tiers(ChatWorkload(systems=12), 600, 1 << 20).device_blocks == 144  # half of 288
    assert size_tiers(wl, 600, 1 << 20, device_blocks=90).device_blocks == 90


def test_the_benchmark_parses_its_flags_and_documents_its_rows(capsys):
    from bench.tiers import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "effective_capacity_rps" in out and "host+disk+store" in out
    with pytest.raises(SystemExit) as e:
        main(["--quick"])  # --json is required
    assert e.value.code == 2 and "--json" in capsys.readouterr().err


def test_the_budget_bounds_the_full_sweep():
    from bench.tiers import Plan

    full = Plan.fit(20 * 60, 4, 2, 4, micro=True, max_requests=60)  # the defaults
    assert full.estimate_s(4, 2, 4, micro=True) <= 20 * 60 + 1
    assert full.window_s > 15 and full.request_timeout_s >= 10
    assert [full.requests(r) for r in (0.15, 0.3, 0.5, 0.8)] == [3, 6, 9, 15]
    longer = Plan.fit(60 * 60, 4, 2, 4, micro=True, max_requests=60)  # more budget: longer windows, more requests
    assert longer.window_s > 2.5 * full.window_s and longer.requests(0.8) == 51 and longer.requests(5.0) == 60
    assert Plan.fit(60, 4, 2, 4, micro=True, max_requests=60).window_s == 12.0  # never below a 20 s cell


def test_a_chat_cell_ends_at_its_deadline_and_counts_what_was_cut_as_failed():
    """A cluster that never answers: the cell still ends at window + drain, every request
    it sent counted failed."""
    import asyncio
    import time

    import grpc

    from bench.tiers import run_chat
    from proto.halfmoon.v1 import generate_pb2_grpc

    class Stuck(generate_pb2_grpc.GenerationServicer):
        async def Generate(self, request, context):
            await asyncio.sleep(60)
            yield  # pragma: no cover

    async def scenario():
        server = grpc.aio.server()
        generate_pb2_grpc.add_GenerationServicer_to_server(Stuck(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            t0 = time.monotonic()
            wl = ChatWorkload(systems=1, system_tokens=32, turns=2, user_tokens=8, answer_tokens=4, think_s=0.0)
            recs, window = await run_chat(f"127.0.0.1:{port}", wl, rate_rps=20.0, duration_s=0.5, seed=3,
                                          timeout_s=30.0, deadline_s=1.5)
            return recs, window, time.monotonic() - t0
        finally:
            await server.stop(0)

    recs, window, took = asyncio.run(scenario())
    assert took < 10.0  # not the 30 s request timeout, nor the server's 60 s
    assert window == 0.5 and recs and all(r.outcome == "failed" and r.ttft_s is None for r in recs)
    assert chat_row(recs, window, (1.0, 0.1))["failed"] == len(recs)


@pytest.mark.slow
def test_the_micro_benchmark_times_every_tier_as_the_profile_does(tiny_model_dir, tmp_path):
    from bench.tiers import micro
    from engine.tiers.mooncake_store import store_unavailable_reason

    m = micro(str(tiny_model_dir), 32, tmp_path)
    assert m["blocks"] == 32 and m["memcpy_gbps"] > 0 and m["disk_to_host_gbps"] > 0
    assert m["host_to_device_gbps"] == pytest.approx(m["block_bytes"] / m["host_block_load_s"] / 1e9)
    assert m["recompute_over_host_load"] == pytest.approx(m["recompute_block_s"] / m["host_block_load_s"])
    if store_unavailable_reason() is None:
        assert m["store_backend"] == "mooncake" and m["store_blocks_read"] == 32
    else:
        assert "not measured" in m["store_backend"] and "store_to_host_gbps" not in m
