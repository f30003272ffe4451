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
