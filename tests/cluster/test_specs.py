"""The config is the only source of the servers' specs: every setting reaches the spec it
is for, nodes are named and placed as the config says, and what depends on a node's host
is settled on that host."""
from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config import ClusterConfig, load_config, parse_config, with_overrides
from cluster.specs import LOOPBACK, build_specs, conductor_spec, kv_bytes_per_block, node_plans
from conductor.settings import SettingsValues

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_default_config_gives_one_prefill_and_one_decode_node_on_loopback():
    conductor, nodes = build_specs(ClusterConfig())
    assert (conductor.host, conductor.grpc_port, conductor.http_port) == (LOOPBACK, 50051, 8000)
    assert [(n.node_id, n.role) for n in nodes] == [("prefill-0", "prefill"), ("decode-0", "decode")]
    assert conductor.control_port not in (0, 50051, 8000)  # the control plane: a port of its own
    assert {n.conductor for n in nodes} == {f"127.0.0.1:{conductor.control_port}"}
    assert conductor.control_secret and {n.control_secret for n in nodes} == {conductor.control_secret}
    assert {n.host for n in nodes} == {LOOPBACK}
    assert {n.num_blocks for n in nodes} == {512}


def test_the_conductor_starts_with_the_configured_scheduling_settings():
    config = parse_config("""
conductor: {policy: least_loaded, admission: predictive, ttft_slo_s: 4, tbt_slo_s: 0.2,
            prefill_reject_threshold: 1.5, decode_reject_threshold: 0.9, typical_output_tokens: 99}
""")
    spec = conductor_spec(config)
    assert SettingsValues(**spec.settings) == config.conductor.settings()
    assert spec.settings["policy"] == "least_loaded" and spec.settings["admission"] == "predictive"
    assert spec.settings["ttft_slo_s"] == 4 and spec.settings["typical_output_tokens"] == 99


@pytest.mark.parametrize(
    "override, field, want",
    [
        ({"conductor.heartbeat_interval_s": 0.5, "conductor.heartbeat_timeout_s": 2}, "heartbeat_timeout_s", 2),
        ({"failure.on_transfer_failure": "fail"}, "on_transfer_failure", "fail"),
        ({"failure.kv_lease_s": 90}, "kv_lease_s", 90),
        ({"failure.request_timeout_s": 7}, "request_timeout_s", 7),
        ({"conductor.cost_model": "/tmp/costs.json"}, "cost_model", "/tmp/costs.json"),
        ({"kv.block_size": 32, "scheduler.prefill_chunk_size": 512}, "block_size", 32),
        ({"model.max_model_len": 1024}, "max_model_len", 1024),
        ({"model.path": "/models/llama"}, "model", "/models/llama"),
    ],
)
def test_conductor_settings_reach_its_spec(override, field, want):
    spec = conductor_spec(with_overrides(ClusterConfig(), override))
    assert getattr(spec, field) == want


@pytest.mark.parametrize(
    "override, field, want",
    [
        ({"kv.num_blocks": 300}, "num_blocks", 300),
        ({"kv.block_size": 32, "scheduler.prefill_chunk_size": 512}, "block_size", 32),
        ({"scheduler.max_num_seqs": 7}, "max_num_seqs", 7),
        ({"transfer.transport": "tcp"}, "transport", "tcp"),
        ({"transfer.token": "s3cret"}, "transfer_token", "s3cret"),
        ({"transfer.timeout_s": 9, "failure.kv_lease_s": 60}, "transfer_timeout_s", 9),
        ({"model.max_model_len": 1024}, "max_model_len", 1024),
        ({"model.path": "/models/llama"}, "model", "/models/llama"),
    ],
)
def test_node_settings_reach_every_node_spec(override, field, want):
    _, nodes = build_specs(with_overrides(ClusterConfig(), override))
    assert {getattr(n, field) for n in nodes} == {want}


def test_prefill_nodes_step_one_chunk_decode_nodes_the_batch_budget():
    config = parse_config("scheduler: {max_num_batched_tokens: 4096, prefill_chunk_size: 256}")
    _, (prefill, decode) = build_specs(config)
    assert (prefill.max_num_batched_tokens, decode.max_num_batched_tokens) == (256, 4096)


