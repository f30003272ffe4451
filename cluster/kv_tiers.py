"""From the config's `kv_tiers` section to what nodes and launchers run.

- `node_tiers(config, node_id)`: the `TierConfig` a node is launched with (its own disk
  folder), or None when the tiers are off;
- `role_tiers(tiers, role)`: what of it one life of the node runs in `role` (a node can
  switch roles, so this is derived at each start, not at launch);
- `embedded_store(config)`: when the store is on and no master is configured, a
  `MooncakeMaster` (with its store keeper) on free loopback ports for the launcher to start
  beside the conductor, and the config pointing the nodes at it. Where the wheel cannot
  load, the cluster tier is switched off with a logged reason instead.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from typing import TYPE_CHECKING

from cluster.config import ClusterConfig, with_overrides

if TYPE_CHECKING:
    from engine.tiers.config import TierConfig

log = logging.getLogger("halfmoon.kv_tiers")


def node_tiers(config: ClusterConfig, node_id: str) -> TierConfig | None:
    t = config.kv_tiers
    if t.host_gb <= 0:
        return None
    from engine.loader import cache_root
    from engine.tiers.config import TierConfig

    store = t.store and t.store_master is not None
    if t.store and not store:
        log.warning("%s: kv_tiers.store is on but no master is set or started (kv_tiers.store_master): "
                    "the cluster KV tier is off", node_id)
    disk_dir = Path(t.disk_dir) if t.disk_dir is not None else cache_root() / "kv"
    return TierConfig(
        host_gib=t.host_gb, disk_gib=t.disk_gb, disk_dir=str(disk_dir / node_id), store=store,
        store_master=t.store_master or TierConfig().store_master,
        store_metadata=t.metadata_url() or TierConfig().store_metadata,
        store_segment_gib=t.node_segment_gb, policy=t.policy, selective_hits=t.selective_hits,
        write_back_on_finish=t.decode_write_back,
    )


def role_tiers(tiers: TierConfig | None, role: str) -> TierConfig | None:
    """The tiers a node runs in `role`. A prefill node looks prompts up in every tier and
    writes nothing back (its requests end at their first token). A decode node's cached
    blocks are never looked up (the conductor sends prompts to prefill nodes and ships
    their KV whole), so copying them down on eviction would only take CPU from its decode
    steps: it copies nothing down and has no disk tier, and its host pool only stages the
    write-back's puts to the store; without the write-back it runs no tiers at all. A
    colocated node does both."""
    if tiers is None:
        return None
    if role == "prefill":
        return replace(tiers, write_back_on_finish=False)
    if role == "decode":
        if not (tiers.store and tiers.write_back_on_finish):
            return None
        return replace(tiers, disk_gib=0.0, copy_down=False)
    return tiers


def embedded_store(config: ClusterConfig, log_dir: Path | None = None):
    """(config, master): `master` is a not-yet-started `MooncakeMaster` the launcher must
    start before the nodes and stop after them, or None when there is nothing to start."""
    t = config.kv_tiers
    if not t.store or t.store_master is not None or t.host_gb <= 0:
        return config, None
    from cluster.specs import free_port
    from engine.tiers.mooncake_store import MooncakeMaster, store_unavailable_reason

    reason = store_unavailable_reason()
    if reason is not None:
        log.warning("%s", reason)
        return with_overrides(config, {"kv_tiers.store": False}, source="kv_tiers"), None
    rpc = free_port()
    meta = rpc + 1 if _free(rpc + 1) else free_port()
    master = MooncakeMaster(rpc, meta, free_port(), keeper_gb=t.store_gb,
                            log_path=(log_dir / "mooncake_master.log") if log_dir else None)
    from cluster.specs import store_gib

    # the conductor's model of the store counts this keeper (derived from the config before
    # it names the master, after which the keeper is no longer the launcher's)
    config = with_overrides(config, {"kv_tiers.store_master": master.address,
                                     "kv_tiers.store_metadata": master.metadata_url,
                                     "conductor.store_gb": store_gib(config)}, source="kv_tiers")
    return config, master


def _free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def tier_use(engine, stats=None) -> list:
    """The heartbeat's view of a node's tiers (`common_pb2.KVTierUse` per tier): the device
    region (cached blocks of all blocks) and the tiers under it; empty without tiers."""
    from proto.halfmoon.v1 import common_pb2

    if engine.tiers is None:
        return []
    stats = stats or engine.tiers.stats()
    out = [common_pb2.KVTierUse(tier="device", used_blocks=engine.pool.num_cached,
                                capacity_blocks=engine.pool.num_blocks, hit_tokens=stats.hit_tokens["device"])]
    for tier in ("host", "disk"):
        if tier in stats.use:
            u = stats.use[tier]
            out.append(common_pb2.KVTierUse(tier=tier, used_blocks=u.used_blocks, capacity_blocks=u.capacity_blocks,
                                            hit_tokens=stats.hit_tokens[tier]))
    if stats.store_state != "off":
        out.append(common_pb2.KVTierUse(tier="cluster", hit_tokens=stats.hit_tokens["cluster"]))
    return out
