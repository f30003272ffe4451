"""Requests a receiver must refuse (out of bounds, unknown region, read-only region,
unauthenticated peer) are refused with an error and leave every registered byte as it
was. Malformed requests from our own side are rejected before anything is sent."""

from __future__ import annotations

import socket
from typing import Iterator

import numpy as np
import pytest

from transfer_engine import (
    AuthenticationError,
    InvalidTransfer,
    TransferRefused,
    TransferState,
)
from transfer_engine import protocol as wire
from transfer_engine.protocol import FrameKind, Status, WireEntry
from transfer_engine.testing import PeerProcess, PeerSpec, pattern

MiB = 1 << 20
TOKEN = "s3cret-token"


class RawClient:
    """Speaks the wire protocol by hand, the way a buggy or hostile peer could."""

    def __init__(self, address: str, token: str | None = None, hello: bool = True, segment: str = "raw") -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=5)
        header, body = wire.recv_frame(self.sock)
        assert header.kind is FrameKind.SERVER_HELLO
        self.nonce = body[:wire.NONCE_BYTES]
        self.welcome: wire.Header | None = None
        if hello:
            self.hello(wire.auth_mac(token, self.nonce, segment) + segment.encode())

    def hello(self, body: bytes) -> tuple[wire.Header, bytes]:
        self.sock.sendall(wire.pack_header(FrameKind.CLIENT_HELLO, body_len=len(body)) + body)
        self.welcome, text = wire.recv_frame(self.sock)
        return self.welcome, text

    def write(self, entries: list[WireEntry], payload: bytes, frame_id: int = 1,
              payload_len: int | None = None) -> None:
        table = wire.pack_entries(entries)
        n = len(payload) if payload_len is None else payload_len
        self.sock.sendall(wire.pack_header(FrameKind.WRITE, frame_id, len(table), n) + table + payload)

    def reply(self) -> tuple[wire.Header, str]:
        header, body = wire.recv_frame(self.sock)
        return header, body.decode()

    def closed_by_peer(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def guarded() -> Iterator[PeerProcess]:
    """A peer that requires the shared token; region 0 shm-backed, region 1 plain."""
    with PeerProcess(PeerSpec(segment="guarded", token=TOKEN, region_sizes=(4 * MiB, MiB), plain_regions=(1,))) as p:
        yield p


def snapshot(peer: PeerProcess, seed: int) -> list[str]:
    """Fill every region with a known pattern; return their digests."""
    for index in range(len(peer.regions)):
        peer.fill_pattern(index, seed + index)
    return [peer.digest(i) for i in range(len(peer.regions))]


def unchanged(peer: PeerProcess, before: list[str]) -> bool:
    return [peer.digest(i) for i in range(len(peer.regions))] == before


# --- the receiver's own checks, against a peer that bypasses ours ---


@pytest.mark.parametrize("entries, reason", [
    ([WireEntry(1, 4 * MiB - 10, 100)], "out of bounds"),
    ([WireEntry(1, 0, 50), WireEntry(1, 4 * MiB - 10, 50)], "out of bounds"),  # one bad entry spoils the frame
    ([WireEntry(2, MiB, 1)], "out of bounds"),
    ([WireEntry(7, 0, 100)], "unknown region 7"),
])
def test_receiver_refuses_bad_writes_and_touches_nothing(guarded, entries, reason):
    before = snapshot(guarded, 10)
    refused_before = guarded.stats().requests_refused
    client = RawClient(guarded.descriptor.address, token=TOKEN)
    assert client.welcome.status is Status.OK
    payload = b"\xAA" * sum(e.length for e in entries)

    client.write(entries, payload, frame_id=41)
    header, text = client.reply()

    assert (header.kind, header.status, header.frame_id) == (FrameKind.ACK, Status.REFUSED, 41)
    assert reason in text
    assert unchanged(guarded, before)
    assert guarded.stats().requests_refused == refused_before + 1
    # the connection stays usable: a valid write on it lands
    client.write([WireEntry(1, 100, 3)], b"abc", frame_id=42)
    header, _ = client.reply()
    assert (header.status, header.frame_id) == (Status.OK, 42)
    assert guarded.read_bytes(0, 99, 5) == bytes(pattern(10, 4 * MiB)[99:100]) + b"abc" + bytes(pattern(10, 4 * MiB)[103:104])
    client.close()


def test_write_without_handshake_is_refused_and_connection_closed(guarded):
    before = snapshot(guarded, 20)
    client = RawClient(guarded.descriptor.address, hello=False)

    client.write([WireEntry(1, 0, 16)], b"")  # header and entry table only
    header, text = client.reply()

    assert (header.kind, header.status) == (FrameKind.WELCOME, Status.UNAUTHENTICATED)
    assert "not authenticated" in text
    assert client.closed_by_peer()
    assert unchanged(guarded, before)


def test_handshake_with_wrong_token_is_refused(guarded):
    client = RawClient(guarded.descriptor.address, token="not-the-token")
    assert client.welcome.status is Status.UNAUTHENTICATED
    assert client.closed_by_peer()


def test_payload_length_lies_drop_the_connection_without_writing(guarded):
    before = snapshot(guarded, 30)
    client = RawClient(guarded.descriptor.address, token=TOKEN)
    client.write([WireEntry(1, 0, 100)], b"\xBB" * 50, payload_len=50)  # entries claim 100 bytes
    assert client.closed_by_peer()
    assert unchanged(guarded, before)


# --- through the engine ---


def test_engine_with_wrong_or_no_token_cannot_connect(make_engine, guarded):
    with pytest.raises(AuthenticationError, match="wrong or missing token"):
        make_engine("intruder", token="guess").connect(guarded.descriptor)
    with pytest.raises(AuthenticationError):
        make_engine("tokenless").connect(guarded.descriptor.address)
    peer = make_engine("friend", transport="tcp", token=TOKEN).connect(guarded.descriptor)
    assert peer.segment == "guarded"


BAD_BATCHES = {
    # name: [(remote region index, remote offset, length), ...]
    "past the end": [(0, 4 * MiB - 100, 101)],
    "far past the end": [(0, 2**40, 1)],
    "one bad entry spoils the batch": [(0, 0, 10), (0, 4 * MiB - 5, 10)],
    "plain region past the end": [(1, MiB - 1, 2)],
}


@pytest.mark.parametrize("transport", ["tcp", "shm"])
@pytest.mark.parametrize("case", BAD_BATCHES)
def test_engine_write_out_of_bounds_fails_with_refused(make_engine, guarded, transport, case):
    if transport == "shm" and case.startswith("plain"):
        pytest.skip("plain regions are not reachable over shm")
    before = snapshot(guarded, 40)
    engine = make_engine("w", transport=transport, token=TOKEN)
    peer = engine.connect(guarded.descriptor)
    local = engine.register(np.ones(MiB, dtype=np.uint8))

    handle = engine.write(peer, [(local, 0, guarded.regions[i], off, n) for i, off, n in BAD_BATCHES[case]])

    with pytest.raises(TransferRefused, match="out of bounds"):
        handle.wait(10)
    assert handle.poll() is TransferState.FAILED
    assert unchanged(guarded, before)
    assert engine.stats().batches_failed == 1


def test_engine_write_to_unknown_region_fails_with_refused(make_engine, guarded):
    before = snapshot(guarded, 50)
    engine = make_engine("w", transport="tcp", token=TOKEN)
    peer = engine.connect(guarded.descriptor)
    local = engine.register(bytearray(64))
    with pytest.raises(TransferRefused, match="unknown region 9"):
        engine.write(peer, [(local, 0, 9, 0, 64)]).wait(10)
    assert unchanged(guarded, before)


def test_read_only_regions_refuse_writes_but_serve_reads(make_engine):
    owner = make_engine("owner", transport="tcp")
    frozen = owner.register(b"read-only bytes!")
    visitor = make_engine("visitor", transport="tcp")
    peer = visitor.connect(owner.address)
    scratch = bytearray(16)
    local = visitor.register(scratch)

    with pytest.raises(TransferRefused, match="read-only"):
        visitor.write(peer, [(local, 0, frozen.id, 0, 16)]).wait(5)
    visitor.read(peer, [(local, 0, frozen.id, 0, 16)]).wait(5)
    assert bytes(scratch) == b"read-only bytes!"

    client = RawClient(owner.address)  # the receiver refuses too, not only our precheck
    client.write([WireEntry(frozen.id, 0, 4)], b"XXXX")
    header, text = client.reply()
    assert header.status is Status.REFUSED and "read-only" in text
    client.close()


def test_invalid_local_requests_raise_before_sending(make_engine, guarded):
    engine = make_engine("w", transport="tcp", token=TOKEN)
    peer = engine.connect(guarded.descriptor)
    local = engine.register(np.zeros(1000, dtype=np.uint8))
    constant = engine.register(b"0123456789")
    remote = guarded.regions[0]
    with pytest.raises(InvalidTransfer, match="unknown local region 99"):
        engine.write(peer, [(99, 0, remote, 0, 10)])
    with pytest.raises(InvalidTransfer, match="out of bounds"):
        engine.write(peer, [(local, 995, remote, 0, 10)])
    with pytest.raises(InvalidTransfer, match="read-only"):
        engine.read(peer, [(constant, 0, remote, 0, 10)])
    with pytest.raises(InvalidTransfer, match="must be positive"):
        engine.write(peer, [(local, 0, remote, 0, 0)])
    with pytest.raises(InvalidTransfer, match="belongs to"):
        engine.write(peer, [(remote, 0, local, 0, 10)])
    with pytest.raises(InvalidTransfer, match="is \\(local_region"):
        engine.write(peer, [(local, 0, remote, 0)])
    assert engine.stats().batches_submitted == 0
