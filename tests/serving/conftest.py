"""A real multi-process cluster on loopback for end-to-end tests."""
from __future__ import annotations

import socket

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster(num_prefill: int, num_decode: int, *, settings: dict | None = None, num_blocks: int = 512,
                  heartbeat_timeout_s: float = 3.0, colocated: int = 0, **conductor_kw):
    from cluster.local import LocalCluster
    from cluster.node_main import NodeSpec
    from conductor.server import ConductorSpec

    spec = ConductorSpec(grpc_port=free_port(), http_port=None, settings=settings or {},
                         heartbeat_interval_s=0.5, heartbeat_timeout_s=heartbeat_timeout_s, **conductor_kw)
    node = NodeSpec(role="prefill", node_id="", conductor="", num_blocks=num_blocks, num_threads=1)
    return LocalCluster.build(num_prefill, num_decode, conductor=spec, node=node, colocated=colocated).start()


@pytest.fixture(scope="module")
def cluster_2p2d():
    c = start_cluster(2, 2, settings={"ttft_slo_s": 600.0, "tbt_slo_s": 60.0})
    yield c
    c.stop()


class InProcessCluster:
    """The conductor and nodes `LocalCluster.build` describes, as coroutines on one event
    loop in a background thread of the test process: seconds to start, for tests in which
    no process has to die (those use `start_cluster`)."""

    def __init__(self, num_prefill: int, num_decode: int, *, settings: dict | None = None, num_blocks: int = 256,
                 **conductor_kw) -> None:
        from cluster.local import LocalCluster
        from cluster.node_main import NodeSpec
        from conductor.server import ConductorSpec

        spec = ConductorSpec(grpc_port=free_port(), http_port=conductor_kw.pop("http_port", None),
                             settings=settings or {}, heartbeat_interval_s=0.5, heartbeat_timeout_s=5.0,
                             **conductor_kw)
        node = NodeSpec(role="prefill", node_id="", conductor="", num_blocks=num_blocks, num_threads=1)
        self.local = LocalCluster.build(num_prefill, num_decode, conductor=spec, node=node)
        self._loop = None
        self._stop = None
        self._thread = None
        self._error: list[BaseException] = []

    @property
    def address(self) -> str:
        return self.local.address

    def start(self, timeout_s: float = 120.0) -> "InProcessCluster":
        import asyncio
        import threading

        ready = threading.Event()

        async def main() -> None:
            from cluster.node_main import serve_node
            from conductor.server import serve_conductor

            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            ready.set()
            tasks = [asyncio.ensure_future(serve_conductor(self.local.conductor, self._stop))]
            tasks += [asyncio.ensure_future(serve_node(n, self._stop)) for n in self.local.nodes]
            await asyncio.gather(*tasks)

        def run() -> None:
            try:
                asyncio.run(main())
            except BaseException as e:  # surfaced by stop()
                self._error.append(e)
                ready.set()

        self._thread = threading.Thread(target=run, name="in-process-cluster", daemon=True)
        self._thread.start()
        ready.wait(30)
        try:
            self.local.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(30)
        if self._error:
            raise self._error[0]


@pytest.fixture
def in_process_cluster():
    """`in_process_cluster(num_prefill, num_decode, **kw)` starts an `InProcessCluster`,
    stopped when the test ends."""
    started: list[InProcessCluster] = []

    def start(*args, start_timeout_s: float = 120.0, **kw) -> InProcessCluster:
        cluster = InProcessCluster(*args, **kw)
        started.append(cluster)
        return cluster.start(start_timeout_s)

    yield start
    for cluster in started:
        cluster.stop()