def test_groups_set_threads_ports_and_ray_placement():
    config = load_config(DEPLOY / "2p2d.yaml")
    plans = node_plans(config, "10.0.0.1:50051")
    assert [p.node_id for p in plans] == ["prefill-0", "prefill-1", "decode-0", "decode-1"]
    assert {p.spec.conductor for p in plans} == {"10.0.0.1:50051"}
    assert {p.spec.num_threads for p in plans} == {2}  # num_cpus: 2
    assert [p.options["resources"] for p in plans] == [{"prefill": 1.0}] * 2 + [{"decode": 1.0}] * 2
    assert all(p.options["num_cpus"] == 2 for p in plans)
    assert config.conductor.ray_options()["resources"] == {}


def test_a_wildcard_bind_host_becomes_the_address_of_the_host_a_node_lands_on():
    config = load_config(DEPLOY / "2p2d.yaml")  # nodes bind 0.0.0.0
    plan = node_plans(config, "10.0.0.1:50051")[0]
    assert plan.spec.host == "0.0.0.0"
    assert plan.resolve("10.0.0.7").host == "10.0.0.7"
    conductor, nodes = build_specs(config)  # the process launcher: this machine
    assert conductor.host == "0.0.0.0" and {n.host for n in nodes} == {LOOPBACK}
    assert {n.conductor for n in nodes} == {f"{LOOPBACK}:{conductor.control_port}"}  # its control plane
    explicit = node_plans(ClusterConfig(), "127.0.0.1:1")[0]
    assert explicit.resolve("10.0.0.7").host == LOOPBACK  # only a wildcard is replaced


def test_kv_memory_sizes_the_pool_from_the_model_on_the_nodes_host(tiny_model_dir):
    # tiny model: 2 layers x (K, V) x 16 tokens x 2 KV heads x head_dim 16 x 4 bytes (float32)
    assert kv_bytes_per_block(str(tiny_model_dir), 16) == 2 * 2 * 16 * 2 * 16 * 4
    config = parse_config(f"model: {{path: {tiny_model_dir}, max_model_len: 512}}\nkv: {{kv_memory_gb: 0.001}}")
    plan = node_plans(config, "127.0.0.1:1")[0]
    assert plan.kv_memory_gb == 0.001
    assert plan.resolve().num_blocks == int(0.001 * 2**30) // 8192


def test_the_process_launcher_needs_a_fixed_conductor_port():
    with pytest.raises(ValueError, match="conductor.grpc_port"):
        build_specs(parse_config("conductor: {grpc_port: 0}"))


def test_the_colocated_layout_runs_the_prefill_groups_count_of_colocated_nodes():
    _, nodes = build_specs(load_config(DEPLOY / "colocated.yaml"))
    assert [(n.role, n.node_id) for n in nodes] == [("colocated", "colocated-0"), ("colocated", "colocated-1")]


@pytest.mark.parametrize(
    "override, want",
    [
        ({}, 1.0),  # the launcher-started master's keeper (kv_tiers.store_gb), nodes mount nothing
        ({"kv_tiers.node_segment_gb": 0.5}, 2.0),  # + 0.5 GiB from each of 1P + 1D
        ({"kv_tiers.node_segment_gb": 0.5, "kv_tiers.store_master": "10.0.0.1:50090"}, 1.0),  # their master: segments
        ({"kv_tiers.node_segment_gb": 0.5, "kv_tiers.decode_write_back": False}, 1.5),  # the decode node mounts none
        ({"kv_tiers.store": False}, 0.0),
        ({"conductor.store_gb": 3.0}, 3.0),
    ],
)
def test_the_conductor_models_the_cluster_store_at_its_size(override, want):
    assert conductor_spec(with_overrides(ClusterConfig(), override)).store_gib == pytest.approx(want)


def test_a_launcher_started_master_keeps_its_keeper_in_the_conductors_store_size():
    from cluster.kv_tiers import embedded_store
    from engine.tiers.mooncake_store import store_unavailable_reason

    if store_unavailable_reason() is not None:
        pytest.skip(store_unavailable_reason())
    config, master = embedded_store(with_overrides(ClusterConfig(), {"kv_tiers.node_segment_gb": 0.25}))
    assert master is not None and master.proc is None  # made, not started
    assert config.kv_tiers.store_master == master.address  # the nodes' config names it now
    assert conductor_spec(config).store_gib == pytest.approx(1.5)  # 1 GiB keeper + 2 x 0.25 GiB
