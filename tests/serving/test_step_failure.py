"""An engine step that raises ends every request in it at once with a clear error, frees
their blocks, is counted by the conductor, and the node goes on serving.

The whole cluster (conductor + 1 prefill + 1 decode node on the tiny model) runs on threads
of this process, so a fault can be injected into the nodes' `ModelRunner.run`: it raises
once, in a step that holds a "poison" request (marked by its seed) together with an
innocent one. The innocent request's steps are slowed so the poison joins them.

The last test sends what used to fail a step (issue 11: temperature 1e-40 made the prefill
step raise and hung the call) through a real 1P+1D cluster on the real model.
"""
from __future__ import annotations

import re
import threading
import time
import urllib.request

import grpc
import pytest

from cluster.client import Client, make_request
from conftest import start_cluster  # tests/serving/conftest.py: at import time, while it is the conftest being collected
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.model_runner import ModelRunner
from engine.sampling import SamplingParams

POISON_SEED, INNOCENT_SEED = 666, 777
NUM_BLOCKS = 64
FAULT = "injected step fault"


@pytest.fixture(scope="module")
def tiny_cluster(tiny_model_dir):
    from cluster.local import LocalCluster
    from cluster.node_main import NodeSpec, serve_node
    from cluster.ray_actors import ServerThread
    from cluster.specs import free_port
    from conductor.server import ConductorSpec, serve_conductor

    spec = ConductorSpec(grpc_port=free_port(), http_port=free_port(), model=str(tiny_model_dir), max_model_len=1024,
                         settings={"ttft_slo_s": 600.0, "tbt_slo_s": 60.0}, heartbeat_interval_s=0.2,
                         heartbeat_timeout_s=10.0)
    node = NodeSpec(role="prefill", node_id="", conductor="", num_blocks=NUM_BLOCKS, num_threads=1,
                    max_num_batched_tokens=32)
    cluster = LocalCluster.build(1, 1, conductor=spec, node=node)

    async def run_node(n, stop, started):
        started.set_result(None)
        await serve_node(n, stop)

    threads = [ServerThread("conductor", lambda stop, started: serve_conductor(cluster.conductor, stop, started))]
    threads += [ServerThread(n.node_id, lambda stop, started, n=n: run_node(n, stop, started)) for n in cluster.nodes]
    for t in threads:
        t.start()
    try:
        cluster.wait_ready(120)
        yield cluster
    finally:
        for t in reversed(threads):
            t.stop(15)


class StepFault:
    """Wraps `ModelRunner.run`: slows the innocent request's steps of one phase, and raises
    once in the first step of that phase holding both the poison and the innocent request."""

    def __init__(self, phase: str, slow_s: float) -> None:
        self.phase = phase  # "prefill": both are computing their prompts; "decode": both are generating
        self.slow_s = slow_s
        self.innocent_seen = threading.Event()
        self.fired_at: float | None = None
        self.fired_with: list[int | None] = []

    def in_phase(self, req) -> bool:
        if self.phase == "prefill":
            return req.num_computed_tokens < len(req.prompt_token_ids)
        return len(req.output_token_ids) >= 2  # only the decode node generates past the first token

    def wrap(self, run):
        def faulty_run(runner, sched):
            reqs = [c.request for c in sched.prefills] + list(sched.decodes)
            mine = {r.params.seed for r in reqs if self.in_phase(r)}
            if INNOCENT_SEED in mine and self.fired_at is None:
                self.innocent_seen.set()
                if POISON_SEED in mine:
                    self.fired_at = time.monotonic()
                    self.fired_with = sorted(r.params.seed or 0 for r in reqs)
                    raise RuntimeError(FAULT)
                time.sleep(self.slow_s)
            return run(runner, sched)

        return faulty_run


def failed_total(cluster) -> float:
    port = cluster.conductor.http_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(v) for v in re.findall(r"^halfmoon:requests_failed_total\{[^}]*\} (\S+)$", text, re.M))


def wait_idle(client: Client, timeout: float = 15.0) -> dict[str, tuple[int, int]]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = {n.node_id: (n.kv_blocks_used, n.kv_blocks_total) for n in client.status().nodes}
        if all(used == 0 for used, _ in nodes.values()) or time.monotonic() > deadline:
            return nodes
        time.sleep(0.2)


def call(client: Client, req, results: dict, key: str) -> None:
    try:
        results[key] = client.generate(req, timeout=60)
    except grpc.RpcError as e:
        results[key] = e
    results[key + "_at"] = time.monotonic()


def run_fault(cluster, fault: StepFault, innocent, poison) -> dict:
    results: dict = {}
    with Client(cluster.address) as c:
        first = threading.Thread(target=call, args=(c, innocent, results, "innocent"))
        first.start()
        assert fault.innocent_seen.wait(30), "the innocent request never reached the phase under test"
        second = threading.Thread(target=call, args=(c, poison, results, "poison"))
        second.start()
        first.join(90)
        second.join(90)
    return results


