"""Transfer engine benchmark: GB/s of our TCP and shared-memory transports against a raw
socket, a plain memory copy and Mooncake's TCP protocol, measured side by side in one run.

    python -m bench.transfer --json OUT [--quick]        (or: halfmoon bench transfer ...)

Every transfer goes from this process into a peer process on loopback and counts only
once the receiver has the bytes (acknowledged, or copied into its shared memory). Shapes:
one contiguous transfer of 64 KiB, 1 MiB, 16 MiB and 256 MiB, and a KV-shaped batch of
256 SmolLM2 KV blocks (737,280 bytes each) scattered over the destination. Two modes:
"serial" waits for each transfer before the next; "stream" keeps `--depth` in flight.
For each cell the median of `--rounds` timed rounds is reported; the rounds of the
transports alternate, so their ratios share the machine's state.

Baselines: "raw_socket" is one plain connection doing sendall / recv_into a preallocated
buffer with a one-byte acknowledgement (for the KV batch, the same bytes as one
contiguous send); "memcpy" is numpy copying between two arrays of this process.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import multiprocessing
import os
import platform
import socket
import statistics
import struct
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from typing import Callable, Iterator, Protocol

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from bench import flags
from transfer_engine import EngineConfig, TransferEngine, mooncake_unavailable_reason
from transfer_engine.testing import KV_BLOCK_BYTES, PeerProcess, PeerSpec

KiB, MiB = 1 << 10, 1 << 20
SIZES = (64 * KiB, MiB, 16 * MiB, 256 * MiB)
QUICK_SIZES = (64 * KiB, MiB, 16 * MiB)
KV_BLOCKS, QUICK_KV_BLOCKS = 256, 32
TRANSPORTS = ("tcp", "raw_socket", "shm", "memcpy", "mooncake_tcp")
MODES = ("serial", "stream")

# (name, numerator, denominator, minimum, applies to) -- the targets
TARGETS = (
    ("tcp vs raw socket, >= 1 MiB", "tcp", "raw_socket", 0.9, lambda s: s.kind == "contiguous" and s.size_bytes >= MiB),
    ("tcp vs raw socket, KV batch", "tcp", "raw_socket", 0.7, lambda s: s.kind == "kv_batch"),
    ("shm vs memcpy", "shm", "memcpy", 0.5, lambda s: True),
    ("tcp vs mooncake tcp", "tcp", "mooncake_tcp", 1.3, lambda s: True),
)


@dataclass(frozen=True)
class Shape:
    kind: str  # "contiguous" | "kv_batch"
    size_bytes: int
    entries: int

    @property
    def label(self) -> str:
        if self.kind == "kv_batch":
            return f"KV {self.entries} blocks"
        return _human(self.size_bytes)


@dataclass(frozen=True)
class Row:
    transport: str
    size_bytes: int
    gb_per_s: float
    shape: str
    mode: str
    entries: int
    transfers: int


class Waiter(Protocol):
    def wait(self) -> None: ...


class Mover(Protocol):
    def start(self, shape: Shape) -> Waiter: ...


class _Done:
    def wait(self) -> None:
        return None


# --- movers ---


class EngineMover:
    """Writes through a TransferEngine into a peer process's region."""

    def __init__(self, engine: TransferEngine, descriptor, src: np.ndarray, kv_targets: np.ndarray) -> None:
        self.engine = engine
        self.peer = engine.connect(descriptor)
        self.src = engine.register(src)
        self.dst = self.peer.regions[0]
        self.kv_targets = kv_targets
        self._entries: dict[Shape, list[tuple]] = {}

    def entries(self, shape: Shape) -> list[tuple]:
        if shape not in self._entries:
            if shape.kind == "kv_batch":
                self._entries[shape] = [(self.src, i * KV_BLOCK_BYTES, self.dst, int(b) * KV_BLOCK_BYTES, KV_BLOCK_BYTES)
                                        for i, b in enumerate(self.kv_targets[:shape.entries])]
            else:
                self._entries[shape] = [(self.src, 0, self.dst, 0, shape.size_bytes)]
        return self._entries[shape]

    def start(self, shape: Shape) -> Waiter:
        handle = self.engine.write(self.peer, self.entries(shape), timeout=120)
        return _HandleWaiter(handle)


class _HandleWaiter:
    def __init__(self, handle) -> None:
        self.handle = handle

    def wait(self) -> None:
        self.handle.wait(120)


