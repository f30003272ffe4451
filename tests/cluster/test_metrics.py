"""The metric catalog and the typed recorders: names, per-registry isolation, and values
that move the way the servers' calls say."""
from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry

from conductor.metrics import (
    ALL_METRICS,
    CONDUCTOR_METRICS,
    NODE_METRICS,
    ConductorMetrics,
    HttpMetrics,
    Kind,
    MetricsServer,
    NodeMetrics,
    ScrapeTarget,
    exposition,
    tail_tbt,
    write_scrape_targets,
)
from conductor.frontend_api import Finished, Timing, Usage


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_names_follow_the_convention():
    names = [s.name for s in ALL_METRICS]
    assert len(names) == len(set(names))
    for spec in ALL_METRICS:
        assert re.fullmatch(r"halfmoon:[a-z][a-z0-9_]*", spec.name), spec.name
        assert spec.name.endswith("_total") == (spec.kind is Kind.COUNTER), spec.name
        assert bool(spec.buckets) == (spec.kind is Kind.HISTOGRAM), spec.name
        assert list(spec.buckets) == sorted(spec.buckets) and spec.help
    node_labelled = {s.name for s in NODE_METRICS}
    assert all(s.labels == ("node", "role") for s in NODE_METRICS)
    assert not node_labelled & {s.name for s in CONDUCTOR_METRICS}


def test_every_metric_is_exposed_once_all_recorders_exist():
    registry = CollectorRegistry()
    ConductorMetrics(registry), NodeMetrics(registry, "prefill-0", "prefill"), HttpMetrics(registry)
    text = exposition(registry).decode()
    for spec in ALL_METRICS:
        assert f"# TYPE {spec.name} {spec.kind.value}" in text, spec.name


def test_registries_are_isolated_and_shareable():
    a, b = CollectorRegistry(), CollectorRegistry()
    ConductorMetrics(a).observe_rejected("queue_full")
    ConductorMetrics(b)  # a second conductor in its own registry: no clash
    assert value(a, "halfmoon:requests_rejected_total", reason="queue_full") == 1
    assert value(b, "halfmoon:requests_rejected_total", reason="queue_full") is None
    # two nodes sharing one registry get separate series
    p, d = NodeMetrics(a, "prefill-0", "prefill"), NodeMetrics(a, "decode-0", "decode")
    p.observe_kv_transfer(1000, 0.01)
    d.observe_kv_transfer(1000, 0.02)
    d.observe_kv_transfer(24, 0.02)
    assert value(a, "halfmoon:kv_transfer_bytes_total", node="prefill-0", role="prefill") == 1000
    assert value(a, "halfmoon:kv_transfer_bytes_total", node="decode-0", role="decode") == 1024
    assert value(a, "halfmoon:kv_transfer_seconds_count", node="decode-0", role="decode") == 2


def test_request_clock_measures_ttft_gaps_and_tail_tbt():
    registry = CollectorRegistry()
    metrics = ConductorMetrics(registry)
    now = [100.0]
    clock = metrics.start_request(now=lambda: now[0])
    for t, n in [(100.5, 1), (100.6, 1), (101.0, 2), (101.1, 0)]:
        now[0] = t
        clock.on_tokens(n)
    now[0] = 101.2
    clock.on_finished(Finished("stop", Usage(prompt_tokens=7, completion_tokens=4), Timing(0.1, 0.3, 0.05, 0.05, 0.5)))
    assert clock.ttft_s == pytest.approx(0.5)
    assert clock.gaps == pytest.approx([0.1, 0.4, 0.0])
    assert value(registry, "halfmoon:time_to_first_token_seconds_sum") == pytest.approx(0.5)
    assert value(registry, "halfmoon:inter_token_latency_seconds_count") == 3
    assert value(registry, "halfmoon:e2e_request_latency_seconds_sum") == pytest.approx(1.2)
    assert value(registry, "halfmoon:request_tbt_seconds_sum") == pytest.approx(0.4)  # longest 10%, at least one gap
    assert value(registry, "halfmoon:ttft_prefill_seconds_sum") == pytest.approx(0.3)
    assert value(registry, "halfmoon:request_success_total", finish_reason="stop") == 1
    assert value(registry, "halfmoon:prompt_tokens_total") == 7
    assert value(registry, "halfmoon:generation_tokens_total") == 4


def test_unmeasured_timing_is_not_recorded_as_zeros():
    registry = CollectorRegistry()
    ConductorMetrics(registry).observe_finished(Finished("abort", Usage(3, 0)), e2e_s=0.2)
    assert value(registry, "halfmoon:ttft_queue_seconds_count") == 0
    assert value(registry, "halfmoon:request_success_total", finish_reason="abort") == 1


def test_tail_tbt():
    assert tail_tbt([]) == 0.0
    assert tail_tbt([0.1] * 19 + [1.0]) == pytest.approx(0.55)  # 10% of 20 gaps = the 2 longest
    assert tail_tbt([0.1] * 14 + [1.0]) == pytest.approx(0.55)  # ceil(1.5) = 2 of 15
    assert tail_tbt([0.2, 0.1]) == pytest.approx(0.2)  # at least one gap
    assert tail_tbt([0.1] * 18 + [1.0, 0.5]) == pytest.approx(0.75)


