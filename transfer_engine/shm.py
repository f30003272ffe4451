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
from .memory import ShmSegment, range_problem
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
        with self._cond:
            seg = self._segments.get(info.shm_name)
        if seg is None:
            try:
                seg = ShmSegment.attach(info.shm_name, info.size)
            except OSError as exc:
                raise TransportUnavailable(
                    f"cannot map region {region_id} of {peer.segment!r} (shm {info.shm_name}): {exc}") from exc
            with self._cond:
                seg = self._segments.setdefault(info.shm_name, seg)
        return seg

    def submit(self, job: Job) -> None:
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
            try:
                self._copy(job)
            except (TransportUnavailable, TransferRefused) as exc:
                job.handle._fail(exc)

    def _copy(self, job: Job) -> None:
        handle, peer = job.handle, job.peer
        writing = job.op is TransferOp.WRITE
        targets = []
        for piece in job.pieces:  # check everything before touching anything
            info = peer.descriptor.region(piece.remote_id)
            if info is None:
                raise TransferRefused(f"{peer.segment!r}: unknown region {piece.remote_id}")
            problem = range_problem(info.size, info.id, piece.remote_offset, piece.length,
                                    writing=writing, readonly=info.readonly)
            if problem:
                raise TransferRefused(f"{peer.segment!r}: {'write' if writing else 'read'} refused: {problem}")
            targets.append(self.attach(peer, piece.remote_id).array)
        if not handle._start():
            return  # cancelled or timed out while queued
        chunk = self.config.shm_copy_chunk_bytes
        for piece, remote in zip(job.pieces, targets):
            for start in range(0, piece.length, chunk):
                if handle.done():
                    return  # cancelled or timed out: stop between chunks
                n = min(chunk, piece.length - start)
                local = piece.local.array[piece.local_offset + start:piece.local_offset + start + n]
                far = remote[piece.remote_offset + start:piece.remote_offset + start + n]
                if writing:
                    np.copyto(far, local)
                else:
                    np.copyto(local, far)
        handle._part_done()
