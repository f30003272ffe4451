"""Deploying a halfmoon cluster onto a Ray cluster this process is connected to.

Order: the conductor actor first (placed by `conductor.num_cpus/num_gpus/resources`); its
gRPC address is read back from the actor, since it may listen on port 0 or on a machine
chosen by Ray. With the cluster KV tier on and no master configured (`halfmoon up`; the
embedded launcher starts its own first), the Mooncake master actor `halfmoon-store-master`
next, on the conductor's Ray node, and the nodes are pointed at it. Then one actor per node, placed by its group's resources (e.g.
`{"prefill": 1}`), each told the conductor's address. The deployment is ready once every
node has registered at the conductor (Admin `Status`) and the conductor reports itself
ready (gRPC health of `halfmoon.v1.Generation`). Actors are named
`halfmoon-conductor`, `halfmoon-prefill-0`, ... in the config's Ray namespace, so
`stop_namespace` (what `halfmoon down` runs) finds them from any driver.

A failed start stops whatever it started, and the error says what was missing: an actor
Ray could not place (with the resources it asked for and those free), or a server that
died (with its error).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.config import ClusterConfig, with_overrides
from conductor.metrics import ScrapeTarget, write_scrape_targets
from cluster.ray_actors import ConductorActor, ConductorInfo, NodeActor, NodeInfo, StoreInfo, StoreMasterActor
from cluster.specs import NodePlan, conductor_spec, node_plans, with_secrets
from conductor.auth import keyed_channel
from conductor.readiness import GENERATION_SERVICE
from proto.halfmoon.v1 import admin_pb2, admin_pb2_grpc

if TYPE_CHECKING:
    from ray.actor import ActorHandle

log = logging.getLogger("halfmoon.ray")

ACTOR_PREFIX = "halfmoon-"
CONDUCTOR_NAME = ACTOR_PREFIX + "conductor"
STORE_MASTER_NAME = ACTOR_PREFIX + "store-master"


def actor_name(node_id: str) -> str:
    return ACTOR_PREFIX + node_id


class DeployError(RuntimeError):
    """The cluster could not be brought up; what was started has been stopped."""


class AlreadyDeployed(DeployError):
    """A halfmoon conductor already runs in this Ray namespace."""


@dataclass(frozen=True, slots=True)
class Deployment:
    namespace: str
    conductor: ConductorInfo
    nodes: tuple[NodeInfo, ...]
    store: StoreInfo | None = None  # the cluster KV tier's master, when this launcher started one

    @property
    def grpc_address(self) -> str:
        return self.conductor.grpc_address

    @property
    def http_url(self) -> str | None:
        return self.conductor.http_url


def _describe_ask(options: dict) -> str:
    parts = [f"CPU {options['num_cpus']:g}"]
    if options["num_gpus"]:
        parts.append(f"GPU {options['num_gpus']:g}")
    parts += [f"{k} {v:g}" for k, v in options["resources"].items()]
    return ", ".join(parts)


def resource_shortfall(config: ClusterConfig, total: dict[str, float]) -> dict[str, tuple[float, float]]:
    """Resources the config asks for beyond what the cluster has in all: name -> (asked, there)."""
    return {name: (qty, total.get(name, 0.0)) for name, qty in config.required_resources().items()
            if qty > total.get(name, 0.0) + 1e-9}


class RayLauncher:
    """Start (and stop) one halfmoon cluster as Ray actors; `ray.init` must have been called."""

    def __init__(self, config: ClusterConfig, *, detached: bool = False) -> None:
        self.config = with_secrets(config)  # one control secret for the conductor and every node
        self.namespace = config.ray.namespace
        self.detached = detached
        self._actors: dict[str, ActorHandle] = {}  # in start order
        self._asks: dict[str, dict] = {}
        self._placed: set[str] = set()  # actors that answered: only these can stop gracefully
        self.store: StoreInfo | None = None

    def start(self, timeout_s: float = 300.0) -> Deployment:
        import ray

        if not ray.is_initialized():
            raise DeployError("not connected to Ray: call ray.init() first")
        self._refuse_if_running()
        short = resource_shortfall(self.config, ray.cluster_resources())
        if short:
            log.warning("the Ray cluster has less than the config asks for (%s); waiting for it to grow",
                        ", ".join(f"{n}: {a:g} asked, {t:g} there" for n, (a, t) in short.items()))
        deadline = time.monotonic() + timeout_s
        try:
            conductor = self._spawn(CONDUCTOR_NAME, ConductorActor, conductor_spec(self.config),
                                    dict(self.config.conductor.ray_options()))
            cinfo = self._get_info(CONDUCTOR_NAME, conductor.info.remote(timeout_s), deadline)
            log.info("conductor on Ray node %s at %s", cinfo.placement.ray_node_id[:8], cinfo.grpc_address)
            self._start_store(cinfo, deadline)
            plans = node_plans(self.config, cinfo.control_address)
            for plan in plans:
                self._spawn(actor_name(plan.node_id), NodeActor, plan, dict(plan.options))
            nodes = self._wait_registered(cinfo, plans, deadline)
        except BaseException:
            self.stop()
            raise
        deployment = Deployment(self.namespace, cinfo, nodes, self.store)
        if self.config.conductor.prometheus_targets_file is not None:
            self._write_targets(deployment)
        return deployment

    def _start_store(self, conductor: ConductorInfo, deadline: float) -> None:
        """The cluster KV tier's Mooncake master as an actor on the conductor's Ray node, when
        the store is on and no master is configured; the nodes' config then points at it.
        Where it cannot run (no wheel, a master that does not start), the tier is off and the
        log says why."""
        t = self.config.kv_tiers
        if not t.store or t.store_master is not None or t.host_gb <= 0:
            return
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        beside = NodeAffinitySchedulingStrategy(conductor.placement.ray_node_id, soft=False)
        handle = self._spawn(STORE_MASTER_NAME, StoreMasterActor, t.store_gb,
                             {"num_cpus": 0, "num_gpus": 0, "resources": {}, "scheduling_strategy": beside})
        info: StoreInfo = self._get_info(STORE_MASTER_NAME, handle.info.remote(), deadline)
        if info.address is None:
            log.warning("the cluster KV tier is off: %s", info.reason)
            stop_actors([(STORE_MASTER_NAME, self._actors.pop(STORE_MASTER_NAME))], 5.0)
            self._placed.discard(STORE_MASTER_NAME)
            self.config = with_overrides(self.config, {"kv_tiers.store": False}, source="kv_tiers")
            return
        log.info("Mooncake master on Ray node %s at %s", info.placement.ray_node_id[:8], info.address)
        self.config = with_overrides(self.config, {"kv_tiers.store_master": info.address,
                                                   "kv_tiers.store_metadata": info.metadata_url}, source="kv_tiers")
        self.store = info

    def _refuse_if_running(self) -> None:
        import ray

        try:
            ray.get_actor(CONDUCTOR_NAME, namespace=self.namespace)
        except ValueError:
            return
        raise AlreadyDeployed(f"halfmoon is already running in Ray namespace {self.namespace!r}; "
                              "stop it with `halfmoon down` first")

    def _spawn(self, name: str, cls: type, arg: object, options: dict) -> ActorHandle:
        import ray

        handle = ray.remote(cls).options(
            name=name, namespace=self.namespace, lifetime="detached" if self.detached else None,
            max_restarts=0, **options,
        ).remote(arg)
        self._actors[name] = handle
        self._asks[name] = options
        return handle

    def _get_info(self, name: str, ref, deadline: float):
        import ray

        try:
            info = ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
        except ray.exceptions.GetTimeoutError:
            raise DeployError(self._not_ready(name)) from None
        except ray.exceptions.RayError as exc:
            raise DeployError(f"{name} failed to start: {exc}") from None
        self._placed.add(name)
        return info

    def _not_ready(self, name: str) -> str:
        import ray

        free = ", ".join(f"{k} {v:g}" for k, v in sorted(ray.available_resources().items())
                         if not k.startswith("node:") and k not in ("memory", "object_store_memory"))
        return (f"{name} did not start in time; it asks Ray for {_describe_ask(self._asks[name])} "
                f"(free now: {free or 'nothing'}) - does a Ray node offer that?")

    def _wait_registered(self, conductor: ConductorInfo, plans: list[NodePlan], deadline: float) -> tuple[NodeInfo, ...]:
        import ray

        names = {actor_name(p.node_id): p.node_id for p in plans}
        pending = {self._actors[name].info.remote(): name for name in names}
        infos: dict[str, NodeInfo] = {}
        with keyed_channel(conductor.grpc_address, self.config.auth.api_key) as channel:
            admin = admin_pb2_grpc.AdminStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0) if pending else ([], [])
                for ref in ready:
                    name = pending.pop(ref)
                    infos[name] = self._get_info(name, ref, deadline)
                self._check_alive([CONDUCTOR_NAME, *infos])
                if not pending and set(names.values()) <= _up_nodes(admin) and _ready(health):
                    return tuple(infos[name] for name in names)
                if time.monotonic() > deadline:
                    if pending:
                        raise DeployError(self._not_ready(next(iter(pending.values()))))
                    missing = sorted(set(names.values()) - _up_nodes(admin))
                    raise DeployError(f"nodes {missing} started but did not register at the conductor's control "
                                      f"plane {conductor.control_address} in time (conductor.control_host must "
                                      "be reachable from the nodes' machines)")
                time.sleep(0.5)

    def _check_alive(self, names: list[str]) -> None:
        for name, reason in self.dead_actors(names).items():
            raise DeployError(f"{name} died while starting: {reason}")

    def dead_actors(self, names: list[str] | None = None) -> dict[str, str]:
        """The actors among `names` (default: all this launcher started) that died or whose
        server exited, each with Ray's reason."""
        import ray

        refs = {self._actors[n].check.remote(): n for n in (list(self._actors) if names is None else names)}
        dead = {}
        for ref, name in refs.items():
            try:
                ray.get(ref, timeout=30)
            except ray.exceptions.RayError as exc:
                dead[name] = str(exc)
        return dead

    def _write_targets(self, deployment: Deployment) -> None:
        path = self.config.conductor.prometheus_targets_file
        targets = []
        if deployment.http_url is not None:
            targets.append(ScrapeTarget(deployment.http_url.removeprefix("http://"), "conductor", "conductor"))
        with keyed_channel(deployment.grpc_address, self.config.auth.api_key) as channel:
            status = admin_pb2_grpc.AdminStub(channel).Status(admin_pb2.StatusRequest(), timeout=10)
        targets += [ScrapeTarget(n.metrics_address, n.node_id, n.role) for n in status.nodes if n.metrics_address]
        write_scrape_targets(path, targets)
        log.info("wrote %d Prometheus targets to %s", len(targets), path)

    def check(self) -> None:
        """Raise `DeployError` if the conductor or a node actor died or its server exited."""
        for name, reason in self.dead_actors().items():
            raise DeployError(f"{name} died: {reason}")

    def stop(self, timeout_s: float = 20.0) -> list[str]:
        """Stop every actor this launcher started (nodes first; one Ray never placed is just
        killed); returns their names."""
        names = list(reversed(self._actors))
        stop_actors([(n, self._actors[n]) for n in names if n in self._placed], timeout_s)
        stop_actors([(n, self._actors[n]) for n in names if n not in self._placed], 0)
        self._actors.clear()
        self._placed.clear()
        return names[::-1]


