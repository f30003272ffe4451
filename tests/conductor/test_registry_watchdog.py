"""The heartbeat watchdog judges the nodes, not the conductor's own stalls.

Issue 11 chaos (stop-conductor): after SIGSTOP of the conductor for longer than the
heartbeat timeout, its watchdog ran before the heartbeats sent meanwhile were read and took
every node out of rotation, failing the requests in flight.
"""
from __future__ import annotations

import asyncio
import time

from conductor.registry import NodeRegistry
from proto.halfmoon.v1 import node_pb2


def _decode_node(node_id: str) -> node_pb2.RegisterRequest:
    return node_pb2.RegisterRequest(
        node_id=node_id, role=node_pb2.ROLE_DECODE, address="127.0.0.1:9",
        layout=node_pb2.KVLayout(block_size=16, block_bytes=4096, total_blocks=64, model="fake"))


def _beat(registry: NodeRegistry, node_id: str) -> bool:
    return registry.heartbeat(node_pb2.HeartbeatRequest(node_id=node_id, load=node_pb2.NodeLoad(free_blocks=64)))


def test_a_stalled_conductor_does_not_take_heartbeating_nodes_out_but_a_silent_node_still_goes():
    async def scenario() -> tuple[bool, bool, bool]:
        registry = NodeRegistry(16, heartbeat_interval_s=0.1, heartbeat_timeout_s=0.6)
        live = await registry.register(_decode_node("decode-live"))
        silent = await registry.register(_decode_node("decode-silent"))
        registry.start()
        try:
            await asyncio.sleep(0.2)
            _beat(registry, "decode-live")
            _beat(registry, "decode-silent")
            time.sleep(1.5)  # the whole event loop stops, as under SIGSTOP: 2.5x the timeout
            await asyncio.sleep(0.3)  # the watchdog runs first after the stall...
            live_after_stall = live.up
            _beat(registry, "decode-live")  # ...then the heartbeats sent meanwhile are read
            for _ in range(12):  # the silent node keeps missing beats: out within a timeout
                await asyncio.sleep(0.1)
                _beat(registry, "decode-live")
            return live_after_stall, live.up, silent.up
        finally:
            await registry.close()

    live_after_stall, live_at_end, silent_at_end = asyncio.run(scenario())
    assert live_after_stall, "the conductor's own stall was counted as the node's missed heartbeats"
    assert live_at_end
    assert not silent_at_end, "a node that stopped heartbeating must still go out of rotation"


def test_status_shows_the_load_a_node_registered_with_before_its_first_heartbeat():
    from conductor.grpc_api import AdminService
    from conductor.settings import ConductorSettings
    from proto.halfmoon.v1 import admin_pb2, common_pb2

    async def scenario():
        registry = NodeRegistry(16, heartbeat_interval_s=0.1, heartbeat_timeout_s=5.0)
        req = _decode_node("decode-0")
        req.load.CopyFrom(node_pb2.NodeLoad(free_blocks=60, tiers=[common_pb2.KVTierUse(tier="device"),
                                                                   common_pb2.KVTierUse(tier="host")]))
        await registry.register(req)
        await registry.register(_decode_node("decode-1"))  # a node from before the field: an empty load
        try:
            return await AdminService(ConductorSettings(), registry, "m").Status(admin_pb2.StatusRequest(), None)
        finally:
            await registry.close()

    nodes = {n.node_id: n for n in asyncio.run(scenario()).nodes}
    assert [t.tier for t in nodes["decode-0"].tiers] == ["device", "host"]
    assert (nodes["decode-0"].kv_blocks_used, nodes["decode-0"].kv_blocks_total) == (4, 64)
    assert list(nodes["decode-1"].tiers) == [] and nodes["decode-1"].state == "up"
