"""The typed cluster config: defaults, YAML round trip, the example files, and errors that
name the file and the field."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cluster.config import (
    DEFAULT_NUM_BLOCKS,
    ClusterConfig,
    ConfigError,
    dump_config,
    load_config,
    parse_config,
    with_overrides,
)
from conductor.modes import AdmissionMode, PolicyName

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
HALFMOON_CONFIGS = ["local.yaml", "2p2d.yaml", "colocated.yaml", "gpu-cluster.yaml"]
OTHER_YAML = ["ray-cluster.yaml", "prometheus.yml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/podmonitor.yaml",
              "prometheus/alerts.yml", "prometheus/alerts_test.yml"]


def test_default_is_one_prefill_one_decode_on_loopback():
    c = ClusterConfig()
    assert (c.prefill.count, c.decode.count, c.layout) == (1, 1, "disaggregated")
    assert c.conductor.host == "127.0.0.1" and c.prefill.host == "127.0.0.1"
    assert (c.conductor.grpc_port, c.conductor.http_port) == (50051, 8000)
    assert (c.conductor.policy, c.conductor.admission) == ("cost_aware", "early")
    assert c.kv.block_size == 16 and c.model.name == "smollm2-135m-instruct"
    assert c.ray.address is None and c.ray.namespace == "halfmoon"
    assert c.required_resources() == {"CPU": 3.0, "GPU": 0.0}


def test_local_yaml_is_the_default():
    assert load_config(DEPLOY / "local.yaml") == ClusterConfig()


def test_empty_file_is_the_default(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(tmp_path / "empty.yaml") == ClusterConfig()


@pytest.mark.parametrize("name", HALFMOON_CONFIGS)
def test_yaml_round_trip(tmp_path, name):
    config = load_config(DEPLOY / name)
    dump_config(config, tmp_path / "again.yaml")
    assert load_config(tmp_path / "again.yaml") == config


def test_every_deploy_file_parses_and_is_classified():
    found = {str(p.relative_to(DEPLOY)) for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml", ".json")}
    assert found == set(HALFMOON_CONFIGS) | set(OTHER_YAML) | {"grafana-dashboard.json"}
    for name in found:
        text = (DEPLOY / name).read_text()
        docs = [json.loads(text)] if name.endswith(".json") else list(yaml.safe_load_all(text))
        assert docs and all(isinstance(d, dict) for d in docs), name


@pytest.mark.parametrize("name", HALFMOON_CONFIGS)
def test_example_configs_validate(name):
    config = load_config(DEPLOY / name)
    assert config.prefill.count >= 1 and config.decode.count >= 1


def test_example_configs_differ_where_they_say():
    two = load_config(DEPLOY / "2p2d.yaml")
    assert (two.prefill.count, two.decode.count) == (2, 2)
    assert two.prefill.ray_options() == {"num_cpus": 2.0, "num_gpus": 0.0, "resources": {"prefill": 1.0}}
    assert load_config(DEPLOY / "colocated.yaml").layout == "colocated"
    gpu = load_config(DEPLOY / "gpu-cluster.yaml")
    assert gpu.required_resources()["GPU"] == gpu.prefill.count + gpu.decode.count
    assert gpu.model.resolve_dtype(has_gpu=True) == "bfloat16"


def problems(text: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="bad.yaml")
    assert str(info.value).startswith("bad.yaml: ")
    return {p.field: p.message for p in info.value.problems}


@pytest.mark.parametrize(
    "text, field",
    [
        ("prefill: {count: 0}", "prefill.count"),
        ("decode: {count: -1}", "decode.count"),
        ("conductor: {http_port: 70000}", "conductor.http_port"),
        ("conductor: {http_port: 50051}", "conductor.http_port"),
        ("conductor: {policy: fastest}", "conductor.policy"),
        ("conductor: {ttft_slo_s: 0}", "conductor.ttft_slo_s"),
        ("conductor: {heartbeat_interval_s: 2, heartbeat_timeout_s: 3}", "conductor.heartbeat_timeout_s"),
        ("transfer: {transport: carrier-pigeon}", "transfer.transport"),
        ("kv: {block_size: 0}", "kv.block_size"),
        ("kv: {num_blocks: 10}", "kv.num_blocks"),
        ("kv: {num_blocks: 1000, kv_memory_gb: 2}", "kv.kv_memory_gb"),
        ("scheduler: {prefill_chunk_size: 100}", "scheduler.prefill_chunk_size"),
        ("scheduler: {prefill_chunk_size: 4096}", "scheduler.prefill_chunk_size"),
        ("failure: {kv_lease_s: 10}", "failure.kv_lease_s"),
        ("failure: {on_transfer_failure: ignore}", "failure.on_transfer_failure"),
        ("conductor: {admission: sometimes}", "conductor.admission"),
        ("conductor: {tbt_slo_s: 61}", "conductor.tbt_slo_s"),
        ("conductor: {decode_reject_threshold: 0}", "conductor.decode_reject_threshold"),
        ("prefill: {num_gpus: 1.5}", "prefill.num_gpus"),
        ("decode: {resources: {GPU: 1}}", "decode.resources.GPU"),
        ("decode: {resources: {decode: 0}}", "decode.resources.decode"),
        ("model: {dtype: fp4}", "model.dtype"),
    ],
)
def test_bad_values_are_refused_naming_the_field(text, field):
    found = problems(text)
    assert field in found, found


def test_error_mentions_the_bad_value():
    assert "70000" in problems("conductor: {http_port: 70000}")["conductor.http_port"]


def test_unknown_keys_are_refused_naming_the_key_and_the_allowed_ones():
    found = problems("conductor: {htp_port: 8001}")
    assert "unknown key" in found["conductor.htp_port"] and "http_port" in found["conductor.htp_port"]
    assert "prefill" in problems("prefil: {count: 2}")["prefil"]
    assert "unknown key" in problems("prefill: {count: 1, gpus: 1}")["prefill.gpus"]


def test_load_config_names_the_file(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text("kv:\n  block_size: -4\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ") and "kv.block_size" in str(info.value)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("prefill:\n  count: 1\n decode: [\n")
    with pytest.raises(ConfigError, match=rf"broken.yaml:\d+:\d+"):
        load_config(path)
    with pytest.raises(ConfigError, match="mapping"):
        parse_config("- 1\n- 2\n")


def test_kv_pool_sizing():
    assert ClusterConfig().kv.resolve_num_blocks(bytes_per_block=4096) == DEFAULT_NUM_BLOCKS
    by_memory = parse_config("kv: {kv_memory_gb: 1}").kv
    assert by_memory.resolve_num_blocks(bytes_per_block=2**20) == 1024
    assert parse_config("kv: {num_blocks: 300}").kv.resolve_num_blocks(bytes_per_block=1) == 300


@pytest.mark.parametrize("policy", [p.value for p in PolicyName])
def test_every_scheduler_policy_is_a_config_policy(policy):
    assert parse_config(f"conductor: {{policy: {policy}}}").conductor.policy is PolicyName(policy)


@pytest.mark.parametrize("mode", [m.value for m in AdmissionMode])
def test_every_admission_mode_is_a_config_mode(mode):
    assert parse_config(f"conductor: {{admission: {mode}}}").conductor.admission is AdmissionMode(mode)


def test_policy_and_admission_are_parsed_by_the_schedulers_functions():
    c = parse_config("conductor: {policy: cache_aware, admission: stage}").conductor
    assert (c.policy, c.admission) == (PolicyName.CACHE_AWARE_LOCAL, AdmissionMode.PER_STAGE)
    message = problems("conductor: {policy: fastest}")["conductor.policy"]
    assert "fastest" in message and all(p.value in message for p in PolicyName)
    assert yaml.safe_load(ClusterConfig().to_yaml())["conductor"]["policy"] == "cost_aware"


def test_colocated_layout_keeps_general_node_counts():
    c = parse_config("layout: colocated\nprefill: {count: 3}\ndecode: {count: 1}")
    assert (c.layout, c.prefill.count, c.decode.count) == ("colocated", 3, 1)


def test_overrides_are_validated_with_the_config():
    base = load_config(DEPLOY / "2p2d.yaml")
    c = with_overrides(base, {"prefill.count": 3, "conductor.policy": "least_loaded", "kv.num_blocks": 4096})
    assert (c.prefill.count, c.conductor.policy, c.kv.num_blocks) == (3, PolicyName.LEAST_LOADED, 4096)
    assert c.decode == base.decode and c.ray == base.ray
    with pytest.raises(ConfigError, match=r"(?s)^command line: .*prefill\.count") as info:
        with_overrides(base, {"prefill.count": 0}, source="command line")
    assert [p.field for p in info.value.problems] == ["prefill.count"]
    with pytest.raises(ConfigError, match="conductor.grcp_port: unknown key"):
        with_overrides(base, {"conductor.grcp_port": 1})


def test_config_is_immutable_and_token_is_not_printed():
    c = parse_config("transfer: {token: s3cret}")
    assert "s3cret" not in repr(c)
    with pytest.raises(Exception):
        c.prefill.count = 5  # type: ignore[misc]
