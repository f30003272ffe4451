"""A real Prometheus (Debian's package) with the shipped scrape config and alerting rules,
scraping a live local cluster (conductor + 1 prefill + 2 decode node processes, tiny model):
every target is scraped, every dashboard query and alert expression evaluates, an idle
healthy cluster raises no alert, and kill -9 of a decode node fires HalfmoonNodeDown for it
(its metrics target going down is pending) with the rendered annotations.

Prometheus listens on a port of its own on loopback with its own data dir and is stopped
by PID; without the binary the test skips, saying so."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from datetime import datetime
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from cluster.client import Client, make_request
from conductor.metrics import ScrapeTarget, write_scrape_targets
from cluster.specs import free_port
from engine.sampling import SamplingParams

pytestmark = pytest.mark.slow

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS = shutil.which("prometheus")


def prometheus_config(conductor_metrics: str, targets_file: Path) -> dict:
    """deploy/prometheus.yml pointed at this cluster: its jobs, labels and rule file as
    shipped; only the targets, the file_sd path and the intervals (1 s) differ."""
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str((DEPLOY / f).resolve()) for f in config["rule_files"]]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    jobs["halfmoon-conductor"]["static_configs"] = [{"targets": [conductor_metrics]}]
    jobs["halfmoon-nodes"]["file_sd_configs"] = [{"files": [str(targets_file)], "refresh_interval": "1s"}]
    return config


class Prometheus:
    def __init__(self, config: dict, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        path = workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        self.log = (workdir / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={path}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def get(self, path: str, **params: str) -> dict:
        url = f"{self.url}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=5) as res:
            body = json.load(res)
        assert body["status"] == "success", body
        return body["data"]

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as res:
                return res.status == 200
        except OSError:
            return False

    def alerts(self, name: str) -> list[dict]:
        return [a for a in self.get("/api/v1/alerts")["alerts"] if a["labels"]["alertname"] == name]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


def wait_for(pred, timeout_s: float, every_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while True:
        value = pred()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every_s)


@pytest.fixture
def cluster(tiny_model_dir):
    from cluster.local import LocalCluster
    from cluster.node_main import NodeSpec
    from conductor.server import ConductorSpec

    spec = ConductorSpec(grpc_port=free_port(), http_port=free_port(), model=str(tiny_model_dir), max_model_len=512,
                         heartbeat_interval_s=0.5, heartbeat_timeout_s=3.0,
                         settings={"ttft_slo_s": 600.0, "tbt_slo_s": 60.0})
    node = NodeSpec(role="prefill", node_id="", conductor="", num_blocks=128, num_threads=1)
    c = LocalCluster.build(1, 2, conductor=spec, node=node).start()
    try:
        yield c
    finally:
        c.stop()


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not found: install Debian's `prometheus` package "
                                                 "(apt-get install prometheus)")
def test_prometheus_fires_node_down_for_a_killed_decode_node(cluster, tmp_path):
    conductor_metrics = f"127.0.0.1:{cluster.conductor.http_port}"
    with Client(cluster.address) as client:
        nodes = client.status().nodes
        for i in range(2):  # some traffic, so request and KV series exist
            res = client.generate(make_request(token_ids=[101 + i, 7, 8, 9] * 5, params=SamplingParams(max_tokens=4)),
                                  timeout=60)
            assert res.final is not None and len(res.token_ids) == 4
    targets_file = tmp_path / "targets.json"
    write_scrape_targets(targets_file, [ScrapeTarget(n.metrics_address, n.node_id, n.role) for n in nodes])
    prom = Prometheus(prometheus_config(conductor_metrics, targets_file), tmp_path)
    try:
        assert wait_for(prom.ready, 60), (tmp_path / "prometheus.log").read_text()[-3000:]

        def scraped() -> dict[str, float]:
            return {r["metric"].get("node", "conductor"): float(r["value"][1])
                    for r in prom.get("/api/v1/query", query='up{job=~"halfmoon-.*"}')["result"]}

        want = {"conductor": 1.0, "prefill-0": 1.0, "decode-0": 1.0, "decode-1": 1.0}
        assert wait_for(lambda: scraped() == want, 60), scraped()
        assert wait_for(lambda: len(prom.get("/api/v1/query", query="halfmoon:node_up == 1")["result"]) == 3, 30)

        # every dashboard query and every rule expression is valid PromQL against live data
        dash = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
        for panel in dash["panels"]:
            for t in panel.get("targets", []):
                expr = t["expr"].replace("$__rate_interval", "1m").replace("$__range", "5m")
                prom.get("/api/v1/query", query=expr)
        rules = prom.get("/api/v1/rules")["groups"]
        assert all(r["health"] == "ok" for g in rules for r in g["rules"]), rules
        assert sum(len(g["rules"]) for g in rules) == 11
        time.sleep(3)  # a few evaluations of the healthy, idle cluster
        assert [a["labels"]["alertname"] for a in prom.get("/api/v1/alerts")["alerts"]] == []

        cluster.kill("decode-1")
        killed = time.monotonic()
        assert wait_for(lambda: [a["state"] for a in prom.alerts("HalfmoonNodeDown")] == ["pending"], 30), \
            prom.alerts("HalfmoonNodeDown")
        pending = time.monotonic() - killed
        firing = wait_for(lambda: [a for a in prom.alerts("HalfmoonNodeDown") if a["state"] == "firing"], 120)
        assert firing, prom.alerts("HalfmoonNodeDown")
        (alert,) = firing
        assert alert["labels"] == {"alertname": "HalfmoonNodeDown", "severity": "critical", "node": "decode-1",
                                   "role": "decode", "job": "halfmoon-conductor", "instance": conductor_metrics}
        assert alert["annotations"]["summary"] == "decode node decode-1 is down"
        assert "Ray actor halfmoon-decode-1" in alert["annotations"]["description"]
        took = time.monotonic() - killed
        active_for = time.time() - datetime.fromisoformat(alert["activeAt"].replace("Z", "+00:00")).timestamp()
        assert 60 <= active_for < 75, alert  # `for: 1m`, counted from the first evaluation that saw it down
        (metrics_down,) = prom.alerts("HalfmoonNodeMetricsDown")
        assert metrics_down["state"] == "pending" and metrics_down["labels"]["node"] == "decode-1"
        others = {a["labels"]["alertname"] for a in prom.get("/api/v1/alerts")["alerts"]}
        assert others == {"HalfmoonNodeDown", "HalfmoonNodeMetricsDown"}, others
        print(f"HalfmoonNodeDown pending {pending:.1f}s and firing {took:.1f}s after kill -9")
    finally:
        prom.stop()
    assert not re.search(r"level=error", (tmp_path / "prometheus.log").read_text()), \
        (tmp_path / "prometheus.log").read_text()[-3000:]
