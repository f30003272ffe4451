"""halfmoon on a multi-node Ray cluster simulated on this machine: a head offering
`{"conductor": 1}`, one Ray node offering `{"prefill": 1}` and one offering `{"decode": 1}`.
The actors must land where their resources are, serve the real model over gRPC and the
OpenAI-compatible HTTP API alike, expose metrics that move, and leave nothing behind."""
from __future__ import annotations

import json
import os
import signal
import urllib.request
from pathlib import Path

import grpc
import psutil
import pytest
from ray_helpers import free_port, metric, metric_samples, shm_segments_of, wait_for

from cluster.client import Client, make_request
from cluster.config import ClusterConfig, parse_config
from cluster.ray_launcher import AlreadyDeployed, DeployError, RayLauncher, stop_namespace
from engine.sampling import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.real_model]

MODEL = "smollm2-135m-instruct"
SMALL_STORE = 80 * 2**20  # bytes of object store per Ray node: halfmoon sends nothing big through it


def cluster_config(http_port: int, targets_file: Path, namespace: str = "halfmoon-test") -> ClusterConfig:
    return parse_config(f"""
prefill: {{count: 1, num_cpus: 1, resources: {{prefill: 1}}}}
decode: {{count: 1, num_cpus: 1, resources: {{decode: 1}}}}
kv: {{num_blocks: 256}}
conductor:
  grpc_port: 0                  # the launcher asks the conductor actor where it listens
  http_port: {http_port}
  resources: {{conductor: 1}}
  ttft_slo_s: 600
  tbt_slo_s: 60
  heartbeat_interval_s: 0.5
  heartbeat_timeout_s: 5
  prometheus_targets_file: {targets_file}
ray: {{namespace: {namespace}}}
""")


@pytest.fixture(scope="module")
def ray_cluster():
    import ray
    from ray.cluster_utils import Cluster

    def node_args(**resources: float) -> dict:
        return {"num_cpus": 1, "resources": resources, "object_store_memory": SMALL_STORE,
                "dashboard_agent_listen_port": free_port()}

    cluster = Cluster(initialize_head=True, head_node_args={**node_args(conductor=1), "include_dashboard": False})
    try:
        cluster.add_node(**node_args(prefill=1))
        cluster.add_node(**node_args(decode=1))
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def deployed(ray_cluster, tmp_path_factory):
    targets = tmp_path_factory.mktemp("prometheus") / "targets.json"
    launcher = RayLauncher(cluster_config(free_port(), targets))
    deployment = launcher.start(timeout_s=300)
    yield launcher, deployment
    launcher.stop()


def ray_node_offering(resource: str) -> str:
    import ray

    (node,) = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get(resource)]
    return node


def test_each_actor_runs_on_the_ray_node_offering_its_resource(deployed):
    _, dep = deployed
    assert dep.conductor.placement.ray_node_id == ray_node_offering("conductor")
    by_id = {n.node_id: n for n in dep.nodes}
    assert set(by_id) == {"prefill-0", "decode-0"}
    assert by_id["prefill-0"].placement.ray_node_id == ray_node_offering("prefill")
    assert by_id["decode-0"].placement.ray_node_id == ray_node_offering("decode")
    assert len({dep.conductor.placement.pid, *(n.placement.pid for n in dep.nodes)}) == 3
    assert dep.grpc_address.startswith("127.0.0.1:") and not dep.grpc_address.endswith(":0")


def test_the_store_master_runs_as_an_actor_beside_the_conductor_and_every_node_uses_it(deployed):
    launcher, dep = deployed
    assert dep.store is not None and dep.store.reason == ""
    assert dep.store.placement.ray_node_id == dep.conductor.placement.ray_node_id
    assert dep.store.address.startswith("127.0.0.1:") and launcher.config.kv_tiers.store_master == dep.store.address
    with Client(dep.grpc_address) as c:
        tiers = {n.node_id: {t.tier for t in n.tiers} for n in c.status().nodes}
    assert tiers == {"prefill-0": {"device", "host", "disk", "cluster"},
                     "decode-0": {"device", "host", "cluster"}}  # a decode node: the write-back's staging only


def test_a_request_completes_through_the_ray_cluster(deployed):
    _, dep = deployed
    with Client(dep.grpc_address) as c:
        res = c.generate(make_request(chat=[("user", "What is the capital of France?")],
                                      params=SamplingParams(max_tokens=12)), timeout=180)
        assert "Paris" in res.text
        assert (res.final.prefill_node, res.final.decode_node) == ("prefill-0", "decode-0")
        assert {n.node_id for n in c.status().nodes if n.state == "up"} == {"prefill-0", "decode-0"}