def _ready(health: health_pb2_grpc.HealthStub) -> bool:
    """The conductor's readiness: gRPC health of the Generation service is SERVING."""
    try:
        reply = health.Check(health_pb2.HealthCheckRequest(service=GENERATION_SERVICE), timeout=5)
    except grpc.RpcError:
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def _up_nodes(admin: admin_pb2_grpc.AdminStub) -> set[str]:
    try:
        status = admin.Status(admin_pb2.StatusRequest(), timeout=5)
    except grpc.RpcError:
        return set()
    return {n.node_id for n in status.nodes if n.state == "up"}


def stop_actors(actors: list[tuple[str, ActorHandle]], timeout_s: float) -> None:
    """Graceful `stop()` on each (in order, concurrently), then `ray.kill` whatever is left."""
    import ray

    refs = [handle.stop.remote(timeout_s) for _, handle in actors] if timeout_s > 0 else []
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    for name, handle in actors:
        try:
            ray.kill(handle, no_restart=True)
        except ValueError as exc:  # not an actor handle any more
            log.warning("could not kill %s: %s", name, exc)


def stop_namespace(namespace: str, timeout_s: float = 20.0) -> list[str]:
    """Stop every halfmoon actor in `namespace` (detached or not), nodes before the
    conductor; returns the names stopped (empty when nothing ran)."""
    import ray

    names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                   if a["namespace"] == namespace and a["name"].startswith(ACTOR_PREFIX))
    names.sort(key=lambda n: n == CONDUCTOR_NAME)
    actors = []
    for name in names:
        try:
            actors.append((name, ray.get_actor(name, namespace=namespace)))
        except ValueError:  # it ended in between
            pass
    stop_actors(actors, timeout_s)
    return [name for name, _ in actors]
