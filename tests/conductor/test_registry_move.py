"""Moving a node between the pools, as the registry does it (fake records, no processes):
refusals, the drain (no new request goes there, the switch waits for the last one on it),
the switch handed out once in a heartbeat answer, and a timeout that puts it back."""
from __future__ import annotations

import asyncio

import pytest

from conductor.decision import Decision, DecodeChoice, LoadBasis, PrefillChoice
from conductor.modes import AdmissionMode, PolicyName
from conductor.registry import MoveRefused, NodeRecord, NodeRegistry
from conductor.request import NodeId, RequestInfo
from proto.halfmoon.v1 import node_pb2

LAYOUT = node_pb2.KVLayout(block_size=16, block_bytes=16, total_blocks=64)


def registry() -> NodeRegistry:
    reg = NodeRegistry(block_size=16)
    for node_id, role in (("p0", "prefill"), ("d0", "decode"), ("d1", "decode")):
        reg.add(NodeRecord(node_id, role, "fake", LAYOUT, "", None, None, None), follow_events=False)
    return reg


def place(reg: NodeRegistry, rid: str, decode: str) -> None:
    pc = PrefillChoice(NodeId("p0"), 0, None, 0, 0, 0.0, 0.0, 0.0, 0.1, 0.01)
    dc = DecodeChoice(NodeId(decode), 0.02, 0.01, 0.0, LoadBasis.COMMITTED)
    reg.state.dispatched(RequestInfo(rid, 32, ()), Decision(rid, PolicyName.KV_CENTRIC, AdmissionMode.NONE, 0.0,
                                                            pc, dc), 0.0)


@pytest.mark.parametrize(("node", "role", "error", "message"), [
    ("p0", "decode", MoveRefused, "last prefill node"),
    ("d0", "decode", MoveRefused, "cannot be moved to decode"),
    ("d0", "colocated", ValueError, "must be 'prefill' or 'decode'"),
    ("d9", "prefill", LookupError, "no node 'd9'"),
])
def test_a_move_that_cannot_be_done_is_refused_and_changes_nothing(node, role, error, message):
    reg = registry()
    with pytest.raises(error, match=message):
        asyncio.run(reg.move(node, role, timeout_s=1.0))
    assert all(v.healthy for v in reg.view.prefill + reg.view.decode)
    assert not any(r.draining or r.switch_to for r in reg.nodes.values())


def test_the_node_drains_then_is_told_once_and_the_move_ends_when_it_registers_in_its_new_role():
    reg = registry()
    place(reg, "r1", "d1")

    async def run():
        move = asyncio.create_task(reg.move("d1", "prefill", timeout_s=10.0))
        await asyncio.sleep(0.2)
        assert not reg.state.decode_view(NodeId("d1")).healthy  # out of rotation at once
        assert reg.take_switch("d1") == ""  # r1 still counts on it: not yet
        reg.state.finished("r1", 1.0)
        await asyncio.sleep(0.2)
        assert reg.take_switch("d1") == "prefill" and reg.take_switch("d1") == ""  # once
        assert not move.done()
        await reg._drop(reg.nodes["d1"])  # it restarts in its new role and registers again
        reg.add(NodeRecord("d1", "prefill", "fake", LAYOUT, "", None, None, None), follow_events=False)
        return await asyncio.wait_for(move, 5.0)

    old, drained_s, switched_s = asyncio.run(run())
    assert old == "decode" and 0.1 < drained_s < 5.0 and switched_s < 5.0
    assert [p.node_id for p in reg.view.prefill] == ["p0", "d1"] and [d.node_id for d in reg.view.decode] == ["d0"]


def test_a_node_that_does_not_drain_in_time_goes_back_into_rotation_in_its_old_role():
    reg = registry()
    place(reg, "r1", "d1")
    with pytest.raises(TimeoutError, match="still has 1 requests"):
        asyncio.run(reg.move("d1", "prefill", timeout_s=0.3))
    rec = reg.nodes["d1"]
    assert rec.role == "decode" and not rec.draining and reg.state.decode_view(NodeId("d1")).healthy
    assert reg.take_switch("d1") == ""
