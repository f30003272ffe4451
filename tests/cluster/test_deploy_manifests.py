"""The files in deploy/ agree with the code and with each other: the dashboard queries
metrics that exist, Prometheus scrapes the configured ports, the Ray and KubeRay clusters
offer what the halfmoon configs ask for."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from cluster.config import ClusterConfig, load_config, parse_config
from conductor.metrics import ALL_METRICS, Kind

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def yaml_docs(name: str) -> list[dict]:
    return list(yaml.safe_load_all((DEPLOY / name).read_text()))


# --- Grafana ---------------------------------------------------------------------------
def dashboard_exprs() -> list[str]:
    dash = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def exposed_series() -> dict[str, str]:
    """Every series name the metrics module exposes -> the metric it belongs to."""
    out = {}
    for spec in ALL_METRICS:
        out[spec.name] = spec.name
        if spec.kind is Kind.HISTOGRAM:
            for suffix in ("_bucket", "_sum", "_count"):
                out[spec.name + suffix] = spec.name
    return out


def test_dashboard_queries_only_defined_metrics():
    series = exposed_series()
    used = {name for expr in dashboard_exprs() for name in re.findall(r"halfmoon:[A-Za-z0-9_:]+", expr)}
    assert used, "the dashboard queries no halfmoon metric"
    assert used <= set(series), f"undefined metrics on the dashboard: {sorted(used - set(series))}"


def test_dashboard_shows_every_metric():
    series = exposed_series()
    shown = {series[name] for expr in dashboard_exprs() for name in re.findall(r"halfmoon:[A-Za-z0-9_:]+", expr) if name in series}
    missing = {s.name for s in ALL_METRICS} - shown
    assert not missing, f"metrics without a panel: {sorted(missing)}"


def test_dashboard_is_importable():
    dash = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["uid"] and dash["title"]
    assert [v["type"] for v in dash["templating"]["list"]] == ["datasource"]
    for p in dash["panels"]:
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}" and t["refId"]


# --- Prometheus ------------------------------------------------------------------------
def scrape_jobs() -> dict[str, dict]:
    (config,) = yaml_docs("prometheus.yml")
    return {job["job_name"]: job for job in config["scrape_configs"]}


def test_prometheus_scrapes_the_conductor_http_port():
    job = scrape_jobs()["halfmoon-conductor"]
    (target,) = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert int(target.rsplit(":", 1)[1]) == load_config(DEPLOY / "local.yaml").conductor.http_port
    assert job.get("metrics_path", "/metrics") == "/metrics"


@pytest.mark.parametrize("name", ["2p2d.yaml", "gpu-cluster.yaml"])
def test_prometheus_watches_the_targets_file_the_launcher_writes(name):
    job = scrape_jobs()["halfmoon-nodes"]
    files = [f for sd in job["file_sd_configs"] for f in sd["files"]]
    assert str(load_config(DEPLOY / name).conductor.prometheus_targets_file) in files
    assert job["honor_labels"] is True  # nodes' own node/role labels must win


# --- Ray cluster launcher --------------------------------------------------------------
def test_ray_cluster_launcher_config_matches_rays_schema():
    jsonschema = pytest.importorskip("jsonschema")
    ray_autoscaler = pytest.importorskip("ray.autoscaler")
    schema = json.loads((Path(ray_autoscaler.__file__).parent / "ray-schema.json").read_text())
    (config,) = yaml_docs("ray-cluster.yaml")
    jsonschema.validate(config, schema)
    assert config["head_node_type"] in config["available_node_types"]


def test_ray_cluster_offers_what_the_gpu_config_asks_for():
    (launcher,) = yaml_docs("ray-cluster.yaml")
    types = launcher["available_node_types"]
    config = load_config(DEPLOY / "gpu-cluster.yaml")
    for group in (config.prefill, config.decode, config.conductor):
        count = getattr(group, "count", 1)
        fitting = [
            t for t in types.values()
            if all(t["resources"].get(r, 0) >= q for r, q in group.resources.items())
            and t["resources"].get("CPU", 0) >= group.num_cpus
            and t["resources"].get("GPU", 0) >= group.num_gpus
        ]
        capacity = sum(1 if t is types[launcher["head_node_type"]] else t["max_workers"] for t in fitting)
        assert capacity >= count, f"{group.resources}: room for {capacity} of {count}"


# --- KubeRay ---------------------------------------------------------------------------
def kuberay() -> tuple[ClusterConfig, dict, dict]:
    config_map, cluster = yaml_docs("kuberay/raycluster.yaml")
    (job,) = yaml_docs("kuberay/rayjob.yaml")
    assert config_map["kind"] == "ConfigMap"
    return parse_config(config_map["data"]["cluster.yaml"], "raycluster.yaml ConfigMap"), cluster, job


def start_param_resources(group: dict) -> dict[str, float]:
    """KubeRay's quoted JSON: '"{\\"prefill\\": 1}"'."""
    raw = group["rayStartParams"].get("resources", '"{}"')
    return json.loads(raw.strip('"').replace('\\"', '"'))


def quantity(value: str | int) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def test_kuberay_manifests_have_the_expected_kinds_and_entrypoint():
    _, cluster, job = kuberay()
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["entrypoint"] == "halfmoon up --config /config/cluster.yaml"
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}


def test_kuberay_head_mounts_the_config_and_exposes_the_conductor():
    config, cluster, _ = kuberay()
    head = cluster["spec"]["headGroupSpec"]
    (container,) = head["template"]["spec"]["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in head["template"]["spec"]["volumes"]}
    (name,) = [n for n, path in mounts.items() if path == "/config"]
    assert volumes[name]["configMap"]["name"] == "halfmoon-config"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["hm-http"] == config.conductor.http_port and ports["hm-grpc"] == config.conductor.grpc_port
    assert start_param_resources(head) == config.conductor.resources


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_kuberay_worker_groups_fit_the_nodes(role):
    config, cluster, _ = kuberay()
    group = config.group(role)
    (spec,) = [g for g in cluster["spec"]["workerGroupSpecs"] if start_param_resources(g).keys() & group.resources.keys()]
    assert start_param_resources(spec) == group.resources
    assert spec["replicas"] >= group.count  # one node per pod
    (container,) = spec["template"]["spec"]["containers"]
    limits = container["resources"]["limits"]
    assert quantity(limits["cpu"]) >= group.num_cpus
    assert quantity(limits.get("nvidia.com/gpu", 0)) >= group.num_gpus
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["hm-metrics"] == group.metrics_port


def test_podmonitor_scrapes_named_ports_of_the_cluster():
    _, cluster, _ = kuberay()
    (monitor,) = yaml_docs("kuberay/podmonitor.yaml")
    assert monitor["kind"] == "PodMonitor"
    assert monitor["spec"]["selector"]["matchLabels"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    templates = [cluster["spec"]["headGroupSpec"]] + cluster["spec"]["workerGroupSpecs"]
    named = {p["name"] for g in templates for c in g["template"]["spec"]["containers"] for p in c["ports"]}
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} == {"hm-http", "hm-metrics"} <= named
