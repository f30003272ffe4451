"""The sending side of the TCP transport.

Each peer gets a small pool of persistent connections (`_Link`). A connection
(`_Channel`) has a sender thread that streams frames back to back, header and payload
straight from the registered memory in one `sendmsg`, and a reader thread that matches
the peer's replies to frames in order (replies come back in frame order on a connection)
and, for reads, receives the data straight into the destination region. A batch is split
into frames of at most `max_frame_bytes`; batches of at least `stripe_min_bytes` are
striped across the pool. The batch is DONE when every frame is acknowledged.
"""

from __future__ import annotations

import collections
import logging
import socket
import threading
from dataclasses import dataclass, field

from . import protocol as wire
from .config import EngineConfig, MiB
from .errors import (
    AuthenticationError,
    EngineClosed,
    PeerDisconnected,
    PeerUnreachable,
    ProtocolError,
    TransferError,
    TransferRefused,
    TransferTimeout,
)
from .handle import TransferHandle
from .protocol import FrameKind, Status
from .records import PeerDescriptor, TransferOp, TransportKind
from .transport import Job, Peer, Piece, Transport

log = logging.getLogger(__name__)

MAX_FRAME_ENTRIES = 4096


def handshake(host: str, port: int, segment: str, token: str | None, timeout_s: float
              ) -> tuple[socket.socket, PeerDescriptor]:
    """Open an authenticated connection to a peer's listener; the socket and its descriptor."""
    where = f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as exc:
        raise PeerUnreachable(f"cannot connect to transfer engine at {where}: {exc}") from exc
    try:
        wire.tune(sock)
        header, body = wire.recv_frame(sock)
        if header.kind is not FrameKind.SERVER_HELLO or len(body) != wire.NONCE_BYTES + 1:
            raise ProtocolError(f"{where} opened with a {header.kind.name} frame instead of a server hello")
        nonce, needs_token = body[:wire.NONCE_BYTES], body[wire.NONCE_BYTES] == 1
        if needs_token and token is None:
            log.info("%s requires a token and this engine has none; the handshake will be refused", where)
        mac = wire.auth_mac(token, nonce, segment)
        hello = mac + segment.encode()
        wire.send_all(sock, [wire.pack_header(FrameKind.CLIENT_HELLO, body_len=len(hello)), hello])
        header, body = wire.recv_frame(sock)
        if header.kind is not FrameKind.WELCOME:
            raise ProtocolError(f"{where} answered the hello with a {header.kind.name} frame")
        if header.status is Status.UNAUTHENTICATED:
            raise AuthenticationError(f"handshake with {where} refused: {body.decode(errors='replace')}")
        if header.status is not Status.OK:
            raise TransferRefused(f"handshake with {where} refused ({header.status.name}): {body.decode(errors='replace')}")
        descriptor = PeerDescriptor.from_bytes(body)
        sock.settimeout(None)
        return sock, descriptor
    except (OSError, wire.ConnectionClosed) as exc:
        sock.close()
        raise PeerUnreachable(f"handshake with {where} failed: {exc}") from exc
    except BaseException:
        sock.close()
        raise


@dataclass(eq=False)
class _Frame:
    op: TransferOp
    handle: TransferHandle
    pieces: list[Piece]
    nbytes: int
    frame_id: int = 0
    views: list[memoryview] = field(default_factory=list)


def plan_frames(op: TransferOp, handle: TransferHandle, pieces: list[Piece], frame_bytes: int) -> list[_Frame]:
    """Cut a batch into frames of at most `frame_bytes` payload (splitting big pieces)."""
    frames: list[_Frame] = []
    current: list[Piece] = []
    size = 0
    for piece in pieces:
        offset = 0
        while offset < piece.length:
            take = min(piece.length - offset, frame_bytes - size)
            current.append(Piece(piece.local, piece.local_offset + offset, piece.remote_id,
                                 piece.remote_offset + offset, take))
            size += take
            offset += take
            if size >= frame_bytes or len(current) >= MAX_FRAME_ENTRIES:
                frames.append(_Frame(op, handle, current, size))
                current, size = [], 0
    if current:
        frames.append(_Frame(op, handle, current, size))
    return frames


