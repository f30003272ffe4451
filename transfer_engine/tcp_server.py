"""The receiving side of the TCP transport: accepts peers, authenticates them, and
serves their WRITE and READ frames straight into and out of registered regions.

Every request is checked against the region table before any byte moves: a write to an
unknown region, out of bounds, into a read-only region, or from a connection that has not
authenticated is refused and touches no memory."""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Callable

from . import protocol as wire
from .errors import ProtocolError
from .memory import LocalRegion, RegionTable
from .protocol import FrameKind, Status
from .stats import Counters

log = logging.getLogger(__name__)

DRAIN_CHUNK = 1 << 20


class TcpServer:
    def __init__(self, segment: str, host: str, port: int, token: str | None, regions: RegionTable,
                 describe: Callable[[], bytes], counters: Counters) -> None:
        self.segment = segment
        self._token = token
        self._regions = regions
        self._describe = describe
        self._counters = counters
        self._listener = socket.create_server((host, port), backlog=128, reuse_port=False)
        self.host, self.port = self._listener.getsockname()[:2]
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name=f"{segment}-accept", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            conns = list(self._conns)
        wire.shutdown(self._listener)
        self._listener.close()
        for conn in conns:
            wire.shutdown(conn)
        self._thread.join(timeout=5)

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, addr = self._listener.accept()
            except OSError:
                return  # listener closed
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._conns.add(conn)
            name = f"{self.segment}-serve-{addr[0]}:{addr[1]}"
            threading.Thread(target=self._serve, args=(conn,), name=name, daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        peer = "unknown peer"
        try:
            wire.tune(conn)
            peer = self._handshake(conn)
            if peer:
                _Session(conn, self._regions, self._counters).run()
        except (OSError, wire.ConnectionClosed):
            pass  # the peer went away: nothing to answer
        except ProtocolError as exc:
            log.warning("%s: dropping %s: %s", self.segment, peer, exc)
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _handshake(self, conn: socket.socket) -> str | None:
        """Authenticate the client; its segment name, or None when refused."""
        nonce = os.urandom(wire.NONCE_BYTES)
        flag = b"\x01" if self._token is not None else b"\x00"
        wire.send_all(conn, [wire.pack_header(FrameKind.SERVER_HELLO, body_len=len(nonce) + 1), nonce + flag])
        header, body = wire.recv_frame(conn)
        if header.kind is not FrameKind.CLIENT_HELLO or len(body) < wire.MAC_BYTES:
            self._counters.add("requests_refused")
            self._refuse_hello(conn, Status.UNAUTHENTICATED,
                               f"segment {self.segment!r} refused a {header.kind.name} frame from a connection "
                               "that has not authenticated")
            return None
        mac, segment = body[:wire.MAC_BYTES], body[wire.MAC_BYTES:].decode(errors="replace")
        if not wire.mac_ok(self._token, nonce, segment, mac):
            self._counters.add("requests_refused")
            self._refuse_hello(conn, Status.UNAUTHENTICATED,
                               f"segment {self.segment!r} refused {segment!r}: wrong or missing token")
            return None
        desc = self._describe()
        wire.send_all(conn, [wire.pack_header(FrameKind.WELCOME, body_len=len(desc)), desc])
        return segment

    def _refuse_hello(self, conn: socket.socket, status: Status, reason: str) -> None:
        msg = reason.encode()
        wire.send_all(conn, [wire.pack_header(FrameKind.WELCOME, status=status, body_len=len(msg)), msg])
        log.info("%s: %s", self.segment, reason)


class _Session:
    """Serves one authenticated connection, frame after frame."""

    def __init__(self, conn: socket.socket, regions: RegionTable, counters: Counters) -> None:
        self._conn = conn
        self._regions = regions
        self._counters = counters
        self._scratch: memoryview | None = None

    def run(self) -> None:
        while True:
            header, body = wire.recv_frame(self._conn)
            if header.kind is FrameKind.WRITE:
                self._write(header, wire.unpack_entries(body))
            elif header.kind is FrameKind.READ:
                self._read(header, wire.unpack_entries(body))
            else:
                self._reply(FrameKind.ACK, header.frame_id, Status.PROTOCOL_ERROR,
                            f"unexpected {header.kind.name} frame after the handshake")
                raise ProtocolError(f"unexpected {header.kind.name} frame")

    def _check(self, entries: list[wire.WireEntry], writing: bool) -> tuple[list[LocalRegion], str | None]:
        regions = []
        for entry in entries:
            region, problem = self._regions.check(entry.region_id, entry.offset, entry.length, writing=writing)
            if region is None:
                return [], problem
            regions.append(region)
        if not entries:
            return [], "empty entry table"
        return regions, None

    def _write(self, header: wire.Header, entries: list[wire.WireEntry]) -> None:
        total = sum(e.length for e in entries)
        if total != header.payload_len:
            raise ProtocolError(f"write frame carries {header.payload_len} payload bytes, its entries add up to {total}")
        regions, problem = self._check(entries, writing=True)
        if problem is not None:
            if self._scratch is None:
                self._scratch = memoryview(bytearray(DRAIN_CHUNK))
            wire.discard(self._conn, header.payload_len, self._scratch)
            self._counters.add("requests_refused")
            self._reply(FrameKind.ACK, header.frame_id, Status.REFUSED, f"write refused: {problem}")
            return
        views = [r.view[e.offset:e.offset + e.length] for r, e in zip(regions, entries)]
        wire.recv_into_all(self._conn, views)
        self._counters.add("bytes_received", total)
        self._reply(FrameKind.ACK, header.frame_id, Status.OK, "")

    def _read(self, header: wire.Header, entries: list[wire.WireEntry]) -> None:
        if header.payload_len:
            raise ProtocolError(f"read frame carries {header.payload_len} payload bytes; reads carry none")
        regions, problem = self._check(entries, writing=False)
        if problem is not None:
            self._counters.add("requests_refused")
            self._reply(FrameKind.READ_DATA, header.frame_id, Status.REFUSED, f"read refused: {problem}")
            return
        total = sum(e.length for e in entries)
        views = [r.view[e.offset:e.offset + e.length] for r, e in zip(regions, entries)]
        wire.send_all(self._conn, [wire.pack_header(FrameKind.READ_DATA, header.frame_id, payload_len=total), *views])
        self._counters.add("bytes_served", total)

    def _reply(self, kind: FrameKind, frame_id: int, status: Status, reason: str) -> None:
        msg = reason.encode()
        wire.send_all(self._conn, [wire.pack_header(kind, frame_id, body_len=len(msg), status=status), msg])

