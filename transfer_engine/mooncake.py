"""The Mooncake adapter: the same API over Mooncake's own Transfer Engine
(`mooncake-transfer-engine-non-cuda` on CPU machines; its `tcp` protocol here, `rdma`
on clusters with RDMA NICs).

Both ends must run with `transport="mooncake"`: each registers all its regions with its
Mooncake engine and publishes, in its descriptor, Mooncake's P2P-handshake session
("host:rpc_port") and every region's virtual address. A batch becomes one Mooncake
request per entry, submitted within a byte window and polled (with backoff, never
spinning) on one worker thread; the batch is DONE when Mooncake reports every request
completed. Cancellation and timeouts stop submitting; requests already handed to
Mooncake cannot be recalled and are polled to the end in the background.

Mooncake binds its listeners to every interface and logs through glog on stderr.
"""

from __future__ import annotations

import collections
import importlib
import threading
from dataclasses import dataclass, field
from typing import Any

from .config import EngineConfig
from .errors import EngineClosed, PeerDisconnected, RegistrationError, TransferRefused, TransferTimeout, TransportUnavailable
from .memory import LocalRegion, range_problem
from .records import TransferOp, TransportKind
from .transport import Job, Transport

_STATUS_DONE, _STATUS_PENDING, _STATUS_FAILED, _STATUS_TIMEOUT = 1, 0, -1, -2
_POLL_MIN_S, _POLL_MAX_S = 10e-6, 200e-6  # backoff between polls of Mooncake


def mooncake_unavailable_reason() -> str | None:
    """None when Mooncake's engine imports here, else why not (for skips and errors)."""
    try:
        importlib.import_module("mooncake.engine")
    except ImportError as exc:
        return (f"Mooncake's transfer engine does not load ({exc}); run .ci/install-mooncake.sh "
                "(pip package mooncake-transfer-engine-non-cuda plus Debian's libibverbs1, "
                "ibverbs-providers, libnl-3-200, libnl-route-3-200)")
    return None


@dataclass(eq=False)
class _Active:
    job: Job
    requests: list[tuple[int, int, int]]  # (local addr, remote addr, length)
    opcode: Any
    session: str
    next: int = 0
    outstanding: list[tuple[int, int]] = field(default_factory=list)  # (mooncake batch id, length)

    @property
    def outstanding_bytes(self) -> int:
        return sum(n for _, n in self.outstanding)


