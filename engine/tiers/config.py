"""The typed settings of the KV tiers under the device region (`kv_tiers` in the cluster config).

Sizes are in GiB of block records (one KV block plus its trailer, `engine/tiers/record.py`);
0 turns a tier off. The disk tier and the cluster store sit under the host pool (the host
pool is where their blocks are staged: the buffer the store reads from and writes into), so
both need `host_gib > 0`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.tiers.policy import DEFAULT_POLICY, WritePolicy

GIB = 1 << 30


@dataclass(frozen=True, slots=True)
class TierConfig:
    host_gib: float = 0.0  # preallocated host DRAM pool
    disk_gib: float = 0.0  # local disk, one checksummed file per block
    disk_dir: str | None = None  # default: $HALFMOON_CACHE/kv
    store: bool = False  # the cluster tier on Mooncake Store
    store_master: str = "127.0.0.1:50090"  # mooncake_master's RPC address
    store_metadata: str = "http://127.0.0.1:50091/metadata"  # its HTTP metadata server
    store_segment_gib: float = 0.25  # host memory this node mounts into the store
    store_local_host: str = "127.0.0.1"  # the address this node's store client listens on
    policy: str = DEFAULT_POLICY.value  # when device blocks are copied down (engine/tiers/policy.py)
    selective_hits: int = 2  # write_through_selective: copy a block down at this many hits
    write_back_on_finish: bool = False  # a finished request's KV goes to the store (decode nodes)
    copy_down: bool = True  # device blocks go down by `policy`; off where none is looked up again (decode nodes)
    write_queue_blocks: int = 256  # pending disk writes + store puts; beyond it a copy-down is dropped

    @property
    def enabled(self) -> bool:
        return self.host_gib > 0

    @property
    def write_policy(self) -> WritePolicy:
        return WritePolicy(self.policy)

    def validate(self, prefix: str = "kv_tiers") -> None:
        for name in ("host_gib", "disk_gib", "store_segment_gib"):
            v = getattr(self, name)
            if not v >= 0:
                raise ValueError(f"{prefix}.{name} must be >= 0, got {v}")
        names = [p.value for p in WritePolicy]
        if self.policy not in names:
            raise ValueError(f"{prefix}.policy must be one of {', '.join(names)}, got {self.policy!r}")
        if self.selective_hits < 1:
            raise ValueError(f"{prefix}.selective_hits must be >= 1, got {self.selective_hits}")
        if self.write_queue_blocks < 1:
            raise ValueError(f"{prefix}.write_queue_blocks must be >= 1, got {self.write_queue_blocks}")
        if not self.enabled and (self.disk_gib > 0 or self.store):
            raise ValueError(f"{prefix}.host_gib must be > 0 when the disk tier or the store is on: "
                             "the host pool stages their blocks")
        if self.store and ":" not in self.store_master:
            raise ValueError(f"{prefix}.store_master must be host:port, got {self.store_master!r}")

    def disk_path(self) -> Path:
        from engine.loader import cache_root

        return Path(self.disk_dir) if self.disk_dir else cache_root() / "kv"


def blocks_in(gib: float, record_bytes: int) -> int:
    return int(gib * GIB) // record_bytes
