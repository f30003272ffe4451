"""The shared-memory transport, for peers on the same host.

A peer's shm-backed regions (`TransferEngine.allocate_tensor`) are POSIX shared-memory
segments; this transport maps them into our process once (MAP_POPULATE, so later copies
take no page faults) and moves a batch with plain memory copies on one worker thread.
The bytes are in the receiver's memory the moment a copy returns, so DONE needs no
acknowledgement. Bounds come from the peer's descriptor, which its handshake vouched for.
"""

from __future__ import annotations

import collections
import threading

import numpy as np

from .config import EngineConfig
from .errors import EngineClosed, TransferRefused, TransportUnavailable

SMALL_COPY = 1 << 20  # pieces up to this size are copied through memoryviews
from .memory import ShmSegment
from .records import TransferOp, TransportKind
from .transport import Job, Peer, Transport


class ShmTransport(Transport):
    kind = TransportKind.SHM

    def __init__(self, segment: str, config: EngineConfig) -> None:
        self.segment = segment
        self.config = config
        self._cond = threading.Condition()
        self._jobs: collections.deque[Job] = collections.deque()
        self._segments: dict[str, ShmSegment] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"{segment}-shm-copy", daemon=True)
        self._thread.start()

    def attach(self, peer: Peer, region_id: int) -> ShmSegment:
        """The mapping of a peer region, mapped on first use."""
        info = peer.descriptor.region(region_id)
        if info is None or info.shm_name is None:
            raise TransportUnavailable(f"region {region_id} of {peer.segment!r} is not in shared memory")
        seg = self._segments.get(info.shm_name)  # a dict read needs no lock
        if seg is None:
            try:
                seg = ShmSegment.attach(info.shm_name, info.size)
            except OSError as exc:
                raise TransportUnavailable(
                    f"cannot map region {region_id} of {peer.segment!r} (shm {info.shm_name}): {exc}") from exc
            with self._cond:
                seg = self._segments.setdefault(info.shm_name, seg)
        return seg

    def forget(self, peer: Peer) -> None:
        """Drop our mappings of a peer's segments (its memory is freed once nobody maps it)."""
        with self._cond:
            for info in peer.descriptor.regions:
                if info.shm_name is not None:
                    self._segments.pop(info.shm_name, None)

    def submit(self, job: Job) -> None:
        if job.handle.nbytes <= self.config.inline_max_bytes:
            self._execute(job)  # small: copy right here, no hand-off
            return
        with self._cond:
            if self._closed:
                raise EngineClosed(f"engine {self.segment!r} is closed")
            self._jobs.append(job)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            jobs = list(self._jobs)
            self._jobs.clear()
            self._cond.notify()
        for job in jobs:
            job.handle._fail(EngineClosed(f"engine {self.segment!r} closed with this batch queued"))
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        with self._cond:
            self._segments.clear()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = self._jobs.popleft()
            self._execute(job)

    def _execute(self, job: Job) -> None:
        try:
            self._copy(job)
        except (TransportUnavailable, TransferRefused) as exc:
            job.handle._fail(exc)

    def _copy(self, job: Job) -> None:
        """Copy a batch the engine has checked against the peer's descriptor."""
        handle, peer = job.handle, job.peer
        attach = self.attach
        targets = [attach(peer, piece.remote_id) for piece in job.pieces]
        if not handle._start():
            return  # cancelled or timed out while queued
        writing = job.op is TransferOp.WRITE
        chunk = self.config.shm_copy_chunk_bytes
        for piece, remote in zip(job.pieces, targets):
            if piece.length <= SMALL_COPY:  # memoryview copies cost less to set up
                local_view = piece.local.view[piece.local_offset:piece.local_offset + piece.length]
                far_view = remote.view[piece.remote_offset:piece.remote_offset + piece.length]
                if writing:
                    far_view[:] = local_view
                else:
                    local_view[:] = far_view
                continue
            for start in range(0, piece.length, chunk):
                if handle.done():
                    return  # cancelled or timed out: stop between chunks
                n = min(chunk, piece.length - start)
                local = piece.local.array[piece.local_offset + start:piece.local_offset + start + n]
                far = remote.array[piece.remote_offset + start:piece.remote_offset + start + n]
                if writing:  # numpy releases the GIL for copies this big
                    np.copyto(far, local)
                else:
                    np.copyto(local, far)
        handle._part_done()