class _Channel:
    """One persistent, authenticated connection to a peer, with its two threads."""

    def __init__(self, link: _Link, sock: socket.socket | None) -> None:
        self._link = link
        self._sock = sock
        self._cond = threading.Condition()
        self._queue: collections.deque[_Frame] = collections.deque()
        self._inflight: collections.deque[_Frame] = collections.deque()
        self._load = 0  # payload bytes queued or in flight
        self._error: TransferError | None = None
        self._next_id = 1
        self._send_lock = threading.Lock()  # whoever holds it writes frames to the socket
        self._threads = 1
        self._exited = 0
        name = f"{link.transport.segment}->{link.peer.segment}"
        self._name = name
        threading.Thread(target=self._send_loop, name=f"{name}-send", daemon=True).start()

    @property
    def alive(self) -> bool:
        return self._error is None

    @property
    def load(self) -> int:
        return self._load

    def enqueue(self, frames: list[_Frame]) -> TransferError | None:
        """Queue frames; the channel's error instead if it is dead."""
        with self._cond:
            if self._error is not None:
                return self._error
            self._queue.extend(frames)
            self._load += sum(f.nbytes for f in frames)
            self._cond.notify()
        return None

    def send_inline(self, frames: list[_Frame]) -> bool:
        """Send the frames from the calling thread if the connection is idle; False
        (nothing done) when it is busy, not connected yet, or dead."""
        sock = self._sock
        if sock is None or self._queue or self._error is not None or not self._send_lock.acquire(blocking=False):
            return False
        try:
            for frame in frames:
                if not self._post(frame):
                    if self._error is not None:
                        frame.handle._fail(self._error)
                    break
                self._send(sock, frame)
        except (OSError, wire.ConnectionClosed) as exc:
            self.abort(self._lost(exc))
        finally:
            self._send_lock.release()
        return True

    def _post(self, frame: _Frame) -> bool:
        """Number the frame and expect its reply (the send lock is held); False to skip
        it: its batch has ended (cancelled, timed out) or the connection is dead."""
        with self._cond:
            if self._error is not None or not frame.handle._start():
                return False
            frame.frame_id = self._next_id
            self._next_id += 1
            self._inflight.append(frame)
            self._load += frame.nbytes
            return True

    def carries(self, handle: TransferHandle) -> bool:
        with self._cond:
            return any(f.handle is handle for f in self._inflight)

    def abort(self, error: TransferError) -> None:
        """Kill the connection; every frame queued or in flight fails with `error`."""
        with self._cond:
            if self._error is not None:
                return
            self._error = error
            frames = list(self._inflight) + list(self._queue)
            self._inflight.clear()
            self._queue.clear()
            self._load = 0
            self._cond.notify_all()
            sock = self._sock
        if sock is not None:
            wire.shutdown(sock)
        for frame in frames:
            frame.handle._fail(error)

    def _lost(self, exc: BaseException) -> PeerDisconnected:
        return PeerDisconnected(f"connection to {self._link.peer.segment!r} at {self._link.peer.address} lost: {exc}")

    def _send_loop(self) -> None:
        try:
            sock = self._sock
            if sock is None:
                sock, descriptor = self._link.open()
                with self._cond:
                    self._sock = sock
                    aborted = self._error is not None
                if aborted:
                    wire.shutdown(sock)
                    return
                self._link.peer._update(descriptor)
            with self._cond:
                self._threads = 2
            threading.Thread(target=self._recv_loop, args=(sock,), name=f"{self._name}-recv", daemon=True).start()
            while True:
                with self._cond:
                    while not self._queue and self._error is None:
                        self._cond.wait()
                    if self._error is not None:
                        return
                    frame = self._queue.popleft()
                    self._load -= frame.nbytes
                with self._send_lock:
                    if self._post(frame):
                        self._send(sock, frame)
        except PeerUnreachable as exc:
            self.abort(PeerUnreachable(f"cannot open a connection to {self._link.peer.segment!r}: {exc}"))
        except TransferError as exc:
            self.abort(exc)
        except (OSError, wire.ConnectionClosed) as exc:
            self.abort(self._lost(exc))
        finally:
            self._exit()

    def _send(self, sock: socket.socket, frame: _Frame) -> None:
        pack = wire.ENTRY.pack
        table = b"".join([pack(p.remote_id, p.remote_offset, p.length) for p in frame.pieces])
        frame.views = [p.local_view() for p in frame.pieces]
        if frame.op is TransferOp.WRITE:
            header = wire.pack_header(FrameKind.WRITE, frame.frame_id, len(table), frame.nbytes)
            wire.send_all(sock, [header, table, *frame.views])
        else:
            header = wire.pack_header(FrameKind.READ, frame.frame_id, len(table), 0)
            wire.send_all(sock, [header, table])

    def _recv_loop(self, sock: socket.socket) -> None:
        try:
            while True:
                header, body = wire.recv_frame(sock)
                with self._cond:
                    frame = self._inflight[0] if self._inflight else None
                if frame is None or header.frame_id != frame.frame_id:
                    raise ProtocolError(f"{self._link.peer.address} replied to frame {header.frame_id}, "
                                        f"expected {frame.frame_id if frame else 'none'}")
                expected = FrameKind.ACK if frame.op is TransferOp.WRITE else FrameKind.READ_DATA
                if header.kind is not expected:
                    raise ProtocolError(f"{self._link.peer.address} replied {header.kind.name} to a {frame.op.value}")
                if header.kind is FrameKind.READ_DATA and header.status is Status.OK:
                    if header.payload_len != frame.nbytes:
                        raise ProtocolError(f"read reply carries {header.payload_len} bytes, {frame.nbytes} requested")
                    wire.recv_into_all(sock, frame.views)
                with self._cond:
                    if self._inflight and self._inflight[0] is frame:
                        self._inflight.popleft()
                        self._load -= frame.nbytes
                self._settle(frame, header.status, body)
        except TransferError as exc:
            self.abort(exc)
        except (OSError, wire.ConnectionClosed) as exc:
            self.abort(self._lost(exc))
        finally:
            self._exit()

    def _settle(self, frame: _Frame, status: Status, body: bytes) -> None:
        if status is Status.OK:
            frame.handle._part_done()
        elif status is Status.REFUSED:
            frame.handle._fail(TransferRefused(f"{self._link.peer.segment!r} at {self._link.peer.address}: "
                                               f"{body.decode(errors='replace')}"))
        else:
            raise ProtocolError(f"{self._link.peer.address} answered {status.name}: {body.decode(errors='replace')}")

    def _exit(self) -> None:
        with self._cond:
            self._exited += 1
            last = self._exited == self._threads
            sock = self._sock
        if last and sock is not None:
            sock.close()


