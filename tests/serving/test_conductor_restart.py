"""A conductor restart under running nodes: they register again by themselves within a few
heartbeats, drop the work the old conductor orphaned (a stream it held, a KV reservation
it never claimed), the new conductor's prefix index is rebuilt from the prefill nodes' KV
snapshots, requests succeed with the same tokens, and no node keeps a block."""
from __future__ import annotations

import random
import socket
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.client import Client, make_request
from cluster.local import LocalCluster
from cluster.node_main import NodeSpec
from conductor.server import ConductorSpec
from engine.sampling import SamplingParams
from proto.halfmoon.v1 import node_pb2, node_pb2_grpc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

HEARTBEAT_S = 0.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def used_blocks(client: Client) -> dict[str, int]:
    return {n.node_id: n.kv_blocks_used for n in client.status().nodes if n.state == "up"}


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.1)


def wait_live(address: str, timeout_s: float) -> float:
    """Until the conductor's liveness answers SERVING; returns that time (monotonic)."""
    with grpc.insecure_channel(address) as ch:
        health = health_pb2_grpc.HealthStub(ch)

        def live() -> bool:
            try:
                return health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                    health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                return False

        wait_for(live, timeout_s, "the restarted conductor to serve")
    return time.monotonic()


def test_nodes_survive_a_conductor_restart(tiny_model_dir):
    spec = ConductorSpec(grpc_port=free_port(), http_port=None, model=str(tiny_model_dir),
                         heartbeat_interval_s=HEARTBEAT_S, heartbeat_timeout_s=3.0,
                         settings={"ttft_slo_s": 600.0, "tbt_slo_s": 60.0})
    node = NodeSpec(role="prefill", node_id="", conductor="", num_blocks=256, num_threads=1)
    cluster = LocalCluster.build(2, 1, conductor=spec, node=node)
    rng = random.Random(11)
    prompts = [[rng.randrange(100, 20000) for _ in range(80)] for _ in range(2)]  # 5 blocks each
    greedy = SamplingParams(max_tokens=8, ignore_eos=True)
    cluster.start(timeout_s=400)
    try:
        with Client(cluster.address) as client:
            client.set_settings({"policy": "round_robin"})  # one prompt cached on each prefill node
            before = [client.generate(make_request(token_ids=p, params=greedy)) for p in prompts]
            holders = [r.final.prefill_node for r in before]
            assert sorted(holders) == ["prefill-0", "prefill-1"]
            status = {n.node_id: n for n in client.status().nodes}
            # orphans: KV reserved for a request the old conductor will never run, and a stream in flight
            with grpc.insecure_channel(status["decode-0"].address) as ch:
                node_pb2_grpc.DecodeNodeStub(ch).Reserve(
                    node_pb2.ReserveRequest(request_id="orphan", num_tokens=64, lease_s=600), timeout=10)
            wait_for(lambda: used_blocks(client)["decode-0"] >= 4, 10, "the reservation to show")
            stream = client.stream(make_request(token_ids=prompts[0][:40],
                                                params=SamplingParams(max_tokens=800, ignore_eos=True)))
            assert next(stream).HasField("delta")

            cluster.kill("conductor")  # SIGKILL, mid-stream
            with pytest.raises(grpc.RpcError) as err:
                for _ in stream:
                    pass
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            time.sleep(4 * HEARTBEAT_S)  # the nodes' heartbeats fail meanwhile

            cluster.start_conductor()
            serving_at = wait_live(cluster.address, 120)
            cluster.wait_ready(60)
            rejoined_s = time.monotonic() - serving_at
            assert rejoined_s < 10 * HEARTBEAT_S, f"the nodes took {rejoined_s:.1f}s to register again"

            # nothing of the old conductor's work holds a block: the stream was aborted, the reservation freed
            wait_for(lambda: set(used_blocks(client).values()) == {0}, 15, "every node to report 0 used blocks")
            # the new index knows which node caches which prompt. Both nodes are idle, so with an
            # empty index the policy would pick the first in its view (registration) order: ask
            # first for the prompt the second node holds.
            time.sleep(2 * HEARTBEAT_S)  # the snapshots arrive right after registration
            view_order = [n.node_id for n in client.status().nodes if n.role == "prefill"]
            order = sorted(range(2), key=lambda i: holders[i] != view_order[1])
            after = {i: client.generate(make_request(token_ids=prompts[i], params=greedy)) for i in order}
            assert [after[i].final.prefill_node for i in range(2)] == holders
            assert all(r.final.usage.cached_tokens >= 64 for r in after.values())
            assert [after[i].token_ids for i in range(2)] == [r.token_ids for r in before]
            wait_for(lambda: set(used_blocks(client).values()) == {0}, 15, "0 used blocks once idle")
    finally:
        cluster.stop()


def test_a_node_keeps_redialing_a_lost_conductor_about_every_second():
    """gRPC's default reconnect backoff grows to 120 s: a node would find a restarted
    conductor only that late. The node's control channel redials at least once a second."""
    import asyncio
    import threading

    from cluster.node_main import RECONNECT_OPTIONS

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    attempts = []

    def refuse() -> None:  # accept each connection and drop it: every dial is counted and fails
        listener.settimeout(0.2)
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            attempts.append(time.monotonic())
            conn.close()

    async def heartbeats(seconds: float) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=RECONNECT_OPTIONS) as ch:
            stub = node_pb2_grpc.ConductorControlStub(ch)
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                try:
                    await stub.Heartbeat(node_pb2.HeartbeatRequest(node_id="n"), timeout=0.5)
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.2)

    done = threading.Event()
    thread = threading.Thread(target=refuse, daemon=True)
    thread.start()
    try:
        asyncio.run(heartbeats(12.0))
    finally:
        done.set()
        thread.join(5)
        listener.close()
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    # default backoff: dials at about 0, 1, 2.6, 5.2, 9.3 s (5 in 12 s, gaps growing to 4 s and more)
    assert len(attempts) >= 8 and max(gaps) < 2.0, (len(attempts), [round(g, 2) for g in gaps])


def test_the_process_launcher_restarts_a_dead_conductor_a_few_times(monkeypatch):
    class Proc:
        def __init__(self, alive: bool) -> None:
            self.alive, self.exitcode = alive, None if alive else -9

        def is_alive(self) -> bool:
            return self.alive

    cluster = LocalCluster(ConductorSpec(), [])
    started = []

    def start_conductor() -> None:
        started.append(time.monotonic())
        cluster.procs["conductor"] = Proc(alive=True)

    monkeypatch.setattr(cluster, "start_conductor", start_conductor)
    cluster.procs["conductor"] = Proc(alive=True)
    assert cluster.revive_conductor() is None and not started  # alive: nothing to do
    for _ in range(3):
        cluster.procs["conductor"] = Proc(alive=False)  # killed
        assert cluster.revive_conductor(max_restarts=3) is None
        assert cluster.procs["conductor"].is_alive()
    assert len(started) == 3
    cluster.procs["conductor"] = Proc(alive=False)  # a fourth death in the window: give up, say why
    assert cluster.revive_conductor(max_restarts=3) == "the conductor exited with code -9 after 3 restarts in 300s"
    assert len(started) == 3
