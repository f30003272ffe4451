"""Typed records at the transfer engine's boundary: regions, peer descriptors, batch
entries, states and counters."""

from __future__ import annotations

import enum
import functools
import json
from dataclasses import dataclass, field
from typing import NamedTuple, NewType

from .errors import DescriptorError

RegionId = NewType("RegionId", int)

DESCRIPTOR_VERSION = 1


class TransportKind(str, enum.Enum):
    """Which data path an engine uses for the batches it issues."""

    AUTO = "auto"  # shared memory when the peer is on this host, else TCP
    TCP = "tcp"
    SHM = "shm"
    MOONCAKE = "mooncake"


class TransferOp(str, enum.Enum):
    WRITE = "write"  # local memory -> peer memory
    READ = "read"  # peer memory -> local memory


class TransferState(enum.IntEnum):
    """A batch's state; the three last ones are terminal and final."""

    PENDING = 0  # accepted, nothing sent yet
    RUNNING = 1  # bytes are moving
    DONE = 2  # every byte is in the destination memory (the receiver acknowledged it)
    FAILED = 3
    CANCELLED = 4

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({TransferState.DONE, TransferState.FAILED, TransferState.CANCELLED})


@dataclass(frozen=True)
class Region:
    """A registered memory region: local, or a peer's as listed in its descriptor."""

    id: RegionId
    size: int
    segment: str = ""  # the owning engine's segment name


class TransferEntry(NamedTuple):
    """One contiguous copy of a batch: `length` bytes between a local and a remote range."""

    local_region: Region | int
    local_offset: int
    remote_region: Region | int
    remote_offset: int
    length: int


@dataclass(frozen=True)
class RegionInfo:
    """What a peer needs to know about one of our regions."""

    id: RegionId
    size: int
    readonly: bool = False
    shm_name: str | None = None  # POSIX shared-memory name when shm-backed
    addr: int | None = None  # virtual address, published only for the Mooncake transport


@dataclass(frozen=True)
class PeerDescriptor:
    """Everything a peer needs to reach an engine, obtained by handshake or carried by a
    control plane (`to_bytes` / `from_bytes`)."""

    segment: str
    host: str
    port: int
    host_id: str  # equal on two engines that can share POSIX shared memory
    regions: tuple[RegionInfo, ...] = ()
    mooncake_session: str | None = None  # "host:rpc_port" when Mooncake is enabled
    version: int = DESCRIPTOR_VERSION

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def region(self, region_id: int) -> RegionInfo | None:
        return self._by_id.get(region_id)

    @functools.cached_property
    def _by_id(self) -> dict[int, RegionInfo]:
        return {info.id: info for info in self.regions}

    def to_bytes(self) -> bytes:
        doc = {
            "version": self.version,
            "segment": self.segment,
            "host": self.host,
            "port": self.port,
            "host_id": self.host_id,
            "mooncake_session": self.mooncake_session,
            "regions": [
                {"id": r.id, "size": r.size, "readonly": r.readonly, "shm_name": r.shm_name, "addr": r.addr}
                for r in self.regions
            ],
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> PeerDescriptor:
        try:
            doc = json.loads(bytes(data).decode())
            if doc["version"] != DESCRIPTOR_VERSION:
                raise DescriptorError(
                    f"peer descriptor version {doc['version']} is not supported (this engine speaks {DESCRIPTOR_VERSION})"
                )
            regions = tuple(
                RegionInfo(
                    id=RegionId(int(r["id"])),
                    size=int(r["size"]),
                    readonly=bool(r["readonly"]),
                    shm_name=r["shm_name"],
                    addr=None if r["addr"] is None else int(r["addr"]),
                )
                for r in doc["regions"]
            )
            return cls(
                segment=str(doc["segment"]),
                host=str(doc["host"]),
                port=int(doc["port"]),
                host_id=str(doc["host_id"]),
                regions=regions,
                mooncake_session=doc["mooncake_session"],
            )
        except DescriptorError:
            raise
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise DescriptorError(f"malformed peer descriptor ({len(data)} bytes): {exc!r}") from exc


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of an engine's counters. Batches are counted once, when they end."""

    batches_submitted: int = 0
    batches_done: int = 0
    batches_failed: int = 0  # includes timed-out batches
    batches_timed_out: int = 0
    batches_cancelled: int = 0
    bytes_written: int = 0  # by DONE write batches this engine issued
    bytes_read: int = 0  # by DONE read batches this engine issued
    bytes_received: int = 0  # written into our regions by peers
    bytes_served: int = 0  # read from our regions by peers
    requests_refused: int = 0  # peer requests this engine refused
    latency_mean_s: float = 0.0  # submit -> end, over finished batches
    latency_p50_s: float = 0.0  # over the most recent batches
    latency_p99_s: float = 0.0
    latency_max_s: float = 0.0
    done_by_transport: dict[str, int] = field(default_factory=dict)