class RawSocketMover:
    """One plain TCP connection: sendall the bytes, recv_into a preallocated buffer on the
    other side, one-byte acknowledgement. A phase header (size, count) precedes each run
    of equal transfers, so the transfers themselves carry no framing at all."""

    def __init__(self, port: int, src: np.ndarray) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=120)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.view = memoryview(src)
        self._ack = bytearray(1)

    def begin(self, shape: Shape, count: int) -> None:
        self.sock.sendall(struct.pack("<QQ", shape.size_bytes, count))

    def start(self, shape: Shape) -> Waiter:
        self.sock.sendall(self.view[:shape.size_bytes])
        return self

    def wait(self) -> None:  # acknowledgements come back in order
        if self.sock.recv_into(self._ack, 1, socket.MSG_WAITALL) != 1:
            raise ConnectionError("raw receiver closed the connection")

    def close(self) -> None:
        self.sock.sendall(struct.pack("<QQ", 0, 0))
        self.sock.close()


class MemcpyMover:
    """numpy copies within this process: the limit every transport is bounded by."""

    def __init__(self, src: np.ndarray, kv_targets: np.ndarray) -> None:
        self.src = src
        self.dst = np.zeros_like(src)
        self.kv_targets = kv_targets

    def start(self, shape: Shape) -> Waiter:
        if shape.kind == "kv_batch":
            for i, b in enumerate(self.kv_targets[:shape.entries]):
                np.copyto(self.dst[b * KV_BLOCK_BYTES:(b + 1) * KV_BLOCK_BYTES],
                          self.src[i * KV_BLOCK_BYTES:(i + 1) * KV_BLOCK_BYTES])
        else:
            np.copyto(self.dst[:shape.size_bytes], self.src[:shape.size_bytes])
        return _Done()


def _raw_receiver(conn: Connection, capacity: int) -> None:
    """Peer process of the raw-socket baseline: recv_into one preallocated buffer."""
    buf = memoryview(np.zeros(capacity, dtype=np.uint8))
    with socket.create_server(("127.0.0.1", 0)) as server:
        conn.send(server.getsockname()[1])
        sock, _ = server.accept()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    phase = bytearray(16)
    with sock:
        while True:
            if sock.recv_into(phase, 16, socket.MSG_WAITALL) != 16:
                return
            n, count = struct.unpack("<QQ", phase)
            if n == 0:
                return
            for _ in range(count):
                view = buf[:n]
                while view.nbytes:
                    got = sock.recv_into(view, view.nbytes, socket.MSG_WAITALL)
                    if got == 0:
                        return
                    view = view[got:]
                sock.sendall(b"\x01")


# --- measuring ---


def measure_cell(movers: dict[str, Mover], shape: Shape, mode: str, depth: int, min_time: float,
                 rounds: int, on_round: Callable[[], None]) -> dict[str, tuple[float, int]]:
    """For each transport: GB/s (median of `rounds` timed rounds) and transfers timed.

    Rounds alternate between transports (in a rotating order) so that every transport
    is measured under the same background load."""
    run = _serial if mode == "serial" else _stream
    for mover in movers.values():
        run(mover, shape, depth, 2)  # warm-up: connections, page faults
    names = list(movers)
    rates: dict[str, list[float]] = {name: [] for name in names}
    counts = dict.fromkeys(names, 0)
    per_call = max(1, min(64, int(0.05e9 / shape.size_bytes)))  # about 50 ms of transfers per call
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            count, started = 0, time.perf_counter()
            while True:
                run(movers[name], shape, depth, per_call)
                count += per_call
                elapsed = time.perf_counter() - started
                if elapsed >= min_time and count >= 3:
                    break
            rates[name].append(count * shape.size_bytes / elapsed / 1e9)
            counts[name] += count
        on_round()
    return {name: (statistics.median(rates[name]), counts[name]) for name in names}


def _serial(mover: Mover, shape: Shape, depth: int, n: int) -> None:
    _begin(mover, shape, n)
    for _ in range(n):
        mover.start(shape).wait()


def _stream(mover: Mover, shape: Shape, depth: int, n: int) -> None:
    _begin(mover, shape, n)
    pending: collections.deque[Waiter] = collections.deque()
    for _ in range(n):
        if len(pending) >= depth:
            pending.popleft().wait()
        pending.append(mover.start(shape))
    while pending:
        pending.popleft().wait()


def _begin(mover: Mover, shape: Shape, n: int) -> None:
    begin: Callable[[Shape, int], None] | None = getattr(mover, "begin", None)
    if begin is not None:
        begin(shape, n)


# --- the run ---


@dataclass
class Setup:
    movers: dict[str, Mover]
    skipped: dict[str, str]


