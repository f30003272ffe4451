"""`halfmoon serve`'s two ways to start a whole cluster on this machine from a config.

- `start_embedded_ray` (the default): a Ray instance started for the occasion
  (`ray.init(address="local")`) offering the CPUs, GPUs and custom resources the config
  asks for, kept on loopback; the conductor and the nodes are Ray actors placed by those
  resources (`cluster.ray_launcher`). Stopping stops the actors, then Ray itself. Only the
  conductor's death stops the cluster; a node actor that dies is logged, and the conductor
  has already taken it out of rotation.
- `start_processes`: one spawned OS process per server (`cluster.local.LocalCluster`);
  Ray resources in the config are ignored. A conductor that dies is restarted (a few times)
  and the nodes register with it again by themselves.

Both return a `RunningCluster`: where to reach it, whether it is still healthy, and how
to stop everything it started.
"""
from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable

from cluster.config import ClusterConfig, with_overrides

# Ray reads this when `ray` is first imported: with 0, every Ray process of a cluster this
# process starts binds and advertises 127.0.0.1 instead of the machine's outward address.
_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
log = logging.getLogger("halfmoon.launch")
EMBEDDED_OBJECT_STORE_BYTES = 256 * 2**20  # halfmoon passes no large objects through Ray


@dataclass
class RunningCluster:
    grpc_address: str
    http_url: str | None
    problem: Callable[[], str | None]  # None while healthy (or repaired just now), else what broke
    stop: Callable[[], None]  # stops every process it started; safe to call twice


def keep_ray_on_loopback() -> None:
    """Make a Ray instance started by this process (and its workers) use 127.0.0.1 only."""
    os.environ[_LOOPBACK_ENV] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # ray was imported already: its flag was read; set it too
        constants.ENABLE_RAY_CLUSTER = False


def embedded_ray_options(config: ClusterConfig) -> dict:
    """`ray.init` arguments for a one-machine Ray that can place every actor of `config`."""
    need = config.required_resources()
    custom = {k: v for k, v in need.items() if k not in ("CPU", "GPU")}
    options: dict = {
        "address": "local",
        "namespace": config.ray.namespace,
        # logical CPUs: the actors' asks must fit even on a machine with fewer cores
        "num_cpus": max(os.cpu_count() or 1, math.ceil(need["CPU"])),
        "resources": custom,
        "include_dashboard": False,
        "object_store_memory": EMBEDDED_OBJECT_STORE_BYTES,
        "_node_ip_address": "127.0.0.1",
    }
    return options  # GPUs: Ray detects them; asking for more than there are is an error


def start_embedded_ray(config: ClusterConfig, timeout_s: float = 300.0) -> RunningCluster:
    keep_ray_on_loopback()
    import ray

    from cluster.ray_launcher import CONDUCTOR_NAME, DeployError, RayLauncher, resource_shortfall

    config, store = _start_store(config)
    ray.init(**embedded_ray_options(config))
    launcher = RayLauncher(config)
    try:
        short = resource_shortfall(config, ray.cluster_resources())
        if short:
            raise DeployError("this machine cannot offer what the config asks for: " + ", ".join(
                f"{name} {asked:g} (there are {there:g})" for name, (asked, there) in short.items()))
        deployment = launcher.start(timeout_s)
    except BaseException:
        ray.shutdown()
        if store is not None:
            store.stop()
        raise

    reported: set[str] = set()

    def problem() -> str | None:
        """Only the conductor's death stops the cluster (this launcher does not restart it). A
        dead node or store actor is logged once: the conductor has taken the node out of
        rotation (retrying and migrating its requests), and the others serve on."""
        dead = launcher.dead_actors()
        if CONDUCTOR_NAME in dead:
            return f"{CONDUCTOR_NAME} died ({_first_line(dead[CONDUCTOR_NAME])})"
        for name in sorted(set(dead) - reported):
            log.warning("%s died (%s); the cluster serves on without it", name, _first_line(dead[name]))
        reported.update(dead)
        return None

    def stop() -> None:
        if ray.is_initialized():
            launcher.stop()
            ray.shutdown()
        if store is not None:
            store.stop()

    return RunningCluster(deployment.grpc_address, deployment.http_url, problem, stop)


def _first_line(reason: str) -> str:
    return next((line.strip() for line in reason.splitlines() if line.strip()), "no reason given")


def _start_store(config: ClusterConfig):
    """The Mooncake master (and its store keeper) beside the conductor, on loopback, when the
    cluster KV tier is on and no master is configured: (config pointing at it, the master)."""
    from cluster.kv_tiers import embedded_store

    config, store = embedded_store(config)
    if store is not None:
        store.start()
    return config, store


def start_processes(config: ClusterConfig, timeout_s: float = 300.0) -> RunningCluster:
    from cluster.local import LocalCluster
    from cluster.specs import build_specs, free_port, local_address

    c = config.conductor
    ports = {f"conductor.{name}": free_port(c.host) for name in ("grpc_port", "http_port") if getattr(c, name) == 0}
    config, store = _start_store(config)
    try:
        conductor, nodes = build_specs(with_overrides(config, ports) if ports else config)
        cluster = LocalCluster(conductor, nodes).start(timeout_s)
    except BaseException:
        if store is not None:
            store.stop()
        raise

    def stop() -> None:
        cluster.stop()
        if store is not None:
            store.stop()

    http = f"http://{local_address(conductor.host, conductor.http_port)}" if conductor.http_port else None
    return RunningCluster(local_address(conductor.host, conductor.grpc_port), http, cluster.revive_conductor, stop)


LAUNCHERS: dict[str, Callable[[ClusterConfig, float], RunningCluster]] = {
    "ray": start_embedded_ray,
    "processes": start_processes,
}