class MooncakeTransport(Transport):
    kind = TransportKind.MOONCAKE

    def __init__(self, segment: str, host: str, config: EngineConfig) -> None:
        reason = mooncake_unavailable_reason()
        if reason is not None:
            raise TransportUnavailable(reason)
        from mooncake.engine import TransferEngine as MooncakeEngine, TransferOpcode

        self.segment = segment
        self.config = config
        self._opcodes = {TransferOp.WRITE: TransferOpcode.Write, TransferOp.READ: TransferOpcode.Read}
        self._engine = MooncakeEngine()
        rc = self._engine.initialize(host, "P2PHANDSHAKE", config.mooncake_protocol, "")
        if rc != 0:
            raise TransportUnavailable(f"Mooncake engine failed to initialize on {host} "
                                       f"with protocol {config.mooncake_protocol!r} (code {rc})")
        self.session = f"{host}:{self._engine.get_rpc_port()}"
        self._cond = threading.Condition()
        self._incoming: collections.deque[Job] = collections.deque()
        self._active: list[_Active] = []
        self._orphans: list[int] = []  # ids of abandoned requests, polled until they end
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"{segment}-mooncake", daemon=True)
        self._thread.start()

    def register(self, region: LocalRegion) -> None:
        rc = self._engine.register_memory(region.addr, region.size)
        if rc != 0:
            raise RegistrationError(f"Mooncake refused to register region {region.id} ({region.size} bytes), code {rc}")

    def unregister(self, region: LocalRegion) -> None:
        if self._engine is not None:
            self._engine.unregister_memory(region.addr)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise EngineClosed(f"engine {self.segment!r} is closed")
            self._incoming.append(job)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            jobs = list(self._incoming) + [a.job for a in self._active]
            self._incoming.clear()
            self._cond.notify()
        for job in jobs:
            job.handle._fail(EngineClosed(f"engine {self.segment!r} closed with this batch in flight"))
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        self._engine = None  # Mooncake shuts its engine down when the last reference goes

    # --- worker ---

    def _prepare(self, job: Job) -> _Active:
        peer = job.peer
        session = peer.descriptor.mooncake_session
        if session is None:
            raise TransportUnavailable(f"{peer.segment!r} does not run Mooncake (start it with transport='mooncake')")
        requests = []
        for piece in job.pieces:
            info = peer.descriptor.region(piece.remote_id)
            if info is None or info.addr is None:
                raise TransferRefused(f"{peer.segment!r}: unknown region {piece.remote_id}")
            problem = range_problem(info.size, info.id, piece.remote_offset, piece.length,
                                    writing=job.op is TransferOp.WRITE, readonly=info.readonly)
            if problem:
                raise TransferRefused(f"{peer.segment!r}: {job.op.value} refused: {problem}")
            requests.append((piece.local.addr + piece.local_offset, info.addr + piece.remote_offset, piece.length))
        return _Active(job, requests, self._opcodes[job.op], session)

    def _run(self) -> None:
        delay = _POLL_MIN_S
        while True:
            with self._cond:
                if self._closed:
                    return
                incoming = list(self._incoming)
                self._incoming.clear()
            for job in incoming:
                try:
                    self._active.append(self._prepare(job))
                except (TransferRefused, TransportUnavailable) as exc:
                    job.handle._fail(exc)
            progressed = bool(incoming)
            for active in list(self._active):
                progressed |= self._step(active)
            self._orphans = [bid for bid in self._orphans
                             if self._engine.transfer_check_status(bid) == _STATUS_PENDING]
            if progressed:
                delay = _POLL_MIN_S
                continue
            with self._cond:
                if not self._incoming and not self._closed:
                    self._cond.wait(delay if (self._active or self._orphans) else None)
            delay = min(delay * 2, _POLL_MAX_S)

    def _step(self, active: _Active) -> bool:
        """Poll and submit one batch's requests; True if anything changed."""
        handle = active.job.handle
        progressed = False
        if not handle.done():
            progressed = self._poll(active)
        if handle.done():  # failed, cancelled or timed out: stop submitting; poll leftovers in the background
            self._orphans.extend(bid for bid, _ in active.outstanding)
            self._active.remove(active)
            return True
        window = self.config.mooncake_window_bytes
        while active.next < len(active.requests) and (not active.outstanding or active.outstanding_bytes < window):
            if active.next == 0 and not handle._start():
                return progressed
            local, remote, n = active.requests[active.next]
            bid = self._engine.batch_transfer_async(active.session, [local], [remote], [n], active.opcode)
            if bid == 0:
                handle._fail(PeerDisconnected(f"Mooncake could not submit a {n}-byte {active.job.op.value} "
                                              f"to {active.session} (peer unreachable?)"))
                return self._step(active)
            active.outstanding.append((bid, n))
            active.next += 1
            progressed = True
        if active.next == len(active.requests) and not active.outstanding:
            handle._part_done()
            self._active.remove(active)
            progressed = True
        return progressed

    def _poll(self, active: _Active) -> bool:
        """Collect finished requests; fail the batch on the first failed one."""
        still = []
        for bid, n in active.outstanding:
            status = self._engine.transfer_check_status(bid)
            if status == _STATUS_PENDING:
                still.append((bid, n))
            elif status != _STATUS_DONE:
                timed_out = status == _STATUS_TIMEOUT
                active.job.handle._fail((TransferTimeout if timed_out else PeerDisconnected)(
                    f"Mooncake {'timed out on' if timed_out else 'failed'} a {n}-byte {active.job.op.value} "
                    f"to {active.session} (peer gone or unreachable; see Mooncake's log)"))
        changed = len(still) != len(active.outstanding)
        active.outstanding = still
        return changed
