"""`TransferEngine`: one per process. It owns the registered regions, the listener that
serves peers, and the transports that carry the batches it issues."""

from __future__ import annotations

import re
import socket
import threading
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from . import batch
from .config import EngineConfig
from .deadlines import DeadlineWatch
from .errors import (
    EngineClosed,
    InvalidTransfer,
    RegistrationError,
    TransferError,
    TransferRefused,
    TransportUnavailable,
)
from .faults import Fault, FaultInjector, FaultPlan
from .handle import TransferHandle, completed_handle
from .memory import (
    SHM_PREFIX,
    LocalRegion,
    RegionTable,
    ShmSegment,
    byte_array,
    host_id,
    shm_supported,
    shm_visible,
    sweep_stale_segments,
)
from .mooncake import MooncakeTransport
from .records import EngineStats, PeerDescriptor, Region, TransferOp, TransportKind
from .shm import ShmTransport
from .stats import Counters
from .tcp import TcpTransport, handshake
from .tcp_server import TcpServer
from .transport import Job, Peer, Transport

if TYPE_CHECKING:
    import torch

_DEFAULT = object()


class TransferEngine:
    """Moves bytes between registered memory regions of this process and its peers.

    Example::

        eng = TransferEngine("prefill-0", port=0)
        src = eng.register(kv_tensor)                    # or eng.allocate_tensor(shape, dtype)
        peer = eng.connect("10.0.0.7:5555")              # or eng.connect(descriptor)
        eng.write(peer, [(src, 0, peer.regions[0], 0, n)]).wait()

    Thread-safe: any thread may register, connect, write, read and wait.
    """

    def __init__(self, segment: str, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 transport: TransportKind | str = "auto", config: EngineConfig | None = None,
                 advertise_host: str | None = None, faults: FaultPlan | str | None = None) -> None:
        """`host`/`port` is where the listener binds (port 0: any free port);
        `advertise_host` is the address peers are told to use (default: `host`, or this
        machine's address when `host` is a wildcard). `token`, if set, must be shared by
        every peer. `transport` picks the data path for the batches this engine issues.
        `faults` fails or delays some of those batches on purpose (`faults.py`; default:
        the plan in $HALFMOON_TRANSFER_FAULTS, if any)."""
        self.segment = segment
        self.transport = TransportKind(transport)
        self.config = config or EngineConfig()
        plan = FaultPlan.from_env() if faults is None else FaultPlan.parse(faults) if isinstance(faults, str) else faults
        self.faults = FaultInjector(plan, segment) if plan is not None and plan.active else None
        self._token = token
        self._lock = threading.Lock()
        self._closed = False
        self._regions = RegionTable()
        self._counters = Counters()
        self._host_id = host_id()
        self._peers: dict[str, Peer] = {}
        self._mooncake: MooncakeTransport | None = None
        self._server = TcpServer(segment, host, port, token, self._regions, self._describe, self._counters)
        self.host = advertise_host or (host if host not in ("", "0.0.0.0", "::") else _this_host())
        self.port = self._server.port
        if self.transport is TransportKind.MOONCAKE:
            try:
                self._mooncake = MooncakeTransport(segment, self.host, self.config)
            except BaseException:
                self._server.close()
                raise
        self._tcp = TcpTransport(segment, token, self.config)
        self._shm = ShmTransport(segment, self.config) if self._shm_wanted() else None
        if shm_supported():
            sweep_stale_segments()
        self._deadlines = DeadlineWatch(segment)

    def __repr__(self) -> str:
        return f"<TransferEngine {self.segment!r} at {self.address} ({self.transport.value})>"

    def __enter__(self) -> TransferEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # --- memory ---

    def register(self, obj: object) -> Region:
        """Register a CPU tensor, numpy array or contiguous buffer (no copy). Peers can
        reach it over TCP or Mooncake; only `allocate_*` memory is reachable over shm."""
        self._check_open()
        array, readonly = byte_array(obj)
        return self._add(self._regions.add(array, readonly, obj))

    def allocate_buffer(self, nbytes: int) -> tuple[Region, np.ndarray]:
        """Allocate and register `nbytes` of zeroed memory that every transport can reach
        (POSIX shared memory where the host has it); returns a flat uint8 array over it."""
        self._check_open()
        if nbytes <= 0:
            raise RegistrationError(f"cannot allocate {nbytes} bytes")
        if shm_supported():
            seg = ShmSegment.create(f"{SHM_PREFIX}-{_safe(self.segment)}", nbytes)
            local = self._regions.add(seg.array, False, seg, shm=seg)
        else:
            array = np.zeros(nbytes, dtype=np.uint8)
            local = self._regions.add(array, False, array)
        return self._add(local), local.array

    def allocate_tensor(self, shape: Sequence[int], dtype: torch.dtype | None = None) -> tuple[Region, torch.Tensor]:
        """`allocate_buffer`, viewed as a torch tensor of `shape` and `dtype` (float32 by default)."""
        import torch

        dtype = dtype or torch.float32
        numel = 1
        for dim in shape:
            numel *= int(dim)
        itemsize = torch.empty((), dtype=dtype).element_size()
        region, array = self.allocate_buffer(numel * itemsize)
        return region, torch.from_numpy(array).view(dtype).view(tuple(int(d) for d in shape))

    def unregister(self, region: Region | int) -> None:
        """Stop serving a region: later TCP requests to it are refused. A same-host peer
        that already mapped a shm-backed region can still copy into it until it next
        refreshes our descriptor; unregister only memory no peer is still writing."""
        region_id = region.id if isinstance(region, Region) else int(region)
        local = self._regions.remove(region_id)
        if local is None:
            raise RegistrationError(f"region {region_id} is not registered with {self.segment!r}")
        if self._mooncake is not None:
            self._mooncake.unregister(local)
        if local.shm is not None:
            local.shm.unlink()

    def _add(self, local: LocalRegion) -> Region:
        if self._mooncake is not None:
            try:
                self._mooncake.register(local)
            except RegistrationError:
                self._regions.remove(local.id)
                raise
        return Region(local.id, local.size, self.segment)

    # --- peers ---

    def descriptor(self) -> PeerDescriptor:
        with_addr = self._mooncake is not None
        return PeerDescriptor(
            segment=self.segment,
            host=self.host,
            port=self.port,
            host_id=self._host_id,
            regions=tuple(r.info(with_addr) for r in self._regions.all()),
            mooncake_session=self._mooncake.session if self._mooncake is not None else None,
        )

    def _describe(self) -> bytes:
        return self.descriptor().to_bytes()

    def connect(self, target: PeerDescriptor | str, timeout: float | None = None) -> Peer:
        """Handshake with a peer (by descriptor or "host:port") and choose the transport
        for it. Raises AuthenticationError, PeerUnreachable or TransportUnavailable."""
        self._check_open()
        if isinstance(target, PeerDescriptor):
            host, port = target.host, target.port
        else:
            host, _, port_text = str(target).rpartition(":")
            if not host or not port_text.isdigit():
                raise ValueError(f"expected a peer address 'host:port', got {target!r}")
            port = int(port_text)
        sock, descriptor = handshake(host, port, self.segment, self._token, timeout or self.config.connect_timeout_s)
        try:
            kind = self._choose(descriptor)
        except TransferError:
            sock.close()
            raise
        address = f"{host}:{port}"
        with self._lock:
            peer = self._peers.get(address)
            if peer is None:
                peer = self._peers[address] = Peer(descriptor, kind)
            else:
                peer._update(descriptor)
                peer.transport = kind
        if kind is TransportKind.MOONCAKE or self.transport is TransportKind.SHM:
            sock.close()
        else:
            self._tcp.link(peer).adopt(sock)
        return peer

    def disconnect(self, peer: Peer) -> None:
        """Forget a peer (one that died or left): its connections close and its batches
        in flight fail with PeerDisconnected."""
        with self._lock:
            if self._peers.get(peer.address) is peer:
                del self._peers[peer.address]
        self._tcp.forget(peer)
        if self._shm is not None:
            self._shm.forget(peer)

    def _shm_wanted(self) -> bool:
        return shm_supported() and self.transport in (TransportKind.AUTO, TransportKind.SHM)

    def _choose(self, descriptor: PeerDescriptor) -> TransportKind:
        if self.transport is TransportKind.TCP:
            return TransportKind.TCP
        if self.transport is TransportKind.MOONCAKE:
            if descriptor.mooncake_session is None:
                raise TransportUnavailable(
                    f"{descriptor.segment!r} does not run Mooncake; start both engines with transport='mooncake'")
            return TransportKind.MOONCAKE
        problem = self._shm_problem(descriptor)
        if problem is None:
            return TransportKind.SHM
        if self.transport is TransportKind.SHM:
            raise TransportUnavailable(f"shared memory cannot reach {descriptor.segment!r}: {problem}")
        return TransportKind.TCP

    def _shm_problem(self, descriptor: PeerDescriptor) -> str | None:
        if self._shm is None:
            return "this host has no POSIX shared memory"
        if descriptor.host_id != self._host_id:
            return f"it runs on another host ({descriptor.host_id} vs {self._host_id})"
        for info in descriptor.regions:
            if info.shm_name is not None:
                problem = shm_visible(info.shm_name, info.size)
                if problem is not None:
                    return problem
                break
        return None

    def _refresh(self, peer: Peer) -> None:
        """Fetch the peer's current descriptor (it may have registered regions since)."""
        sock, descriptor = handshake(peer.host, peer.port, self.segment, self._token, self.config.connect_timeout_s)
        sock.close()
        peer._update(descriptor)

    # --- batches ---

    def write(self, peer: Peer, entries: Iterable[Sequence[object]], timeout: float | None | object = _DEFAULT
              ) -> TransferHandle:
        """Copy local ranges into the peer's regions. Entries are
        (local_region, local_offset, remote_region, remote_offset, length); regions are
        `Region`s or ids. Returns at once; the handle says when the bytes have landed."""
        return self._submit(TransferOp.WRITE, peer, entries, timeout)

    def read(self, peer: Peer, entries: Iterable[Sequence[object]], timeout: float | None | object = _DEFAULT
             ) -> TransferHandle:
        """Copy the peer's ranges into local regions; same entries as `write`."""
        return self._submit(TransferOp.READ, peer, entries, timeout)

    def _submit(self, op: TransferOp, peer: Peer, entries: Iterable[Sequence[object]], timeout: object
                ) -> TransferHandle:
        self._check_open()
        if not isinstance(peer, Peer) or self._peers.get(peer.address) is not peer:
            raise InvalidTransfer(f"{peer!r} was not connected by engine {self.segment!r}; use engine.connect()")
        pieces = batch.coalesce([batch.resolve(op, self._regions, self.segment, peer.segment, entry)
                                 for entry in entries])
        if not pieces:
            return completed_handle(op, peer.segment)
        handle = TransferHandle(op, peer.segment, sum(p.length for p in pieces), len(pieces))
        self._counters.batch_submitted()
        handle.add_done_callback(self._counters.batch_ended)
        try:
            problem, in_shm = batch.remote_check(op, peer.descriptor, pieces)
            if problem is not None and batch.unknown_regions(peer.descriptor, pieces):
                self._refresh(peer)  # it may have registered regions since our handshake
                problem, in_shm = batch.remote_check(op, peer.descriptor, pieces)
            if problem is not None:
                raise TransferRefused(f"{peer.segment!r} at {peer.address}: {op.value} refused: {problem} "
                                      "(checked against its descriptor; nothing was sent)")
            transport = self._route(peer, in_shm)
            handle.transport = transport.kind.value
            job = Job(op, peer, pieces, handle)
            fault = self.faults.draw() if self.faults is not None else Fault.NONE
            if fault is Fault.FAIL:
                self.faults.fail(handle)  # type: ignore[union-attr]
            elif fault is Fault.DELAY:
                self.faults.later(handle, lambda: transport.submit(job))  # type: ignore[union-attr]
            else:
                transport.submit(job)
            timeout_s = self.config.default_timeout_s if timeout is _DEFAULT else timeout
            if timeout_s is not None and not handle.done():  # counted from submission
                self._deadlines.watch(handle, float(timeout_s))  # type: ignore[arg-type]
        except TransferError as exc:
            handle._fail(exc)
        return handle

    def _route(self, peer: Peer, in_shm: bool) -> Transport:
        if peer.transport is TransportKind.MOONCAKE and self._mooncake is not None:
            return self._mooncake
        if peer.transport is TransportKind.SHM and self._shm is not None:
            if self.transport is TransportKind.SHM or in_shm:
                return self._shm
        return self._tcp

    # --- lifecycle ---

    def stats(self) -> EngineStats:
        return self._counters.snapshot()

    def close(self) -> None:
        """Fail batches in flight with EngineClosed, stop every thread, unlink shared
        memory. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        transports: list[Transport] = [self._tcp]
        if self._shm is not None:
            transports.append(self._shm)
        if self._mooncake is not None:
            transports.append(self._mooncake)
        if self.faults is not None:
            self.faults.close()
        for transport in transports:
            transport.close()
        self._deadlines.close()
        self._server.close()
        for local in self._regions.all():
            if local.shm is not None:
                local.shm.unlink()

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosed(f"engine {self.segment!r} is closed")


def _this_host() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:32]
