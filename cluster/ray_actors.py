"""The Ray actors a halfmoon cluster is made of: one conductor and one per node.

Each actor runs the very coroutine the process launcher runs (`serve_conductor`,
`serve_node`) on its own asyncio loop in a background thread of the actor's worker process
(`ServerThread`); the actor's methods, on Ray's task thread, report where it runs and
listens, surface a server that died, and stop it.

Stopping, three ways, none leaking:
- `stop()` (what `halfmoon down` and the launcher call first): sets the server's stop event
  and joins the thread, so the coroutine's `finally` closes the gRPC and HTTP servers, the
  engine worker and the transfer engine (which unlinks its shared memory);
- SIGTERM to the worker process: Ray turns it into `SystemExit`, and the atexit hook
  registered here stops the server the same way before the process exits;
- `ray.kill`: the process dies at once; its sockets die with it, and shared-memory segments
  of dead processes are swept by the next transfer engine started on that host.
"""
from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import os
import threading
from dataclasses import dataclass, replace
from typing import Any, Callable, Coroutine

from cluster.ray_connect import is_loopback
from cluster.specs import WILDCARD_HOSTS, NodePlan, free_port
from conductor.server import ConductorSpec

log = logging.getLogger("halfmoon.ray")

Serve = Callable[[asyncio.Event, asyncio.Future], Coroutine[Any, Any, None]]


class ServerExited(RuntimeError):
    """The server's coroutine ended (or failed) before it was asked to stop."""


class ServerThread:
    """Runs `serve(stop, started)` on a fresh event loop in a daemon thread.

    `serve` must return once `stop` is set; it may resolve `started` with what callers
    should learn (the conductor resolves it with its gRPC port)."""

    def __init__(self, name: str, serve: Serve) -> None:
        self.name = name
        self._serve = serve
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._stop_requested = False
        self._started: concurrent.futures.Future = concurrent.futures.Future()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    def start(self) -> ServerThread:
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # noqa: BLE001 (kept and reported by `check`)
            self.error = exc
            log.exception("%s failed", self.name)
        finally:
            if not self._started.done():
                self._started.set_exception(ServerExited(f"{self.name} exited before it was ready: {self._why()}"))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        started = loop.create_future()
        started.add_done_callback(self._publish_started)
        with self._lock:
            if self._stop_requested:
                return
            self._loop, self._stop = loop, stop
        await self._serve(stop, started)

    def _publish_started(self, fut: asyncio.Future) -> None:
        if not fut.cancelled() and fut.exception() is None and not self._started.done():
            self._started.set_result(fut.result())

    def _why(self) -> str:
        return f"{type(self.error).__name__}: {self.error}" if self.error is not None else "it returned"

    def wait_started(self, timeout_s: float) -> Any:
        """What `serve` resolved `started` with; raises `ServerExited` if it ended first."""
        try:
            return self._started.result(timeout_s)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"{self.name} not ready after {timeout_s:.0f}s") from None

    def check(self) -> None:
        """Raise `ServerExited` if the server ended without being asked to."""
        if not self._thread.is_alive() and not self._stop_requested:
            raise ServerExited(f"{self.name} exited: {self._why()}")

    def stop(self, timeout_s: float = 15.0) -> bool:
        """Ask the server to stop and wait for it; True once the thread has ended."""
        with self._lock:
            self._stop_requested = True
            loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:  # the loop already closed: the server is done
                pass
        if self._thread.ident is not None:
            self._thread.join(timeout_s)
        return not self._thread.is_alive()


@dataclass(frozen=True, slots=True)
class Placement:
    """Where an actor runs, as Ray sees it."""

    ray_node_id: str
    node_ip: str
    pid: int


@dataclass(frozen=True, slots=True)
class ConductorInfo:
    placement: Placement
    grpc_address: str  # host:port clients dial
    control_address: str  # host:port nodes register at
    http_url: str | None  # the OpenAI-compatible API and /metrics


@dataclass(frozen=True, slots=True)
class NodeInfo:
    placement: Placement
    node_id: str
    role: str
    host: str  # the address its servers bind and advertise


def _placement() -> Placement:
    import ray

    return Placement(ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(), os.getpid())


def _setup_logging(name: str) -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(message)s")


class _ServerActor:
    """What both actors share: one `ServerThread`, stopped on `stop()` and at exit."""

    def __init__(self, server: ServerThread) -> None:
        self._server = server.start()
        atexit.register(self._server.stop)

    def check(self) -> None:
        """Raise if the server died (Ray re-raises it at the caller)."""
        self._server.check()

    def stop(self, timeout_s: float = 15.0) -> bool:
        return self._server.stop(timeout_s)


