"""What every transport implements, and the validated work it is handed."""

from __future__ import annotations

import abc
import threading
from dataclasses import dataclass

from .handle import TransferHandle
from .memory import LocalRegion
from .records import PeerDescriptor, Region, RegionId, TransferOp, TransportKind


class Peer:
    """A peer engine as one engine sees it: its latest descriptor and the transport chosen
    for it. Returned by `TransferEngine.connect`; pass it to `write` / `read`."""

    def __init__(self, descriptor: PeerDescriptor, transport: TransportKind) -> None:
        self._lock = threading.Lock()
        self._descriptor = descriptor
        self.transport = transport
        self.host = descriptor.host
        self.port = descriptor.port
        self.address = f"{self.host}:{self.port}"  # fixed: a peer is known by where it listens

    def __repr__(self) -> str:
        return f"<Peer {self.segment!r} at {self.address} via {self.transport.value}>"

    @property
    def descriptor(self) -> PeerDescriptor:
        return self._descriptor

    @property
    def segment(self) -> str:
        return self._descriptor.segment

    @property
    def regions(self) -> tuple[Region, ...]:
        d = self._descriptor
        return tuple(Region(info.id, info.size, d.segment) for info in d.regions)

    def region(self, region_id: int) -> Region:
        info = self._descriptor.region(region_id)
        if info is None:
            raise KeyError(f"peer {self.segment!r} announced no region {region_id}")
        return Region(info.id, info.size, self.segment)

    def _update(self, descriptor: PeerDescriptor) -> None:
        """A newer descriptor (a reconnect handshake, a restarted peer)."""
        with self._lock:
            self._descriptor = descriptor


@dataclass(frozen=True)
class Piece:
    """One validated entry of a batch."""

    local: LocalRegion
    local_offset: int
    remote_id: RegionId
    remote_offset: int
    length: int

    def local_view(self) -> memoryview:
        return self.local.view[self.local_offset:self.local_offset + self.length]


@dataclass(eq=False)
class Job:
    """A batch handed to a transport: it must end the handle, one way or another."""

    op: TransferOp
    peer: Peer
    pieces: list[Piece]
    handle: TransferHandle


class Transport(abc.ABC):
    kind: TransportKind

    @abc.abstractmethod
    def submit(self, job: Job) -> None:
        """Start moving the job's bytes without blocking on the network; end the handle
        when the destination holds them (DONE) or they cannot get there (FAILED)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop, failing every batch still in flight with EngineClosed."""