def test_settings_changes_are_counted_and_old_labels_dropped():
    registry = CollectorRegistry()
    m = ConductorMetrics(registry)
    m.set_settings(policy="kv_centric", admission="early", ttft_slo_s=2.0, tbt_slo_s=0.1)
    m.set_settings(policy="kv_centric", admission="early", ttft_slo_s=2.0, tbt_slo_s=0.1)
    assert value(registry, "halfmoon:settings_changes_total") == 0
    m.set_settings(policy="kv_centric", admission="predictive", ttft_slo_s=3.0, tbt_slo_s=0.1)
    assert value(registry, "halfmoon:settings_changes_total") == 1
    assert value(registry, "halfmoon:slo_seconds", kind="ttft") == 3.0
    assert value(registry, "halfmoon:admission_info", policy="kv_centric", admission="predictive") == 1
    assert value(registry, "halfmoon:admission_info", policy="kv_centric", admission="early") is None


def test_node_liveness_and_prediction_error():
    registry = CollectorRegistry()
    m = ConductorMetrics(registry)
    m.set_node_up("decode-1", "decode", True)
    m.set_node_up("decode-1", "decode", False)
    assert value(registry, "halfmoon:node_up", node="decode-1", role="decode") == 0
    m.forget_node("decode-1", "decode")
    assert value(registry, "halfmoon:node_up", node="decode-1", role="decode") is None
    m.observe_prediction("ttft", predicted_s=1.0, actual_s=1.25)
    assert value(registry, "halfmoon:prediction_error_seconds_sum", kind="ttft") == pytest.approx(0.25)
    with pytest.raises(ValueError, match="kind"):
        m.observe_prediction("e2e", 1.0, 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="role"):
        m.set_node_up("x", "conductor", True)  # type: ignore[arg-type]


def test_node_metrics_record_load_cache_and_transfers():
    registry = CollectorRegistry()
    node = NodeMetrics(registry, "decode-0", "decode")
    labels = {"node": "decode-0", "role": "decode"}
    node.set_load(running=3, waiting=1, kv_blocks_used=40, kv_blocks_free=60)
    node.observe_prefix_lookup(query_tokens=64, hit_tokens=48)
    node.observe_kv_transfer_failed()
    node.observe_recomputed_prefill()
    node.observe_lease_expired(blocks=5)
    node.observe_hashes_refused(2)
    assert value(registry, "halfmoon:num_requests_running", **labels) == 3
    assert value(registry, "halfmoon:block_hashes_refused_total", **labels) == 2
    assert value(registry, "halfmoon:kv_blocks_free", **labels) == 60
    assert value(registry, "halfmoon:prefix_cache_hits_total", **labels) == 48
    assert value(registry, "halfmoon:prefix_cache_queries_total", **labels) == 64
    assert value(registry, "halfmoon:kv_transfer_failures_total", **labels) == 1
    assert value(registry, "halfmoon:recomputed_prefills_total", **labels) == 1
    assert value(registry, "halfmoon:kv_lease_expired_blocks_total", **labels) == 5
    with pytest.raises(ValueError, match="hit_tokens"):
        node.observe_prefix_lookup(query_tokens=16, hit_tokens=32)
    node.close()
    assert value(registry, "halfmoon:num_requests_running", **labels) is None


PROMETHEUS_ACCEPT = (  # what Prometheus 3 sends when it scrapes
    "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,"
    "text/plain;version=1.0.0;escaping=allow-utf-8;q=0.3,text/plain;version=0.0.4;q=0.2,*/*;q=0.1"
)


def test_metrics_server_keeps_colons_whatever_the_scraper_accepts():
    registry = CollectorRegistry()
    NodeMetrics(registry, "prefill-0", "prefill").set_load(running=2, waiting=0, kv_blocks_used=1, kv_blocks_free=9)
    server = MetricsServer(registry, "127.0.0.1", 0)
    try:
        request = urllib.request.Request(f"http://{server.address}/metrics", headers={"Accept": PROMETHEUS_ACCEPT})
        with urllib.request.urlopen(request, timeout=5) as response:
            body = response.read().decode()
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert 'halfmoon:num_requests_running{node="prefill-0",role="prefill"} 2.0' in body
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(f"http://{server.address}/other", timeout=5)
    finally:
        server.close()


def test_scrape_targets_file_is_prometheus_file_sd(tmp_path):
    path = tmp_path / "sd" / "targets.json"
    write_scrape_targets(path, [ScrapeTarget("10.0.0.5:9400", "prefill-0", "prefill")])
    write_scrape_targets(path, [ScrapeTarget("10.0.0.6:9400", "decode-0", "decode")])
    assert json.loads(path.read_text()) == [{"targets": ["10.0.0.6:9400"], "labels": {"node": "decode-0", "role": "decode"}}]
    assert [p.name for p in path.parent.iterdir()] == ["targets.json"]
