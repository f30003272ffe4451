"""kill -9 of a node under load, on a real 2P+2D cluster of processes (tiny model, untied LM
head so every token depends on its context).

The heartbeat timeout is 30 s here, so only a failed RPC can take the killed node out of
rotation as fast as the tests ask (within 1 s). Decode node: no request fails, neither those
arriving after the kill (retried on the survivor) nor those streaming on the victim
(migrated with the tokens streamed so far), and every output equals the undisturbed greedy
run. Prefill node: it leaves rotation at once and no request fails. Afterwards every surviving
node holds 0 KV blocks once idle.
"""
from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from cluster.client import Client, make_request
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling import SamplingParams

pytestmark = pytest.mark.slow

MAX_TOKENS = 480  # ~1 s a request on a quiet machine: longer than a heartbeat, so a busy node is still busy when killed
PARAMS = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
CONCURRENCY = 6


@pytest.fixture(scope="module")
def untied_tiny_model(tiny_model_dir, tmp_path_factory):
    """The tiny model with a random, untied LM head: its greedy output is no longer the last
    prompt token repeated, so a token lost or repeated at a migration shows."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("tiny-untied")
    for f in tiny_model_dir.iterdir():
        shutil.copy(f, out / f.name)
    state = load_file(str(out / "model.safetensors"))
    g = torch.Generator().manual_seed(7)
    state["lm_head.weight"] = torch.randn(state["model.embed_tokens.weight"].shape, generator=g) * 0.5
    save_file(state, str(out / "model.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def cluster(untied_tiny_model):
    from cluster.local import LocalCluster
    from cluster.node_main import NodeSpec
    from cluster.specs import free_port
    from conductor.server import ConductorSpec

    spec = ConductorSpec(grpc_port=free_port(), http_port=free_port(), model=str(untied_tiny_model),
                         max_model_len=1024, heartbeat_interval_s=0.1, heartbeat_timeout_s=30.0,
                         settings={"ttft_slo_s": 600.0, "tbt_slo_s": 60.0, "admission": "none"})
    node = NodeSpec(role="prefill", node_id="", conductor="", num_blocks=512, num_threads=1)
    c = LocalCluster.build(2, 2, conductor=spec, node=node).start()
    yield c
    c.stop()


def prompts(n: int, length: int, salt: int) -> list[list[int]]:
    return [[(salt + 7919 * i + 31 * j) % 40000 + 100 for j in range(length + i % 5)] for i in range(n)]


def expected(model_dir, batch: list[list[int]]) -> list[list[int]]:
    engine = LLMEngine(model_dir, EngineConfig(num_blocks=1024))
    return engine.generate(batch, PARAMS)


def counter(cluster, name: str) -> float:
    url = f"http://{cluster.conductor.host}:{cluster.conductor.http_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def node_states(c: Client) -> dict[str, tuple[str, int, int]]:
    return {n.node_id: (n.state, n.running, n.kv_blocks_used) for n in c.status().nodes}


class Load:
    """`len(batch)` requests, CONCURRENCY at a time; records when each started and ended."""

    def __init__(self, address: str, batch: list[list[int]]) -> None:
        self.address, self.batch = address, batch
        self.started: dict[int, float] = {}
        self.ended: dict[int, float] = {}
        self.results: dict[int, object] = {}
        self.done = threading.Event()
        self._pool = ThreadPoolExecutor(CONCURRENCY)
        self._client = Client(address)

    def _one(self, i: int) -> None:
        self.started[i] = time.monotonic()
        try:
            self.results[i] = self._client.generate(make_request(token_ids=self.batch[i], params=PARAMS), timeout=120)
        except Exception as e:  # asserted by the test
            self.results[i] = e
        self.ended[i] = time.monotonic()

    def start(self) -> "Load":
        futures = [self._pool.submit(self._one, i) for i in range(len(self.batch))]
        threading.Thread(target=lambda: ([f.result() for f in futures], self.done.set()), daemon=True).start()
        return self

    def finish(self, timeout: float) -> None:
        assert self.done.wait(timeout), f"{len(self.ended)} of {len(self.batch)} requests ended in {timeout:.0f}s"
        self._pool.shutdown()
        self._client.close()

    def failures(self) -> dict[int, str]:
        return {i: repr(r) for i, r in self.results.items() if isinstance(r, Exception)}


def wait_until(pred, timeout: float, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(every)


def idle_blocks(c: Client, timeout: float = 30.0) -> dict[str, int]:
    """Blocks used on every node in rotation, once they all read 0 (or at the timeout)."""
    used: dict[str, int] = {}

    def zero() -> bool:
        used.clear()
        used.update({n.node_id: n.kv_blocks_used for n in c.status().nodes if n.state == "up"})
        return all(v == 0 for v in used.values())

    wait_until(zero, timeout, every=0.3)
    return used


def test_killed_decode_node_under_load_fails_no_request_and_migrates_its_streams(cluster, untied_tiny_model):
    batch = prompts(48, 40, salt=1)
    want = expected(untied_tiny_model, batch)
    with Client(cluster.address) as c:
        load = Load(cluster.address, batch).start()
        assert wait_until(lambda: len(load.ended) >= 8, 120), "the load did not get going"
        def busy_decode_node() -> str | None:  # one streaming at least two requests now
            running = {n: st[1] for n, st in node_states(c).items() if n.startswith("decode")}
            node = max(running, key=running.get)
            return node if running[node] >= 2 else None

        victim = wait_until(busy_decode_node, 60)
        assert victim, "no decode node ever ran two requests at once"
        survivor = ({"decode-0", "decode-1"} - {victim}).pop()
        t_kill = time.monotonic()
        cluster.kill(victim)
        out_at = wait_until(lambda: node_states(c)[victim][0] == "down" and time.monotonic(), 10, every=0.02)
        assert out_at, f"{victim} still in rotation 10 s after kill -9"
        detect_s = out_at - t_kill
        load.finish(180)
        in_flight = [i for i in load.started if load.started[i] < t_kill < load.ended[i]]
        after = [i for i in load.started if load.started[i] > t_kill]
        assert load.failures() == {}
        for i in range(len(batch)):
            assert load.results[i].token_ids == want[i], f"request {i} differs from the undisturbed run"
            assert load.results[i].final.usage.completion_tokens == MAX_TOKENS
        assert after, "no request arrived after the kill"
        assert all(load.results[i].final.decode_node == survivor for i in after)
        migrated = counter(cluster, "halfmoon:requests_migrated_total")
        assert in_flight and migrated >= 1, f"{len(in_flight)} requests in flight at the kill, {migrated} migrated"
        assert detect_s < 1.0, f"{victim} left rotation {detect_s:.2f}s after the kill"
        assert idle_blocks(c) == {"prefill-0": 0, "prefill-1": 0, survivor: 0}


def test_killed_prefill_node_leaves_rotation_at_once_and_fails_no_request(cluster, untied_tiny_model):
    """Runs after the decode test (one decode node left)."""
    batch = prompts(40, 300, salt=2)
    with Client(cluster.address) as c:
        load = Load(cluster.address, batch).start()
        assert wait_until(lambda: len(load.ended) >= 6, 120), "the load did not get going"
        victim = "prefill-1"
        t_kill = time.monotonic()
        cluster.kill(victim)
        out_at = wait_until(lambda: node_states(c)[victim][0] == "down" and time.monotonic(), 10, every=0.02)
        assert out_at and out_at - t_kill < 1.0, f"{victim} not out of rotation within 1 s"
        load.finish(180)
        assert load.failures() == {}
        after = [i for i in load.started if load.started[i] > t_kill + 0.1]
        assert after and all(load.results[i].final.prefill_node == "prefill-0" for i in after)
        survivor = next(n for n, st in node_states(c).items() if n.startswith("decode") and st[0] == "up")
        assert idle_blocks(c) == {"prefill-0": 0, survivor: 0}
    assert [load.results[i].token_ids for i in range(len(batch))] == expected(untied_tiny_model, batch)
