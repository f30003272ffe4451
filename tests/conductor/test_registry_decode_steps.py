"""Decode nodes' heartbeats carry their decode-step totals; the registry hands the window
between two of them to the TBT calibration (`Scheduler.observe_decode_steps`)."""
from __future__ import annotations

import asyncio

import pytest

from conductor.cost_model import CostModel, DecodeModel, PrefillModel, TransferModel
from conductor.predictions import DecodeSteps, Quantity
from conductor.registry import NodeRegistry
from conductor.scheduler import Scheduler
from conductor.settings import ConductorSettings, SettingsValues
from proto.halfmoon.v1 import node_pb2

COSTS = CostModel(
    prefill=PrefillModel(c_nn=0.0, c_np=0.0, c_n=0.001, c_p=0.0, c_1=0.0),
    decode=DecodeModel(s_1=0.010, s_b=0.001, s_t=1e-6),
    transfer=TransferModel(kv_bytes_per_token=1000, network_bytes_per_s=1e7),
)


def _decode_node(node_id: str) -> node_pb2.RegisterRequest:
    return node_pb2.RegisterRequest(
        node_id=node_id, role=node_pb2.ROLE_DECODE, address="127.0.0.1:9",
        layout=node_pb2.KVLayout(block_size=16, block_bytes=4096, total_blocks=64, model="fake"))


def _beat(registry: NodeRegistry, steps: int, seconds: float, rows: int, tokens: int) -> bool:
    load = node_pb2.NodeLoad(free_blocks=64, decode_steps=steps, decode_step_seconds=seconds,
                             decode_step_rows=rows, decode_step_tokens=tokens)
    return registry.heartbeat(node_pb2.HeartbeatRequest(node_id="d0", load=load))


def test_the_steps_between_two_heartbeats_calibrate_tbt_on_the_cost_models_step_for_them():
    async def scenario() -> tuple[list[DecodeSteps], Scheduler]:
        registry = NodeRegistry(16)
        scheduler = Scheduler(ConductorSettings(SettingsValues()), COSTS)
        seen: list[DecodeSteps] = []

        def observe(window: DecodeSteps) -> None:
            seen.append(window)
            scheduler.observe_decode_steps(window)

        registry.on_decode_steps = observe
        await registry.register(_decode_node("d0"))
        try:
            _beat(registry, 0, 0.0, 0, 0)  # where the window starts
            # 100 steps of batch 4 at 1,000 context tokens each: modelled 10 + 4 + 4 = 18 ms a
            # step; they took 27 ms (1.5x), heartbeat after heartbeat
            for i in range(1, 31):
                _beat(registry, 100 * i, 2.7 * i, 400 * i, 400_000 * i)
            _beat(registry, 3000, 81.0, 12_000, 12_000_000)  # no step since: nothing to learn
            return seen, scheduler
        finally:
            await registry.close()

    seen, scheduler = asyncio.run(scenario())
    assert len(seen) == 30 and seen[0] == DecodeSteps(100, pytest.approx(2.7), 400, 400_000)
    assert scheduler.calibration.samples(Quantity.TBT) == 30
    assert scheduler.calibration.factor(Quantity.TBT) == pytest.approx(1.5)


def test_the_live_conductor_calibrates_on_decode_heartbeats_and_exports_the_factor(real_model_dir):
    from prometheus_client import CollectorRegistry

    from conductor.live import LiveConductor, LiveConfig
    from conductor.metrics import ConductorMetrics
    from engine.tokenizer import Tokenizer

    async def scenario() -> tuple[Scheduler, CollectorRegistry]:
        registry = NodeRegistry(16)
        scheduler = Scheduler(ConductorSettings(SettingsValues()), COSTS)
        prom = CollectorRegistry()
        LiveConductor(LiveConfig("m", 2048, 16), Tokenizer(real_model_dir), scheduler, registry,
                      metrics=ConductorMetrics(prom))
        await registry.register(_decode_node("d0"))
        try:
            for i in range(25):  # modelled 18 ms a step, measured 14.4 ms (0.8x)
                _beat(registry, 100 * i, 1.44 * i, 400 * i, 400_000 * i)
            return scheduler, prom
        finally:
            await registry.close()

    scheduler, prom = asyncio.run(scenario())
    assert scheduler.calibration.factor(Quantity.TBT) == pytest.approx(0.8)
    assert prom.get_sample_value("halfmoon:prediction_calibration_factor", {"kind": "tbt"}) == pytest.approx(0.8)
