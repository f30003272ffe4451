"""Elastic roles on the live cluster: the role planner (`conductor.role_planner`, the same
object `bench.sim.elastic` drives) observes what the live conductor dispatched and measured,
and its moves go through the path `halfmoon admin move` takes (`NodeRegistry.move`: drain,
switch the node's role in its process, rejoin). Off unless the conductor is started with an
elastic interval.

Each tick reports, as the simulator does: the prefill work dispatched since the last one
(predicted service, node-seconds), the decode work (output tokens over what one decode node
generates per second within the TBT SLO), the pools (nodes serving, nodes on their way to
each pool), and the p90 TTFT / TBT measured over the interval against their SLOs.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time

import numpy as np

from conductor.cost_model import CostModel
from conductor.decision import Decision
from conductor.registry import NodeRegistry
from conductor.request import NodeId, RequestInfo
from conductor.role_planner import PoolObservation, Role, RoleMove, RolePlanner, pick_drain
from conductor.settings import ConductorSettings

log = logging.getLogger("halfmoon.conductor.elastic")


class ElasticRoles:
    def __init__(self, registry: NodeRegistry, costs: CostModel, settings: ConductorSettings, planner: RolePlanner,
                 *, clock=time.monotonic) -> None:
        self.registry = registry
        self.costs = costs
        self.settings = settings
        self.planner = planner
        self._clock = clock
        self._prefill_work = self._decode_work = 0.0
        self._ttfts: list[float] = []
        self._tbts: list[float] = []
        self.moves: list[tuple[float, str, Role, str]] = []  # (when, node, to, why)
        self._moving: set[asyncio.Task] = set()

    # -- what the live conductor reports ----------------------------------------------------------
    def dispatched(self, info: RequestInfo, decision: Decision) -> None:
        if decision.prefill is not None:
            self._prefill_work += decision.prefill.service_s
        out = info.expected_output_tokens or self.settings.values.typical_output_tokens
        kv = max((d.kv_capacity_tokens for d in self.registry.view.decode), default=0)
        rate = self.costs.decode_tokens_per_s(info.input_tokens + out / 2, self.settings.values.tbt_slo_s, kv)
        if rate > 0:
            self._decode_work += out / rate

    def observed(self, ttft_s: float | None = None, tbt_s: float | None = None) -> None:
        if ttft_s is not None:
            self._ttfts.append(ttft_s)
        if tbt_s is not None:
            self._tbts.append(tbt_s)

    # -- the planner's tick -------------------------------------------------------------------------
    def observation(self, now_s: float) -> PoolObservation:
        serving = {"prefill": 0, "decode": 0}
        moving = {"prefill": 0, "decode": 0}
        for rec in self.registry.nodes.values():
            if rec.switch_to:
                moving[rec.switch_to] += 1
            elif rec.up and rec.role in serving:
                serving[rec.role] += 1
        s = self.settings.values
        obs = PoolObservation(
            now_s=now_s, prefill_nodes=serving["prefill"], decode_nodes=serving["decode"],
            to_prefill=moving["prefill"], to_decode=moving["decode"],
            prefill_work_s=self._prefill_work, decode_work_s=self._decode_work,
            ttft_ratio=float(np.percentile(self._ttfts, 90)) / s.ttft_slo_s if self._ttfts else math.nan,
            tbt_ratio=float(np.percentile(self._tbts, 90)) / s.tbt_slo_s if self._tbts else math.nan)
        self._prefill_work = self._decode_work = 0.0
        self._ttfts, self._tbts = [], []
        return obs

    def tick(self) -> RoleMove | None:
        """Observe, and start the moves the planner asks for (each one a `registry.move`)."""
        now = self._clock()
        move = self.planner.observe(self.observation(now))
        if move is None:
            return None
        source = Role.DECODE if move.to is Role.PREFILL else Role.PREFILL
        exclude = {NodeId(r.node_id) for r in self.registry.nodes.values() if r.switch_to}
        for _ in range(move.count):
            node = pick_drain(self.registry.view, source, now, frozenset(exclude))
            if node is None:
                break
            exclude.add(node)
            self.moves.append((now, node, move.to, move.reason))
            log.info("elastic: moving %s to %s: %s", node, move.to.value, move.reason)
            task = asyncio.get_running_loop().create_task(self._move(node, move.to))
            self._moving.add(task)
            task.add_done_callback(self._moving.discard)
        return move

    async def _move(self, node: str, to: Role) -> None:
        try:
            await self.registry.move(node, to.value)
        except Exception as e:  # noqa: BLE001 (a move that cannot be done now is logged; the next tick replans)
            log.warning("elastic: moving %s to %s failed: %s", node, to.value, e)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.planner.settings.interval_s)
            self.tick()