class _Link:
    """The connection pool to one peer."""

    def __init__(self, transport: TcpTransport, peer: Peer) -> None:
        self.transport = transport
        self.peer = peer
        self._lock = threading.Lock()
        self._channels: list[_Channel] = []

    def open(self) -> tuple[socket.socket, PeerDescriptor]:
        t = self.transport
        return handshake(self.peer.host, self.peer.port, t.segment, t.token, t.config.connect_timeout_s)

    def adopt(self, sock: socket.socket) -> None:
        """Keep the connection `TransferEngine.connect` handshook on as the first channel."""
        with self._lock:
            self._channels = [c for c in self._channels if c.alive]
            if len(self._channels) < self.transport.config.streams:
                self._channels.append(_Channel(self, sock))
                return
        sock.close()  # the pool is full

    def channels(self, wanted: int) -> list[_Channel]:
        """The `wanted` least-loaded live channels, opening new ones (in their own
        threads) while the pool is short or every channel is busy."""
        with self._lock:
            self._channels = [c for c in self._channels if c.alive]
            limit = self.transport.config.streams
            while len(self._channels) < min(wanted, limit) or (
                len(self._channels) < limit and all(c.load > 0 for c in self._channels)
            ):
                self._channels.append(_Channel(self, None))
            return sorted(self._channels, key=lambda c: c.load)[:wanted]

    def abort(self, error: TransferError) -> None:
        with self._lock:
            channels, self._channels = self._channels, []
        for channel in channels:
            channel.abort(error)


class TcpTransport(Transport):
    kind = TransportKind.TCP

    def __init__(self, segment: str, token: str | None, config: EngineConfig) -> None:
        self.segment = segment
        self.token = token
        self.config = config
        self._lock = threading.Lock()
        self._links: dict[Peer, _Link] = {}
        self._closed = False

    def link(self, peer: Peer) -> _Link:
        with self._lock:
            if self._closed:
                raise EngineClosed(f"engine {self.segment!r} is closed")
            link = self._links.get(peer)
            if link is None:
                link = self._links[peer] = _Link(self, peer)
            return link

    def submit(self, job: Job) -> None:
        link = self.link(job.peer)
        total = sum(p.length for p in job.pieces)
        stripes = self.config.streams if total >= self.config.stripe_min_bytes else 1
        channels = link.channels(stripes)
        frame_bytes = self.config.max_frame_bytes
        if len(channels) > 1:
            frame_bytes = min(frame_bytes, max(MiB, -(-total // len(channels))))
        frames = plan_frames(job.op, job.handle, job.pieces, frame_bytes)
        job.handle._set_parts(len(frames))
        job.handle.add_done_callback(lambda h: self._ended(h, channels))
        if len(channels) == 1 and total <= self.config.inline_max_bytes and channels[0].send_inline(frames):
            return
        for i, channel in enumerate(channels):
            error = channel.enqueue(frames[i::len(channels)])
            if error is not None:
                job.handle._fail(error)
                return

    def forget(self, peer: Peer) -> None:
        with self._lock:
            link = self._links.pop(peer, None)
        if link is not None:
            link.abort(PeerDisconnected(f"{peer.segment!r} at {peer.address} was disconnected by this engine"))

    def _ended(self, handle: TransferHandle, channels: list[_Channel]) -> None:
        """A batch that timed out with data in flight leaves its connection in an unknown
        state (maybe stuck on a frozen peer): abort that connection."""
        if isinstance(handle.error, TransferTimeout):
            for channel in channels:
                if channel.carries(handle):
                    channel.abort(PeerDisconnected(
                        f"connection to {handle.peer} aborted: batch #{handle.id} timed out with data in flight on it"))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            links, self._links = list(self._links.values()), {}
        for link in links:
            link.abort(EngineClosed(f"engine {self.segment!r} closed with this batch in flight"))

