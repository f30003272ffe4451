"""Elastic roles on the live conductor: the role planner, fed what was dispatched, moves a
node through the registry's drain-and-switch path (fake records, no processes)."""
from __future__ import annotations

import asyncio

from conductor.decision import Decision, DecodeChoice, LoadBasis, PrefillChoice
from conductor.elastic import ElasticRoles
from conductor.live import cpu_default_costs
from conductor.modes import AdmissionMode, PolicyName
from conductor.registry import NodeRecord, NodeRegistry
from conductor.request import NodeId, RequestInfo
from conductor.role_planner import PlannerSettings, Role, RolePlanner
from conductor.settings import ConductorSettings, SettingsValues
from proto.halfmoon.v1 import node_pb2

LAYOUT = node_pb2.KVLayout(block_size=16, block_bytes=16, total_blocks=4096)


def decision(rid: str, service_s: float) -> Decision:
    pc = PrefillChoice(NodeId("p0"), 0, None, 0, 0, 0.0, 0.0, 0.0, service_s, 0.01)
    dc = DecodeChoice(NodeId("d0"), 0.02, 0.01, 0.0, LoadBasis.COMMITTED)
    return Decision(rid, PolicyName.KV_CENTRIC, AdmissionMode.NONE, 0.0, pc, dc)


def test_prefill_heavy_load_moves_the_least_loaded_decode_node_to_prefill():
    reg = NodeRegistry(block_size=16)
    for node_id, role in (("p0", "prefill"), ("d0", "decode"), ("d1", "decode"), ("d2", "decode")):
        reg.add(NodeRecord(node_id, role, "fake", LAYOUT, "", None, None, None), follow_events=False)
    reg.state.heartbeat_decode(NodeId("d0"), running=3, waiting=0, tokens_in_flight=900, used_tokens=900, now_s=0.0)
    now = [0.0]
    planner = RolePlanner(PlannerSettings(interval_s=1.0, lookahead_s=0.0, patience=1, cooldown_s=0.0, deadband=0.5))
    settings = ConductorSettings(SettingsValues(ttft_slo_s=10.0, tbt_slo_s=0.5))
    elastic = ElasticRoles(reg, cpu_default_costs(), settings, planner, clock=lambda: now[0])

    async def run():
        assert elastic.tick() is None  # the first observation only starts the clock
        for i in range(20):  # 20 prompts of 2 s of prefill each, 1 output token: all prefill work
            elastic.dispatched(RequestInfo(f"r{i}", 1000, (), 1), decision(f"r{i}", 2.0))
        elastic.observed(ttft_s=30.0, tbt_s=0.05)  # TTFT misses its SLO, TBT meets its own
        now[0] = 1.0
        move = elastic.tick()
        await asyncio.sleep(0.1)
        assert move is not None and move.to is Role.PREFILL and move.count == 2  # 3 nodes' worth of prefill
        moved = {node for _, node, to, _ in elastic.moves}
        assert {to for _, _, to, _ in elastic.moves} == {Role.PREFILL}
        assert moved == {"d1", "d2"}  # d0 is busy: the idle ones go
        for node in moved:
            rec = reg.nodes[node]
            assert rec.draining and rec.switch_to == "prefill" and not reg.state.decode_view(NodeId(node)).healthy
            assert reg.take_switch(node) == "prefill"  # nothing on them: the next heartbeat tells them
        obs = elastic.observation(2.0)
        assert (obs.prefill_nodes, obs.decode_nodes, obs.to_prefill, obs.to_decode) == (1, 1, 2, 0)

    asyncio.run(run())
