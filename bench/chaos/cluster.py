"""A local cluster the chaos suite can hurt: `cluster.local.LocalCluster` (one spawned
process per server, loopback, both front doors on free ports) plus what a scenario needs
around it: signals by PID, respawning a node or the conductor in place, extra environment
for the node processes (fault injection), node /metrics addresses for the block audit,
and `RotationWatch`, which samples the conductor's view of the nodes to time detection
and recovery."""
from __future__ import annotations

import asyncio
import os
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Iterator

import grpc

from proto.halfmoon.v1 import admin_pb2, admin_pb2_grpc

CONDUCTOR = "conductor"
# generous SLOs: the steady load is never refused by admission, so every failure is the fault's
NO_REJECTIONS = {"ttft_slo_s": 600.0, "tbt_slo_s": 60.0}


@dataclass(frozen=True, slots=True)
class ClusterPlan:
    prefill: int = 2
    decode: int = 2
    model: str = "smollm2-135m-instruct"
    num_blocks: int = 512
    threads: int = 1  # torch threads per node
    max_num_batched_tokens: int = 512  # per engine step (a prefill chunk)
    settings: dict = field(default_factory=lambda: dict(NO_REJECTIONS))
    env: dict = field(default_factory=dict)  # extra environment of the node processes
    start_timeout_s: float = 300.0


class ChaosCluster:
    def __init__(self, plan: ClusterPlan) -> None:
        from cluster.local import LocalCluster
        from cluster.node_main import NodeSpec
        from cluster.specs import free_port
        from conductor.server import ConductorSpec

        self.plan = plan
        spec = ConductorSpec(grpc_port=free_port(), http_port=free_port(), model=plan.model, settings=plan.settings)
        node = NodeSpec(role="prefill", node_id="", conductor="", num_blocks=plan.num_blocks, num_threads=plan.threads,
                        max_num_batched_tokens=plan.max_num_batched_tokens)
        self.local = LocalCluster.build(plan.prefill, plan.decode, conductor=spec, node=node)
        self.grpc_address = self.local.address
        self.http_address = f"{spec.host}:{spec.http_port}"
        self.metrics: dict[str, str] = {}  # node id -> its /metrics host:port
        self._channel = grpc.insecure_channel(self.grpc_address)
        self._admin = admin_pb2_grpc.AdminStub(self._channel)

    @property
    def node_ids(self) -> list[str]:
        return [n.node_id for n in self.local.nodes]

    def start(self) -> ChaosCluster:
        try:
            with self._env():
                self.local.start(self.plan.start_timeout_s)  # stops what it started if it fails
            self.refresh_metrics()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self._channel.close()
        self.local.stop()

    def __enter__(self) -> ChaosCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @contextmanager
    def _env(self) -> Iterator[None]:
        """Spawned children copy os.environ when they start: set the plan's extras around it."""
        saved = {k: os.environ.get(k) for k in self.plan.env}
        os.environ.update(self.plan.env)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def status(self, timeout_s: float = 2.0) -> admin_pb2.StatusResponse:
        return self._admin.Status(admin_pb2.StatusRequest(), timeout=timeout_s)

    def set_settings(self, values: dict[str, str]) -> None:
        self._admin.SetSettings(admin_pb2.SetSettingsRequest(values=values, actor="chaos"), timeout=5)

    def refresh_metrics(self) -> None:
        for n in self.status(timeout_s=5).nodes:
            if n.metrics_address:
                self.metrics[n.node_id] = n.metrics_address

    def alive(self, name: str) -> bool:
        return self.local.procs[name].is_alive()

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.local.procs.items() if p.pid is not None and p.is_alive()}

    def signal(self, name: str, sig: int) -> None:
        p = self.local.procs[name]
        if p.pid is None or not p.is_alive():
            raise RuntimeError(f"{name} is not running")
        os.kill(p.pid, sig)
        if sig == signal.SIGKILL:
            p.join(10)

    def respawn(self, name: str) -> None:
        """Start a fresh process for a dead node (same id) or the conductor (same ports)."""
        if self.local.procs[name].is_alive():
            raise RuntimeError(f"{name} is still running")
        with self._env():
            if name == CONDUCTOR:
                self.local.start_conductor()
            else:
                spec = next(n for n in self.local.nodes if n.node_id == name)
                self.local.start_node(replace(spec))


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # monotonic
    states: dict[str, str] | None  # node id -> "up" | "down"; None: the conductor did not answer


class RotationWatch:
    """Samples Admin Status every `every_s`; answers when a node left or rejoined rotation."""

    def __init__(self, address: str, every_s: float = 0.1, timeout_s: float = 1.0) -> None:
        self.address = address
        self.every_s = every_s
        self.timeout_s = timeout_s
        self.samples: list[Sample] = []
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> RotationWatch:
        self._task = asyncio.ensure_future(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        async with grpc.aio.insecure_channel(self.address) as ch:
            admin = admin_pb2_grpc.AdminStub(ch)
            while True:
                t = time.monotonic()
                try:
                    st = await admin.Status(admin_pb2.StatusRequest(), timeout=self.timeout_s)
                    self.samples.append(Sample(t, {n.node_id: n.state for n in st.nodes}))
                except grpc.aio.AioRpcError:
                    self.samples.append(Sample(t, None))
                await asyncio.sleep(max(0.0, t + self.every_s - time.monotonic()))

    def first(self, after: float, pred) -> float | None:
        """The time of the first sample taken at or after `after` for which pred(states) holds."""
        return next((s.at for s in self.samples if s.at >= after and pred(s.states)), None)

    async def wait(self, after: float, pred, timeout_s: float) -> float | None:
        """Seconds from `after` until a sample satisfies `pred`; None if none did in time."""
        deadline = time.monotonic() + timeout_s
        while True:
            at = self.first(after, pred)
            if at is not None:
                return at - after
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(self.every_s / 2)


def out_of_rotation(node: str):
    """A conductor that answers and does not list `node` as up."""
    return lambda states: states is not None and states.get(node) != "up"


def in_rotation(*nodes: str):
    return lambda states: states is not None and all(states.get(n) == "up" for n in nodes)
