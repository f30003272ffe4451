"""Run a transfer engine in another process and drive it: for tests and benchmarks here
and in the layers above (the serving layer's tests can use it as a remote peer).

    with PeerProcess(PeerSpec(region_sizes=(1 << 20,))) as remote:
        peer = engine.connect(remote.descriptor)
        engine.write(peer, [(src, 0, remote.regions[0], 0, 4096)]).wait()
        assert remote.read_bytes(0, 0, 4096) == bytes(src_array[:4096])

The child is started with multiprocessing's `spawn` context and driven over a pipe.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from .config import EngineConfig
from .engine import TransferEngine
from .memory import unlink_segment
from .records import EngineStats, PeerDescriptor, Region

KV_BLOCK_BYTES = 30 * 2 * 16 * 3 * 64 * 4  # SmolLM2-135M: layers x (K, V) x tokens x kv heads x head dim x fp32


@dataclass(frozen=True)
class PeerSpec:
    segment: str = "peer"
    host: str = "127.0.0.1"
    port: int = 0
    token: str | None = None
    transport: str = "auto"
    region_sizes: tuple[int, ...] = (1 << 20,)
    plain_regions: tuple[int, ...] = ()  # indices registered from np.zeros (not shm-backed)
    config: EngineConfig | None = None


def pattern(seed: int, nbytes: int) -> np.ndarray:
    """Deterministic pseudo-random bytes, the same in every process."""
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def digest(data: np.ndarray | bytes | memoryview) -> str:
    return hashlib.blake2b(memoryview(data).cast("B"), digest_size=16).hexdigest()


class PeerError(RuntimeError):
    """The peer process failed a command or did not answer in time."""


class PeerProcess:
    def __init__(self, spec: PeerSpec) -> None:
        self.spec = spec
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_child_main, args=(spec, child), name=f"te-peer-{spec.segment}", daemon=True)
        self._child_conn = child
        self.descriptor: PeerDescriptor | None = None
        self.regions: list[Region] = []

    def __enter__(self) -> PeerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        if self._proc.pid is None:
            raise PeerError("peer process not started")
        return self._proc.pid

    def start(self, timeout: float = 60.0) -> PeerProcess:
        self._proc.start()
        self._child_conn.close()
        reply = self._receive(timeout)
        self.descriptor = PeerDescriptor.from_bytes(reply[0])
        self.regions = [Region(rid, size, self.descriptor.segment) for rid, size in reply[1]]
        return self

    def call(self, command: str, *args: Any, timeout: float = 60.0) -> Any:
        try:
            self._conn.send((command, args))
        except (OSError, EOFError) as exc:
            raise PeerError(f"peer process {self.spec.segment!r} is gone: {exc}") from exc
        return self._receive(timeout)

    def _receive(self, timeout: float) -> Any:
        if not self._conn.poll(timeout):
            raise PeerError(f"peer process {self.spec.segment!r} did not answer within {timeout}s")
        try:
            ok, value = self._conn.recv()
        except (OSError, EOFError) as exc:
            raise PeerError(f"peer process {self.spec.segment!r} is gone: {exc}") from exc
        if not ok:
            raise PeerError(f"peer process {self.spec.segment!r} failed: {value}")
        return value

    def fill(self, index: int, offset: int, data: bytes) -> None:
        self.call("fill", index, offset, bytes(data))

    def fill_pattern(self, index: int, seed: int) -> None:
        """Fill the whole region with `pattern(seed, size)`."""
        self.call("fill_pattern", index, seed)

    def read_bytes(self, index: int, offset: int, length: int) -> bytes:
        return self.call("read", index, offset, length)

    def digest(self, index: int, offset: int = 0, length: int | None = None) -> str:
        return self.call("digest", index, offset, length)

    def stats(self) -> EngineStats:
        return self.call("stats")

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL the peer (by its pid), reap it, and unlink the shared memory it left."""
        if self._proc.is_alive():
            os.kill(self.pid, signal.SIGKILL)
        self._proc.join(timeout=10)
        self._conn.close()
        for info in self.descriptor.regions if self.descriptor else ():
            if info.shm_name is not None:
                unlink_segment(info.shm_name)

    def stop(self, timeout: float = 10.0) -> None:
        """Close the peer's engine and let it exit; kill it if it does not."""
        if self._proc.is_alive():
            try:
                os.kill(self.pid, signal.SIGCONT)  # in case a test left it paused
                self._conn.send(("exit", ()))
            except (OSError, EOFError):
                pass  # already gone: the join below reaps it
            self._proc.join(timeout)
        if self._proc.is_alive():
            self.kill()
        self._proc.join(timeout=10)
        self._conn.close()


def _child_main(spec: PeerSpec, conn: Connection) -> None:
    engine = TransferEngine(spec.segment, spec.host, spec.port, spec.token, spec.transport, spec.config)
    arrays: list[np.ndarray] = []
    regions: list[Region] = []
    try:
        for index, size in enumerate(spec.region_sizes):
            if index in spec.plain_regions:
                array = np.zeros(size, dtype=np.uint8)
                region = engine.register(array)
            else:
                region, array = engine.allocate_buffer(size)
            arrays.append(array)
            regions.append(region)
        conn.send((True, (engine.descriptor().to_bytes(), [(r.id, r.size) for r in regions])))
        while True:
            try:
                command, args = conn.recv()
            except EOFError:
                return
            if command == "exit":
                return
            try:
                conn.send((True, _run(engine, arrays, command, args)))
            except Exception as exc:  # report to the driver rather than dying silently
                conn.send((False, f"{command}{args[:2]!r}: {exc!r}"))
    finally:
        engine.close()


def _run(engine: TransferEngine, arrays: list[np.ndarray], command: str, args: tuple[Any, ...]) -> Any:
    if command == "fill":
        index, offset, data = args
        arrays[index][offset:offset + len(data)] = np.frombuffer(data, dtype=np.uint8)
        return None
    if command == "fill_pattern":
        index, seed = args
        arrays[index][:] = pattern(seed, arrays[index].nbytes)
        return None
    if command == "read":
        index, offset, length = args
        return arrays[index][offset:offset + length].tobytes()
    if command == "digest":
        index, offset, length = args
        end = arrays[index].nbytes if length is None else offset + length
        return digest(arrays[index][offset:end])
    if command == "stats":
        return engine.stats()
    raise ValueError(f"unknown peer command {command!r}")