def check_ended_by_the_fault(results: dict, fault: StepFault, where: str) -> None:
    assert fault.fired_at is not None, f"the fault never fired: {results}"
    assert fault.fired_with == [POISON_SEED, INNOCENT_SEED]
    for key in ("innocent", "poison"):
        err = results[key]
        assert isinstance(err, grpc.RpcError), f"{key} finished normally: {err}"
        assert err.code() == grpc.StatusCode.ABORTED, (key, err.code(), err.details())
        assert err.details().startswith(where + " failed: INTERNAL: "), (key, err.details())
        assert f"engine step failed: RuntimeError: {FAULT}" in err.details(), (key, err.details())
        assert results[key + "_at"] - fault.fired_at < 5.0, f"{key} took {results[key + '_at'] - fault.fired_at:.1f}s"


def check_still_serving(cluster, tiny_model_dir) -> None:
    with Client(cluster.address) as c:
        assert wait_idle(c) == {"prefill-0": (0, NUM_BLOCKS), "decode-0": (0, NUM_BLOCKS)}
        prompt = list(range(300, 340))
        params = SamplingParams(max_tokens=6, ignore_eos=True)
        res = c.generate(make_request(token_ids=prompt, params=params), timeout=60)
    want = LLMEngine(tiny_model_dir, EngineConfig(num_blocks=NUM_BLOCKS)).generate([prompt], params)[0]
    assert res.token_ids == want and res.final.finish_reason == "length"


def test_prefill_step_failure_fails_every_request_in_the_step_at_once(tiny_cluster, tiny_model_dir, monkeypatch):
    fault = StepFault("prefill", slow_s=0.1)
    monkeypatch.setattr(ModelRunner, "run", fault.wrap(ModelRunner.run))
    failed0 = failed_total(tiny_cluster)
    # 900 tokens in 32-token chunks: ~28 slowed steps, so the poison arrives while it prefills
    innocent = make_request(token_ids=[(7 * i) % 5000 + 10 for i in range(900)],
                            params=SamplingParams(max_tokens=4, seed=INNOCENT_SEED, ignore_eos=True))
    poison = make_request(token_ids=list(range(50, 90)), params=SamplingParams(max_tokens=4, seed=POISON_SEED))
    results = run_fault(tiny_cluster, fault, innocent, poison)
    check_ended_by_the_fault(results, fault, "prefill on prefill-0")
    assert failed_total(tiny_cluster) - failed0 == 2
    monkeypatch.undo()
    check_still_serving(tiny_cluster, tiny_model_dir)


def test_decode_step_failure_fails_every_request_in_the_step_at_once(tiny_cluster, tiny_model_dir, monkeypatch):
    fault = StepFault("decode", slow_s=0.05)
    monkeypatch.setattr(ModelRunner, "run", fault.wrap(ModelRunner.run))
    failed0 = failed_total(tiny_cluster)
    innocent = make_request(token_ids=list(range(400, 460)),
                            params=SamplingParams(max_tokens=200, seed=INNOCENT_SEED, ignore_eos=True))
    poison = make_request(token_ids=list(range(50, 90)),
                          params=SamplingParams(max_tokens=50, seed=POISON_SEED, ignore_eos=True))
    results = run_fault(tiny_cluster, fault, innocent, poison)
    check_ended_by_the_fault(results, fault, "decode node decode-0")
    assert failed_total(tiny_cluster) - failed0 == 2
    monkeypatch.undo()
    check_still_serving(tiny_cluster, tiny_model_dir)


@pytest.mark.slow
@pytest.mark.real_model
def test_tiny_temperature_through_the_real_cluster_is_greedy():
    cluster = start_cluster(1, 1, settings={"ttft_slo_s": 600.0, "tbt_slo_s": 60.0})
    try:
        prompt = "The capital of France is"
        with Client(cluster.address) as c:
            greedy = c.generate(make_request(prompt, params=SamplingParams(max_tokens=16, ignore_eos=True)), timeout=120)
            assert len(greedy.token_ids) == 16
            # 1e-40 and 1.4e-45 are float32 subnormals on the wire: sampled, at the greedy limit
            for temperature in (1e-40, 1.4e-45):
                params = SamplingParams(max_tokens=16, temperature=temperature, seed=5, ignore_eos=True)
                res = c.generate(make_request(prompt, params=params), timeout=120)
                assert res.token_ids == greedy.token_ids and res.final.finish_reason == "length", temperature
            with pytest.raises(grpc.RpcError) as e:  # 1e-320 is 0 as a float32: refused, naming top_p
                c.generate(make_request(prompt, params=SamplingParams(temperature=1.0, top_p=1e-320)), timeout=60)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert re.match(r"(sampling\.)?top_p: must be in \(0, 1\]", e.value.details()), e.value.details()
            assert {node: used for node, (used, _) in wait_idle(c).items()} == {"prefill-0": 0, "decode-0": 0}
    finally:
        cluster.stop()