def test_the_launcher_writes_prometheus_targets_for_the_conductor_and_every_node(deployed):
    launcher, dep = deployed
    doc = json.loads(launcher.config.conductor.prometheus_targets_file.read_text())
    with Client(dep.grpc_address) as c:
        want = {n.node_id: n.metrics_address for n in c.status().nodes}
    want["conductor"] = dep.http_url.removeprefix("http://")
    assert {t["labels"]["node"]: t["targets"][0] for t in doc} == want
    assert {t["labels"]["node"]: t["labels"]["role"] for t in doc} == {
        "conductor": "conductor", "prefill-0": "prefill", "decode-0": "decode"}


def test_a_second_deployment_in_the_same_namespace_is_refused(deployed):
    launcher, dep = deployed
    with pytest.raises(AlreadyDeployed, match="halfmoon-test"):
        RayLauncher(launcher.config).start(timeout_s=30)
    with Client(dep.grpc_address) as c:  # and the running one is untouched
        assert len(c.status().nodes) == 2


def test_openai_client_matches_the_grpc_path(deployed):
    openai = pytest.importorskip("openai")
    _, dep = deployed
    api = openai.OpenAI(base_url=f"{dep.http_url}/v1", api_key="unused", timeout=180, max_retries=0)
    question = "Name one planet of the solar system."
    with Client(dep.grpc_address) as c:
        want_chat = c.generate(make_request(chat=[("user", question)], params=SamplingParams(max_tokens=16))).text
        want_text = c.generate(make_request("The capital of Italy is", params=SamplingParams(max_tokens=16))).text
    stream = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                         max_tokens=16, temperature=0, stream=True)
    chunks = [ch.choices[0].delta.content or "" for ch in stream if ch.choices]
    assert len([c for c in chunks if c]) > 1, "the answer was not streamed"
    assert "".join(chunks) == want_chat
    done = api.completions.create(model=MODEL, prompt="The capital of Italy is", max_tokens=16, temperature=0)
    assert done.choices[0].text == want_text and want_text
    assert done.usage.completion_tokens == 16 or done.choices[0].finish_reason == "stop"


def scrape(address: str) -> dict:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as resp:
        return metric_samples(resp.read().decode())


def test_conductor_and_node_metrics_move_when_requests_run(deployed):
    _, dep = deployed
    with Client(dep.grpc_address) as c:
        nodes = {n.node_id: n.metrics_address for n in c.status().nodes}
        assert all(nodes.values()), f"a node did not report its metrics address: {nodes}"
        conductor_http = dep.http_url.removeprefix("http://")
        before = {"conductor": scrape(conductor_http), **{n: scrape(a) for n, a in nodes.items()}}
        prompt = "Metrics test: " + "count the words in this sentence please. " * 6
        res = c.generate(make_request(prompt, params=SamplingParams(max_tokens=8, ignore_eos=True)))
        assert res.final.usage.completion_tokens == 8
    after_conductor = scrape(conductor_http)

    def moved(name: str, **labels: str) -> float:
        return metric(after_conductor, name, **labels) - metric(before["conductor"], name, **labels)

    assert moved("halfmoon:request_success_total", finish_reason="length") == 1
    assert moved("halfmoon:generation_tokens_total") == 8
    assert moved("halfmoon:prompt_tokens_total") == res.final.usage.prompt_tokens
    assert moved("halfmoon:time_to_first_token_seconds_count") == 1
    assert moved("halfmoon:inter_token_latency_seconds_count") == 7
    assert metric(after_conductor, "halfmoon:node_up", node="prefill-0", role="prefill") == 1
    assert metric(after_conductor, "halfmoon:node_up", node="decode-0", role="decode") == 1
    assert metric(after_conductor, "halfmoon:admission_info", policy="cost_aware", admission="early") == 1

    def node_moved(node: str, name: str) -> float:  # nodes publish some values at each heartbeat
        return wait_for(lambda: metric(scrape(nodes[node]), name) - metric(before[node], name), timeout_s=10)

    assert node_moved("prefill-0", "halfmoon:prefix_cache_queries_total") == res.final.usage.prompt_tokens
    assert node_moved("prefill-0", "halfmoon:kv_transfer_bytes_total") > 0
    assert node_moved("prefill-0", "halfmoon:kv_transfer_seconds_count") >= 1


