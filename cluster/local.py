"""A whole cluster on this machine: a conductor and prefill/decode nodes as separate
processes on loopback (spawned, never forked). Used by `halfmoon serve` and the tests."""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field, replace

import grpc

from cluster.node_main import NodeSpec, run_node
from cluster.specs import free_port, local_address, new_secret
from conductor.auth import keyed_channel
from conductor.server import ConductorSpec, run_conductor

log = logging.getLogger("halfmoon.local")


def _raise_exit(signum, frame) -> None:
    raise SystemExit(128 + signum)


def exit_on_sigterm() -> None:
    """Make SIGTERM end this process as Ctrl-C would, by raising SystemExit in the main thread,
    so that the `with` / finally blocks around a cluster stop the processes it started. Left
    to its default, SIGTERM kills the parent at once and its spawned children (conductor,
    nodes, a Mooncake master) keep running, orphaned -- seen when a benchmark was stopped.
    Only where SIGTERM still has its default action and only from the main thread (a program
    with its own handler, like `halfmoon serve`, keeps it)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_exit)


@dataclass
class LocalCluster:
    conductor: ConductorSpec
    nodes: list[NodeSpec]
    procs: dict[str, mp.Process] = field(default_factory=dict)
    conductor_restarts: list[float] = field(default_factory=list)  # when `revive_conductor` restarted it

    @classmethod
    def build(cls, num_prefill: int = 1, num_decode: int = 1, *, conductor: ConductorSpec | None = None,
              node: NodeSpec | None = None, colocated: int = 0) -> "LocalCluster":
        """`num_prefill` + `num_decode` disaggregated nodes, or `colocated` colocated ones, all
        pointed at the conductor's control port (a free one if it is 0) with its control
        secret (a new one if it has none)."""
        c = conductor or ConductorSpec()
        if c.control_secret is None:
            c = replace(c, control_secret=new_secret())
        if c.control_port == 0:
            c = replace(c, control_port=free_port(c.control_host))
        base = node or NodeSpec(role="prefill", node_id="", conductor="")
        base = replace(base, conductor=local_address(c.control_host, c.control_port), control_secret=c.control_secret,
                       model=c.model, block_size=c.block_size, max_model_len=c.max_model_len)
        nodes = [replace(base, role="prefill", node_id=f"prefill-{i}") for i in range(num_prefill)]
        nodes += [replace(base, role="decode", node_id=f"decode-{i}") for i in range(num_decode)]
        nodes += [replace(base, role="colocated", node_id=f"colocated-{i}") for i in range(colocated)]
        return cls(c, nodes)

    @property
    def address(self) -> str:
        return f"{self.conductor.host}:{self.conductor.grpc_port}"

    def start(self, timeout_s: float = 180.0) -> "LocalCluster":
        exit_on_sigterm()
        self.start_conductor()
        try:
            # The conductor's ports were picked free before it started; a node started at the
            # same time could be given one of them by the kernel for its own listener (seen
            # once: a prefill node's transfer engine on the control port, the conductor then
            # failing to bind). Nodes start once the conductor holds its ports.
            self._wait_listening(min(timeout_s, 120.0))
            for spec in self.nodes:
                self.start_node(spec)
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_listening(self, timeout_s: float) -> None:
        """Until the conductor accepts connections on its client and control ports."""
        c = self.conductor
        ports = [(h, p) for h, p in ((c.host, c.grpc_port), (c.control_host, c.control_port)) if p]  # 0: not known here
        deadline = time.monotonic() + timeout_s
        while ports:
            host, port = ports[0]
            try:
                socket.create_connection((host, port), timeout=1.0).close()
                ports.pop(0)
                continue
            except OSError:
                pass
            proc = self.procs["conductor"]
            if not proc.is_alive():
                raise RuntimeError(f"conductor exited with code {proc.exitcode} during start-up")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the conductor did not listen on {host}:{port} within {timeout_s:.0f}s")
            time.sleep(0.05)

    def start_conductor(self) -> None:
        """Start the conductor process (again, after `kill("conductor")`: same ports and secret,
        so the running nodes find it and register again by themselves)."""
        p = mp.get_context("spawn").Process(target=run_conductor, args=(self.conductor,), name="conductor",
                                            daemon=True)
        p.start()
        self.procs["conductor"] = p

    def revive_conductor(self, max_restarts: int = 3, window_s: float = 300.0) -> str | None:
        """If the conductor process died, start it again and return None (the nodes register
        again by themselves); after `max_restarts` restarts within `window_s`, leave it down
        and say why."""
        proc = self.procs["conductor"]
        if proc.is_alive():
            return None
        now = time.monotonic()
        self.conductor_restarts = [t for t in self.conductor_restarts if now - t < window_s]
        if len(self.conductor_restarts) >= max_restarts:
            return (f"the conductor exited with code {proc.exitcode} after {len(self.conductor_restarts)} "
                    f"restarts in {window_s:.0f}s")
        log.warning("the conductor exited with code %s; restarting it (the nodes register again by themselves)",
                    proc.exitcode)
        self.conductor_restarts.append(now)
        self.start_conductor()
        return None

    def start_node(self, spec: NodeSpec) -> None:
        p = mp.get_context("spawn").Process(target=run_node, args=(spec,), name=spec.node_id, daemon=True)
        p.start()
        self.procs[spec.node_id] = p

    def wait_ready(self, timeout_s: float, node_ids: list[str] | None = None) -> None:
        """Until every node (or `node_ids`) is registered and up at the conductor and, when
        those nodes make a prefill + decode pair, the conductor reports itself ready (gRPC
        health of the Generation service SERVING)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from conductor.readiness import GENERATION_SERVICE
        from proto.halfmoon.v1 import admin_pb2, admin_pb2_grpc

        want = set(node_ids or [n.node_id for n in self.nodes])
        roles = {n.role for n in self.nodes if n.node_id in want}
        pair = "colocated" in roles or {"prefill", "decode"} <= roles
        deadline = time.monotonic() + timeout_s
        with keyed_channel(self.address, self.conductor.api_key) as ch:
            stub = admin_pb2_grpc.AdminStub(ch)
            health = health_pb2_grpc.HealthStub(ch)
            while True:
                for name, p in self.procs.items():
                    if not p.is_alive() and (name == "conductor" or name in want):
                        raise RuntimeError(f"{name} exited with code {p.exitcode} during start-up")
                try:
                    st = stub.Status(admin_pb2.StatusRequest(), timeout=2)
                    if want <= {n.node_id for n in st.nodes if n.state == "up"} and (not pair or health.Check(
                            health_pb2.HealthCheckRequest(service=GENERATION_SERVICE), timeout=2).status
                            == health_pb2.HealthCheckResponse.SERVING):
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"cluster not ready after {timeout_s:.0f}s (waiting for {sorted(want)})")
                time.sleep(0.3)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        p = self.procs[name]
        if p.pid is not None and p.is_alive():
            os.kill(p.pid, sig)
        p.join(10)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM every process we started (by PID), then SIGKILL what is left."""
        for p in self.procs.values():
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for p in self.procs.values():
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGKILL)
                p.join(5)

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