def _on(host: str, node_ip: str) -> str:
    """`host`, with a wildcard bind narrowed to `node_ip`."""
    return node_ip if host in WILDCARD_HOSTS else host


class ConductorActor(_ServerActor):
    """`serve_conductor(spec)` inside a Ray actor. A `grpc_port` or `control_port` of 0
    listens on a free port (ask `info()`); an `http_port` of 0 is settled to a free port here first."""

    def __init__(self, spec: ConductorSpec) -> None:
        from conductor.server import serve_conductor

        _setup_logging("conductor")
        self._place = _placement()
        if is_loopback(self._place.node_ip):  # a loopback-only Ray node: so is every listener here
            spec = replace(spec, host=_on(spec.host, self._place.node_ip),
                           control_host=_on(spec.control_host, self._place.node_ip))
        if spec.http_port == 0:
            spec = replace(spec, http_port=free_port(spec.host))
        self.spec = spec
        super().__init__(ServerThread("conductor", lambda stop, started: serve_conductor(spec, stop, started)))

    def _advertised(self, host: str) -> str:
        return _on(host, self._place.node_ip)

    def info(self, timeout_s: float = 120.0) -> ConductorInfo:
        """Once the gRPC servers listen: where to reach them."""
        ports = self._server.wait_started(timeout_s)
        host = self._advertised(self.spec.host)
        http = f"http://{host}:{self.spec.http_port}" if self.spec.http_port is not None else None
        control = f"{self._advertised(self.spec.control_host)}:{ports.control_port}"
        return ConductorInfo(self._place, f"{host}:{ports.grpc_port}", control, http)


class NodeActor(_ServerActor):
    """`serve_node(plan.resolve(...))` inside a Ray actor; the node registers itself with
    the conductor named in its spec, so readiness is read from the conductor."""

    def __init__(self, plan: NodePlan) -> None:
        from cluster.node_main import serve_node

        _setup_logging(plan.node_id)
        self._place = _placement()
        self.spec = plan.resolve(self._place.node_ip)
        spec = self.spec
        super().__init__(ServerThread(spec.node_id, lambda stop, started: serve_node(spec, stop)))

    def info(self) -> NodeInfo:
        return NodeInfo(self._place, self.spec.node_id, self.spec.role, self.spec.host)


@dataclass(frozen=True, slots=True)
class StoreInfo:
    """The Mooncake master of the cluster KV tier, as its actor started it: `address` and
    `metadata_url` for the nodes, or `reason` why there is none (the tier is then off)."""

    placement: Placement
    address: str | None
    metadata_url: str | None
    reason: str = ""


class StoreMasterActor:
    """`mooncake_master` (and the store keeper that mounts `keeper_gb` GiB into it) as child
    processes of a Ray actor beside the conductor, listening on its Ray node's address (free
    ports). Where the wheel cannot load or the master does not start, `info()` says why and
    nothing runs. `stop()` (and SIGTERM, through atexit) stops both processes."""

    def __init__(self, keeper_gb: float) -> None:
        from engine.tiers.mooncake_store import MooncakeMaster, StoreUnavailable, store_unavailable_reason

        _setup_logging("store-master")
        self._place = _placement()
        self.master = None
        self.reason = store_unavailable_reason() or ""
        if self.reason:
            return
        host = self._place.node_ip
        master = MooncakeMaster(free_port(host), free_port(host), free_port(host), host=host, keeper_gb=keeper_gb)
        try:
            self.master = master.start()
        except StoreUnavailable as exc:
            self.reason = str(exc)
            return
        atexit.register(self.stop)

    def info(self) -> StoreInfo:
        m = self.master
        return StoreInfo(self._place, m.address if m else None, m.metadata_url if m else None, self.reason)

    def check(self) -> None:
        """Raise if the master (or its keeper) exited (Ray re-raises it at the caller)."""
        m = self.master
        if m is None:
            return
        for what, proc in (("mooncake_master", m.proc), ("the store keeper", m.keeper)):
            if proc is not None and proc.poll() is not None:
                raise ServerExited(f"{what} exited with code {proc.returncode}")

    def stop(self, timeout_s: float = 15.0) -> bool:
        if self.master is not None:
            self.master.stop(min(timeout_s, 5.0))
            self.master = None
        return True
