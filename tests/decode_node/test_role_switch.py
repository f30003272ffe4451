"""A node moved between the pools under load (`halfmoon admin move`, Admin.MoveNode): a real
1P+2D cluster, requests streaming all the while; decode-1 is drained (no new requests, those
on it finish), restarts as a prefill node in its own process and registers again. No request
is lost or changed (greedy: every answer to a prompt is the same), the moved node then
prefills requests, and no KV block is left held on any node."""
from __future__ import annotations

import socket
import threading
import time

import grpc
import pytest

from cluster.client import Client, make_request
from engine.sampling import SamplingParams
from proto.halfmoon.v1 import admin_pb2

pytestmark = [pytest.mark.slow, pytest.mark.real_model]

PROMPTS = ["Name three colors.", "What is two plus two?", "Say hello in French.", "Count to five."]
PARAMS = SamplingParams(max_tokens=24, ignore_eos=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    from cluster.local import LocalCluster
    from cluster.node_main import NodeSpec
    from conductor.server import ConductorSpec

    spec = ConductorSpec(grpc_port=free_port(), http_port=None, heartbeat_interval_s=0.3, heartbeat_timeout_s=5.0,
                         settings={"ttft_slo_s": 600.0, "tbt_slo_s": 60.0, "policy": "round_robin",
                                   "admission": "none"})
    node = NodeSpec(role="prefill", node_id="", conductor="", num_blocks=256, num_threads=1)
    c = LocalCluster.build(1, 2, conductor=spec, node=node).start()
    yield c
    c.stop()


def wait_for(pred, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.25)
    return pred()


def test_a_decode_node_moved_to_prefill_under_load_loses_no_request_and_leaks_no_block(cluster):
    results: list[tuple[int, float, object]] = []  # (prompt, finished at, Result)
    errors: list[BaseException] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        with Client(cluster.address) as c:
            k = worker
            while not stop.is_set():
                try:
                    res = c.generate(make_request(PROMPTS[k % len(PROMPTS)], params=PARAMS), timeout=300)
                    results.append((k % len(PROMPTS), time.monotonic(), res))
                except BaseException as e:  # noqa: BLE001 (any failure is the test's finding)
                    errors.append(e)
                    return
                k += 1

    threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(3)]
    for t in threads:
        t.start()
    with Client(cluster.address) as admin:
        assert wait_for(lambda: any(r[2].final.decode_node == "decode-1" for r in results), 180), errors
        with pytest.raises(grpc.RpcError) as refused:  # the only prefill node cannot leave its pool
            admin.admin.MoveNode(admin_pb2.MoveNodeRequest(node_id="prefill-0", role="decode"), timeout=30)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        moved = admin.admin.MoveNode(admin_pb2.MoveNodeRequest(node_id="decode-1", role="prefill", timeout_s=240),
                                     timeout=260)
        moved_at = time.monotonic()
        assert (moved.from_role, moved.role) == ("decode", "prefill")
        roles = {n.node_id: (n.role, n.state) for n in admin.status().nodes}
        assert roles == {"prefill-0": ("prefill", "up"), "decode-0": ("decode", "up"), "decode-1": ("prefill", "up")}
        assert wait_for(lambda: sum(1 for r in results if r[1] > moved_at) >= 6, 240), errors
        stop.set()
        for t in threads:
            t.join(300)
        assert not errors, errors
        assert not any(t.is_alive() for t in threads)
        after = [r for _, at, r in results if at > moved_at]
        assert {r.final.decode_node for r in after} == {"decode-0"}
        assert "decode-1" in {r.final.prefill_node for r in after}  # it prefills now (round robin)
        by_prompt: dict[int, set] = {}
        for k, _, r in results:
            assert r.final.finish_reason == "length" and len(r.token_ids) == PARAMS.max_tokens
            by_prompt.setdefault(k, set()).add(tuple(r.token_ids))
        assert all(len(answers) == 1 for answers in by_prompt.values()), by_prompt  # greedy: nothing changed
        used = lambda: {n.node_id: n.kv_blocks_used for n in admin.status().nodes if n.state == "up"}  # noqa: E731
        assert wait_for(lambda: all(v == 0 for v in used().values()), 30), used()