def test_node_load_metrics_follow_a_running_request(deployed):
    _, dep = deployed
    with Client(dep.grpc_address) as c:
        address = next(n.metrics_address for n in c.status().nodes if n.node_id == "decode-0")
        labels = {"node": "decode-0", "role": "decode"}
        running = c.stream(make_request("Tell me a long story about the sea.",
                                        params=SamplingParams(max_tokens=96, ignore_eos=True)))
        next(running)  # the first token: the request now decodes on decode-0
        busy = wait_for(lambda: (lambda s: s if metric(s, "halfmoon:num_requests_running", **labels) == 1 else None)(
            scrape(address)), timeout_s=20, every_s=0.1)
        assert busy, "decode-0 never reported the running request"
        assert metric(busy, "halfmoon:kv_blocks_used", **labels) >= 1
        for _ in running:
            pass
        idle = wait_for(lambda: (lambda s: s if metric(s, "halfmoon:num_requests_running", **labels) == 0 else None)(
            scrape(address)), timeout_s=20)
        assert idle and metric(idle, "halfmoon:kv_blocks_used", **labels) < metric(busy, "halfmoon:kv_blocks_used", **labels)


def named_actors(namespace: str) -> list[str]:
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == namespace]


def test_an_actor_no_ray_node_can_place_fails_the_start_naming_its_ask(deployed):
    launcher = RayLauncher(parse_config("""
conductor: {grpc_port: 0, http_port: 0, num_cpus: 0, resources: {nowhere: 1}}
ray: {namespace: halfmoon-test-failures}
"""))
    with pytest.raises(DeployError, match=r"halfmoon-conductor did not start in time; it asks Ray for "
                                          r"CPU 0, nowhere 1 \(free now: .*\) - does a Ray node offer that\?"):
        launcher.start(timeout_s=3)
    assert wait_for(lambda: not named_actors("halfmoon-test-failures"), timeout_s=20)


def test_a_server_that_dies_while_starting_fails_the_start_with_its_error(deployed, tmp_path):
    launcher = RayLauncher(parse_config(f"""
model: {{path: {tmp_path}}}
conductor: {{grpc_port: 0, http_port: 0, num_cpus: 0}}
ray: {{namespace: halfmoon-test-failures}}
"""))
    with pytest.raises(DeployError, match=r"(?s)halfmoon-conductor failed to start: .*has no config.json"):
        launcher.start(timeout_s=120)
    assert wait_for(lambda: not named_actors("halfmoon-test-failures"), timeout_s=20)
    _, dep = deployed
    with Client(dep.grpc_address) as c:  # the other deployment is untouched
        assert {n.state for n in c.status().nodes} == {"up"}


def test_stop_ends_every_actor_and_sigterm_frees_a_nodes_shared_memory(deployed):
    """Last in this module: it takes the deployment down."""
    launcher, dep = deployed
    decode = next(n for n in dep.nodes if n.role == "decode")
    segments = shm_segments_of(decode.placement.pid)
    assert segments, "the decode node registered no shared-memory KV region"
    os.kill(decode.placement.pid, signal.SIGTERM)  # Ray -> SystemExit -> our atexit stop
    assert wait_for(lambda: not psutil.pid_exists(decode.placement.pid), timeout_s=30)
    assert shm_segments_of(decode.placement.pid) == [], "SIGTERM left the node's shared memory behind"
    with Client(dep.grpc_address) as c:
        down = wait_for(lambda: [n.node_id for n in c.status().nodes if n.state == "down"], timeout_s=30)
    assert down == ["decode-0"]
    with pytest.raises(DeployError, match="decode-0"):
        launcher.check()
    pids = [dep.conductor.placement.pid, *(n.placement.pid for n in dep.nodes), dep.store.placement.pid]
    master = psutil.Process(dep.store.placement.pid).children()
    assert master, "the store master actor runs no mooncake_master"
    stopped = launcher.stop()
    assert set(stopped) == {"halfmoon-conductor", "halfmoon-store-master", "halfmoon-prefill-0",
                            "halfmoon-decode-0"}
    assert wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in master),
                    timeout_s=30)
    assert wait_for(lambda: not any(psutil.pid_exists(p) for p in pids), timeout_s=30)
    assert all(shm_segments_of(p) == [] for p in pids)
    with pytest.raises(grpc.RpcError), Client(dep.grpc_address) as c:
        c.status(timeout=2)
    assert stop_namespace("halfmoon-test") == []
    assert named_actors("halfmoon-test") == []
