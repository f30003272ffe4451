"""The TCP wire protocol: a fixed binary frame header, entry tables, the authenticated
handshake, and zero-copy send/receive helpers.

Every frame starts with a 28-byte little-endian header::

    magic   4s   b"HMTE"
    version u8   PROTOCOL_VERSION
    kind    u8   FrameKind
    status  u16  Status (replies), 0 in requests
    body    u32  length of the structured body that follows the header
    frame   u64  frame id, echoed by the reply
    payload u64  raw bytes following the body (write data, read data)

WRITE and READ bodies are tables of 24-byte entries (region id u64, offset u64,
length u64); a WRITE's payload is the entries' bytes back to back.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import socket
import struct
from dataclasses import dataclass
from typing import Sequence

from .errors import ProtocolError

MAGIC = b"HMTE"
PROTOCOL_VERSION = 1
HEADER = struct.Struct("<4sBBHIQQ")
ENTRY = struct.Struct("<QQQ")
NONCE_BYTES = 16
MAC_BYTES = 32
MAX_BODY_BYTES = 4 << 20  # larger bodies are a protocol error
MAX_IOV = 512  # buffers per sendmsg/recvmsg_into call (below Linux's IOV_MAX of 1024)


class FrameKind(enum.IntEnum):
    SERVER_HELLO = 1  # server -> client: body = nonce + auth-required flag
    CLIENT_HELLO = 2  # client -> server: body = HMAC(token, nonce + segment) + segment
    WELCOME = 3  # server -> client: status, body = descriptor (OK) or reason
    WRITE = 4  # client -> server: body = entries, payload = data
    READ = 5  # client -> server: body = entries
    ACK = 6  # server -> client: reply to WRITE; body = reason when refused
    READ_DATA = 7  # server -> client: reply to READ; payload = data when OK, body = reason else


class Status(enum.IntEnum):
    OK = 0
    REFUSED = 1  # unknown region, out of bounds, read-only: nothing was touched
    UNAUTHENTICATED = 2
    PROTOCOL_ERROR = 3
    VERSION_MISMATCH = 4


_KINDS = {k.value: k for k in FrameKind}  # dict lookups: cheaper than calling the enums
_STATUSES = {s.value: s for s in Status}


@dataclass(frozen=True, slots=True)
class Header:
    kind: FrameKind
    status: Status
    body_len: int
    frame_id: int
    payload_len: int


@dataclass(frozen=True)
class WireEntry:
    region_id: int
    offset: int
    length: int


def pack_header(kind: FrameKind, frame_id: int = 0, body_len: int = 0, payload_len: int = 0,
                status: Status = Status.OK) -> bytes:
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, kind, status, body_len, frame_id, payload_len)


def unpack_header(raw: bytes | bytearray | memoryview) -> Header:
    magic, version, kind, status, body_len, frame_id, payload_len = HEADER.unpack(raw)
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {bytes(magic)!r}: the peer is not a halfmoon transfer engine")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"peer speaks protocol version {version}, this engine speaks {PROTOCOL_VERSION}")
    if body_len > MAX_BODY_BYTES:
        raise ProtocolError(f"frame body of {body_len} bytes exceeds the {MAX_BODY_BYTES}-byte limit")
    try:
        return Header(_KINDS[kind], _STATUSES[status], body_len, frame_id, payload_len)
    except KeyError as exc:
        raise ProtocolError(f"unknown frame kind {kind} or status {status}") from exc


def pack_entries(entries: Sequence[WireEntry]) -> bytes:
    return b"".join(ENTRY.pack(e.region_id, e.offset, e.length) for e in entries)


def unpack_entries(body: bytes) -> list[WireEntry]:
    if len(body) % ENTRY.size:
        raise ProtocolError(f"entry table of {len(body)} bytes is not a multiple of {ENTRY.size}")
    return [WireEntry(*fields) for fields in ENTRY.iter_unpack(body)]


def auth_mac(token: str | None, nonce: bytes, segment: str) -> bytes:
    """What a client proves it knows the token with (all zeros when it has none)."""
    if token is None:
        return bytes(MAC_BYTES)
    return hmac.new(token.encode(), nonce + segment.encode(), hashlib.sha256).digest()


def mac_ok(token: str | None, nonce: bytes, segment: str, mac: bytes) -> bool:
    return token is None or hmac.compare_digest(auth_mac(token, nonce, segment), mac)


# --- socket helpers: every payload byte goes straight between a region and the kernel ---


class ConnectionClosed(ConnectionError):
    """The peer closed the connection."""


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    recv_into_all(sock, [memoryview(buf)])
    return buf


def recv_frame(sock: socket.socket) -> tuple[Header, bytes]:
    raw = bytearray(HEADER.size)
    got = sock.recv_into(raw, HEADER.size, socket.MSG_WAITALL)
    if got != HEADER.size:
        if got == 0:
            raise ConnectionClosed("connection closed by the peer")
        recv_into_all(sock, [memoryview(raw)[got:]])
    header = unpack_header(raw)
    body = bytes(recv_exact(sock, header.body_len)) if header.body_len else b""
    return header, body


def send_all(sock: socket.socket, buffers: Sequence[bytes | memoryview]) -> None:
    """Send every buffer, in order, with as few system calls as the kernel allows."""
    pending = [memoryview(b) for b in buffers if len(b)]
    i = 0
    while i < len(pending):
        sent = sock.sendmsg(pending[i:i + MAX_IOV])
        while sent:
            n = pending[i].nbytes
            if sent >= n:
                sent -= n
                i += 1
            else:
                pending[i] = pending[i][sent:]
                sent = 0


def recv_into_all(sock: socket.socket, buffers: Sequence[memoryview]) -> None:
    """Fill every buffer, in order, straight from the socket (no intermediate copy)."""
    pending = [b for b in buffers if b.nbytes]
    i = 0
    while i < len(pending):
        if len(pending) - i == 1:
            got = sock.recv_into(pending[i], pending[i].nbytes, socket.MSG_WAITALL)
        else:
            got = sock.recvmsg_into(pending[i:i + MAX_IOV], 0, socket.MSG_WAITALL)[0]
        if got == 0:
            raise ConnectionClosed("connection closed by the peer")
        while got:
            n = pending[i].nbytes
            if got >= n:
                got -= n
                i += 1
            else:
                pending[i] = pending[i][got:]
                got = 0


def discard(sock: socket.socket, n: int, scratch: memoryview) -> None:
    """Read and drop n bytes (the payload of a refused write) to keep the stream in step."""
    while n:
        got = sock.recv_into(scratch, min(n, scratch.nbytes))
        if got == 0:
            raise ConnectionClosed("connection closed by the peer")
        n -= got


def tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def shutdown(sock: socket.socket) -> None:
    """Wake every thread blocked on the socket (close alone would not)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # not connected, or already shut down: nothing to wake
