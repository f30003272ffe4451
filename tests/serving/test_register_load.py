"""A node's registration carries its load, so the conductor's Status shows it whole (its KV
tiers, its blocks) from the moment it is up, not only once its first heartbeat is read.

CI caught the gap: a Ray deployment read Status between a node's Register and its first
heartbeat and saw `prefill-0` with no tiers at all."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from proto.halfmoon.v1 import node_pb2, node_pb2_grpc

pytestmark = pytest.mark.timeout(180)


class _Control(node_pb2_grpc.ConductorControlServicer):
    """A conductor's control plane that only records what the node sends."""

    def __init__(self) -> None:
        self.registers: list[node_pb2.RegisterRequest] = []
        self.registered = asyncio.Event()

    async def Register(self, request, context):
        self.registers.append(node_pb2.RegisterRequest.FromString(request.SerializeToString()))
        self.registered.set()
        return node_pb2.RegisterResponse(heartbeat_interval_s=60.0)

    async def Heartbeat(self, request, context):
        return node_pb2.HeartbeatResponse(known=True)


def test_the_registration_carries_the_nodes_tiers_and_free_blocks(tmp_path):
    from cluster.node_main import NodeSpec, serve_node
    from engine.tiers import TierConfig

    async def scenario() -> list[node_pb2.RegisterRequest]:
        control = _Control()
        server = grpc.aio.server()
        node_pb2_grpc.add_ConductorControlServicer_to_server(control, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        stop = asyncio.Event()
        spec = NodeSpec(role="prefill", node_id="prefill-7", conductor=f"127.0.0.1:{port}", num_blocks=96,
                        num_threads=1, kv_tiers=TierConfig(host_gib=0.01, disk_gib=0.01, disk_dir=str(tmp_path)))
        node = asyncio.ensure_future(serve_node(spec, stop))
        try:
            await asyncio.wait_for(control.registered.wait(), 150)
        finally:
            stop.set()
            await asyncio.wait_for(node, 60)
            await server.stop(None)
        return control.registers

    registers = asyncio.run(scenario())
    reg = registers[0]
    assert reg.node_id == "prefill-7" and reg.HasField("load")
    assert {t.tier for t in reg.load.tiers} == {"device", "host", "disk"}
    assert reg.load.free_blocks == 96 and reg.load.running == 0 and reg.load.waiting == 0