@contextlib.contextmanager
def stderr_to(path: str) -> Iterator[None]:
    """Send fd 2 (Mooncake's glog, and its peer process's) to a file for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def setup(transports: tuple[str, ...], capacity: int, kv_blocks: int, config: EngineConfig) -> Iterator[Setup]:
    src = np.random.default_rng(0).integers(0, 256, capacity, dtype=np.uint8)
    kv_targets = np.random.default_rng(1).permutation(capacity // KV_BLOCK_BYTES)[:kv_blocks]
    movers: dict[str, Mover] = {}
    skipped: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        peer_spec = PeerSpec(segment="bench-peer", region_sizes=(capacity,))
        if {"tcp", "shm"} & set(transports):
            remote = stack.enter_context(PeerProcess(peer_spec))
        if "tcp" in transports:
            engine = stack.enter_context(TransferEngine("bench-tcp", transport="tcp", config=config))
            movers["tcp"] = EngineMover(engine, remote.descriptor, src, kv_targets)
        if "raw_socket" in transports:
            ctx = multiprocessing.get_context("spawn")
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_raw_receiver, args=(child, capacity), daemon=True)
            proc.start()
            stack.callback(_reap, proc)
            raw = RawSocketMover(parent.recv(), src)
            stack.callback(raw.close)
            movers["raw_socket"] = raw
        if "shm" in transports:
            engine = stack.enter_context(TransferEngine("bench-shm", transport="shm", config=config))
            movers["shm"] = EngineMover(engine, remote.descriptor, src, kv_targets)
        if "memcpy" in transports:
            movers["memcpy"] = MemcpyMover(src, kv_targets)
        if "mooncake_tcp" in transports:
            reason = mooncake_unavailable_reason()
            if reason is not None:
                skipped["mooncake_tcp"] = reason
            else:
                moon_spec = PeerSpec(segment="bench-moon", transport="mooncake", region_sizes=(capacity,))
                moon_peer = stack.enter_context(PeerProcess(moon_spec))
                engine = stack.enter_context(TransferEngine("bench-moon-writer", transport="mooncake", config=config))
                movers["mooncake_tcp"] = EngineMover(engine, moon_peer.descriptor, src, kv_targets)
        yield Setup(movers, skipped)


def _reap(proc: multiprocessing.process.BaseProcess) -> None:
    proc.join(timeout=10)
    if proc.is_alive() and proc.pid is not None:
        os.kill(proc.pid, 9)
        proc.join(timeout=10)


def ratios(rows: list[Row]) -> list[dict]:
    by = {(r.transport, r.shape, r.size_bytes, r.mode): r.gb_per_s for r in rows}
    shapes = sorted({(r.shape, r.size_bytes, r.entries) for r in rows}, key=lambda s: (s[0] != "contiguous", s[1]))
    out = []
    for name, num, den, minimum, applies in TARGETS:
        for kind, size, entries in shapes:
            if not applies(Shape(kind, size, entries)):
                continue
            for mode in MODES:
                a, b = by.get((num, kind, size, mode)), by.get((den, kind, size, mode))
                if a is None or not b:
                    continue
                out.append({"target": name, "numerator": num, "denominator": den, "shape": kind,
                            "size_bytes": size, "mode": mode, "ratio": round(a / b, 3), "minimum": minimum,
                            "met": a / b >= minimum})
    return out


def render(console: Console, rows: list[Row], found: list[dict], skipped: dict[str, str]) -> None:
    transports = [t for t in TRANSPORTS if any(r.transport == t for r in rows)]
    by = {(r.transport, r.shape, r.size_bytes, r.mode): r.gb_per_s for r in rows}
    table = Table(title="Transfer engine, loopback, GB/s (median of rounds)")
    table.add_column("shape")
    table.add_column("mode")
    for t in transports:
        table.add_column(t, justify="right")
    for label in ("tcp/raw", "shm/memcpy", "tcp/mooncake"):
        table.add_column(label, justify="right")
    cells = sorted({(r.shape, r.size_bytes, r.entries, r.mode) for r in rows},
                   key=lambda c: (c[0] != "contiguous", c[1], MODES.index(c[3])))
    for kind, size, entries, mode in cells:
        values = [by.get((t, kind, size, mode)) for t in transports]
        row = [Shape(kind, size, entries).label, mode] + [f"{v:.2f}" if v is not None else "-" for v in values]
        for num, den, minimum in (("tcp", "raw_socket", 0.9 if kind == "contiguous" else 0.7),
                                  ("shm", "memcpy", 0.5), ("tcp", "mooncake_tcp", 1.3)):
            a, b = by.get((num, kind, size, mode)), by.get((den, kind, size, mode))
            if a is None or not b:
                row.append("-")
            else:
                checked = num != "tcp" or den != "raw_socket" or kind != "contiguous" or size >= MiB
                style = "" if not checked else ("green" if a / b >= minimum else "red")
                row.append(f"[{style}]{a / b:.2f}x[/{style}]" if style else f"{a / b:.2f}x")
        table.add_row(*row)
    console.print(table)
    met = sum(r["met"] for r in found)
    console.print(f"targets met: {met}/{len(found)} cells "
                  "(tcp >= 0.9x raw at >= 1 MiB, >= 0.7x on the KV batch; shm >= 0.5x memcpy; tcp >= 1.3x mooncake)")
    for transport, reason in skipped.items():
        console.print(f"[yellow]{transport} skipped:[/yellow] {reason}")


def _sizes(text: str) -> tuple[int, ...]:
    scale = {"K": KiB, "M": MiB, "G": 1 << 30}
    try:
        return tuple(int(t[:-1]) * scale[t[-1].upper()] if t[-1].upper() in scale else int(t)
                     for t in text.split(",") if t)
    except (ValueError, KeyError) as exc:
        raise argparse.ArgumentTypeError(f"sizes look like 64K,1M,256M, not {text!r}") from exc


def _human(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", KiB)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="halfmoon bench transfer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="OUT", help="write rows and ratios as JSON to OUT")
    parser.add_argument("--quick", action="store_true", help="smaller sizes and shorter rounds (a smoke run)")
    parser.add_argument("--sizes", type=_sizes, default=None,
                        help="comma-separated contiguous sizes, e.g. 64K,1M,256M (default: the issue's four)")
    parser.add_argument("--kv-blocks", type=flags.count(0), default=None, help="KV blocks in the KV-shaped batch (0: none)")
    parser.add_argument("--transports", default=",".join(TRANSPORTS), help=f"comma-separated subset of {TRANSPORTS}")
    parser.add_argument("--modes", default=",".join(MODES), help="serial, stream or both")
    parser.add_argument("--depth", type=flags.count(1), default=4, help="transfers in flight in stream mode")
    parser.add_argument("--min-time", type=flags.positive, default=None, help="seconds per timed round")
    parser.add_argument("--rounds", type=flags.count(1), default=5, help="timed rounds per transport and cell (median reported)")
    parser.add_argument("--streams", type=flags.count(1), default=EngineConfig.streams,
                        help="TCP connections per peer (EngineConfig.streams)")
    parser.add_argument("--stripe-min-mib", type=flags.count(1), default=EngineConfig.stripe_min_bytes // MiB,
                        help="stripe TCP batches at least this big (EngineConfig.stripe_min_bytes)")
    args = parser.parse_args(argv)

    transports = tuple(t for t in args.transports.split(",") if t)
    modes = tuple(m for m in args.modes.split(",") if m)
    unknown = (set(transports) - set(TRANSPORTS)) | (set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown transport or mode: {', '.join(sorted(unknown))}")
    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    kv_blocks = args.kv_blocks if args.kv_blocks is not None else (QUICK_KV_BLOCKS if args.quick else KV_BLOCKS)
    min_time = args.min_time if args.min_time is not None else (0.1 if args.quick else 0.3)
    shapes = [Shape("contiguous", s, 1) for s in sizes]
    if kv_blocks > 0:
        shapes.append(Shape("kv_batch", kv_blocks * KV_BLOCK_BYTES, kv_blocks))
    capacity = max(max(sizes), (kv_blocks + 8) * KV_BLOCK_BYTES)

    console = Console()
    if not console.is_terminal:
        console = Console(width=150)  # logs and pipes get the whole table
    rows: list[Row] = []
    log_path = (args.json + ".stderr.log") if args.json else os.path.join(tempfile.gettempdir(), "bench-transfer.stderr.log")
    console.print(f"transfer bench: {len(shapes)} shapes x {modes} x {transports}; "
                  f"peer processes' and Mooncake's stderr go to {log_path}")
    config = EngineConfig(streams=args.streams, stripe_min_bytes=args.stripe_min_mib * MiB)
    with stderr_to(log_path), setup(transports, capacity, kv_blocks, config) as ready:
        cells = [(shape, mode) for shape in shapes for mode in modes]
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("measuring", total=len(cells) * args.rounds)
            for shape, mode in cells:
                progress.update(task, description=f"{shape.label:>14} {mode}")
                results = measure_cell(ready.movers, shape, mode, args.depth, min_time, args.rounds,
                                       lambda: progress.advance(task))
                for transport, (gbps, count) in results.items():
                    rows.append(Row(transport, shape.size_bytes, round(gbps, 4), shape.kind, mode, shape.entries, count))
        skipped = ready.skipped

    found = ratios(rows)
    render(console, rows, found, skipped)
    if args.json:
        doc = {
            "rows": [asdict(r) for r in rows],
            "ratios": found,
            "skipped": skipped,
            "meta": {"quick": args.quick, "streams": args.streams, "stripe_min_bytes": config.stripe_min_bytes, "depth": args.depth, "rounds": args.rounds, "min_time_s": min_time,
                     "cpus": os.cpu_count(), "python": platform.python_version(), "kv_block_bytes": KV_BLOCK_BYTES},
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        console.print(f"wrote {len(rows)} rows to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
