"""Bytes written or read between two processes arrive intact, for every batch shape and
both of our transports."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from transfer_engine import EngineConfig, PeerDescriptor, TransferState
from transfer_engine.testing import KV_BLOCK_BYTES, PeerProcess, digest, pattern

MiB = 1 << 20

TRANSPORTS = ["tcp", "shm"]


@pytest.fixture(params=TRANSPORTS)
def link(request, make_engine, remote: PeerProcess):
    """(engine, peer, remote process) with the engine forced onto one transport."""
    engine = make_engine(f"writer-{request.param}", transport=request.param)
    peer = engine.connect(remote.descriptor)
    assert peer.transport.value == request.param
    return engine, peer, remote


def test_single_large_write_lands_byte_for_byte(link):
    engine, peer, remote = link
    size = 24 * MiB + 123
    src = pattern(1, size + 7)
    local = engine.register(src)
    remote.fill_pattern(0, 99)
    before = pattern(99, remote.regions[0].size)

    handle = engine.write(peer, [(local, 7, remote.regions[0], 4096 + 5, size)], timeout=20)
    handle.wait(20)

    assert handle.poll() is TransferState.DONE
    expected = before.copy()
    expected[4096 + 5:4096 + 5 + size] = src[7:]
    assert remote.digest(0) == digest(expected)


def test_many_kv_block_writes_land_in_scattered_blocks(link):
    engine, peer, remote = link
    blocks = 40
    src = pattern(2, blocks * KV_BLOCK_BYTES)
    local = engine.register(src)
    remote.fill(0, 0, bytes(remote.regions[0].size))
    targets = np.random.default_rng(3).permutation(44)[:blocks]

    entries = [(local, i * KV_BLOCK_BYTES, remote.regions[0], int(b) * KV_BLOCK_BYTES, KV_BLOCK_BYTES)
               for i, b in enumerate(targets)]
    handle = engine.write(peer, entries, timeout=20)
    handle.wait(20)

    expected = np.zeros(remote.regions[0].size, dtype=np.uint8)
    for i, b in enumerate(targets):
        expected[b * KV_BLOCK_BYTES:(b + 1) * KV_BLOCK_BYTES] = src[i * KV_BLOCK_BYTES:(i + 1) * KV_BLOCK_BYTES]
    assert remote.digest(0) == digest(expected)
    assert handle.entries == blocks  # scattered targets: nothing to coalesce


def test_reads_copy_scattered_remote_ranges_into_local_memory(link):
    engine, peer, remote = link
    remote.fill_pattern(0, 5)
    theirs = pattern(5, remote.regions[0].size)
    dst = np.zeros(8 * MiB, dtype=np.uint8)
    local = engine.register(dst)
    ranges = [(0, 3 * MiB + 1, 1 * MiB), (1 * MiB, 0, 4096), (2 * MiB, 17 * MiB, 5 * MiB + 3), (8 * MiB - 1, 31, 1)]

    engine.read(peer, [(local, lo, remote.regions[0], ro, n) for lo, ro, n in ranges], timeout=20).wait(20)

    expected = np.zeros_like(dst)
    for lo, ro, n in ranges:
        expected[lo:lo + n] = theirs[ro:ro + n]
    assert np.array_equal(dst, expected)


def test_mixed_sizes_and_concurrent_reads_and_writes_from_threads(link):
    engine, peer, remote = link
    src = pattern(6, 16 * MiB)
    local = engine.register(src)
    remote.fill_pattern(0, 61)
    theirs = pattern(61, remote.regions[0].size)
    # four threads write 1 B .. 3 MiB pieces into disjoint 4 MiB slots of the remote region
    # while a fifth reads the region's upper half back, all in flight at once
    sizes = [1, 4096, KV_BLOCK_BYTES, 3 * MiB - 4097 - KV_BLOCK_BYTES, 65_537]
    readback = np.zeros(12 * MiB, dtype=np.uint8)
    back = engine.register(readback)
    errors: list[BaseException] = []

    def writer(slot: int) -> None:
        try:
            at, handles = 0, []
            for n in sizes:
                handles.append(engine.write(peer, [(local, slot * 4 * MiB + at, remote.regions[0], slot * 4 * MiB + at, n)]))
                at += n
            for h in handles:
                h.wait(20)
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    def reader() -> None:
        try:
            engine.read(peer, [(back, 0, remote.regions[0], 16 * MiB, 12 * MiB)]).wait(20)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(slot,)) for slot in range(4)] + [threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    assert not errors
    assert np.array_equal(readback, theirs[16 * MiB:28 * MiB])
    expected = theirs.copy()
    written = sum(sizes)
    for slot in range(4):
        expected[slot * 4 * MiB:slot * 4 * MiB + written] = src[slot * 4 * MiB:slot * 4 * MiB + written]
    assert remote.digest(0) == digest(expected)


def test_await_a_batch_in_asyncio(link):
    engine, peer, remote = link
    src = pattern(7, 2 * MiB)
    local = engine.register(src)

    async def go() -> TransferState:
        handle = engine.write(peer, [(local, 0, remote.regions[0], 0, 2 * MiB)])
        await handle
        return handle.poll()

    assert asyncio.run(go()) is TransferState.DONE
    assert remote.digest(0, 0, 2 * MiB) == digest(src)


def test_adjacent_entries_are_coalesced(link):
    engine, peer, remote = link
    src = pattern(8, 10 * KV_BLOCK_BYTES)
    local = engine.register(src)
    entries = [(local, i * KV_BLOCK_BYTES, remote.regions[0], (3 + i) * KV_BLOCK_BYTES, KV_BLOCK_BYTES)
               for i in range(10)]
    handle = engine.write(peer, entries)
    handle.wait(20)
    assert handle.entries == 1
    assert remote.digest(0, 3 * KV_BLOCK_BYTES, 10 * KV_BLOCK_BYTES) == digest(src)


def test_striped_write_over_several_connections(make_engine, remote):
    config = EngineConfig(streams=3, stripe_min_bytes=4 * MiB, max_frame_bytes=1 * MiB)
    engine = make_engine("striper", transport="tcp", config=config)
    peer = engine.connect(remote.descriptor.address)
    src = pattern(9, 30 * MiB + 11)
    local = engine.register(src)
    engine.write(peer, [(local, 0, remote.regions[0], 1, src.nbytes)]).wait(20)
    assert remote.digest(0, 1, src.nbytes) == digest(src)


def test_auto_uses_shm_for_shm_regions_and_tcp_for_plain_ones(make_engine, remote):
    engine = make_engine("auto", transport="auto")
    peer = engine.connect(PeerDescriptor.from_bytes(remote.descriptor.to_bytes()))
    src = pattern(10, MiB)
    local = engine.register(src)
    to_shm = engine.write(peer, [(local, 0, remote.regions[0], 0, MiB)])
    to_plain = engine.write(peer, [(local, 0, remote.regions[1], 0, MiB)])
    to_shm.wait(10)
    to_plain.wait(10)
    assert (to_shm.transport, to_plain.transport) == ("shm", "tcp")
    assert remote.digest(1, 0, MiB) == digest(src) == remote.digest(0, 0, MiB)


def test_tensor_regions_and_stats(make_engine, remote):
    torch = pytest.importorskip("torch")
    engine = make_engine("tensors", transport="tcp")
    peer = engine.connect(remote.descriptor)
    region, kv = engine.allocate_tensor((4, 30, 2, 16, 3, 64), torch.float32)
    assert region.size == 4 * KV_BLOCK_BYTES and kv.shape == (4, 30, 2, 16, 3, 64)
    kv.copy_(torch.randn(kv.shape))
    bf16 = torch.arange(1000, dtype=torch.bfloat16)
    small = engine.register(bf16)

    engine.write(peer, [(region, 0, remote.regions[0], 0, region.size),
                        (small, 0, remote.regions[0], region.size, small.size)]).wait(10)

    assert remote.read_bytes(0, 0, region.size) == kv.numpy().tobytes()
    assert remote.read_bytes(0, region.size, small.size) == bf16.view(torch.int16).numpy().tobytes()
    stats = engine.stats()
    assert (stats.batches_submitted, stats.batches_done, stats.batches_failed) == (1, 1, 0)
    assert stats.bytes_written == region.size + small.size
    assert stats.done_by_transport == {"tcp": 1}
    assert stats.latency_max_s > 0


def test_a_peer_on_another_host_gets_tcp_and_forced_shm_is_refused(make_engine, remote):
    from transfer_engine import TransportUnavailable

    auto = make_engine("elsewhere-auto", transport="auto")
    auto._host_id = "another-machine/boot/1"  # as if this engine ran on another host
    assert auto.connect(remote.descriptor).transport.value == "tcp"
    forced = make_engine("elsewhere-shm", transport="shm")
    forced._host_id = "another-machine/boot/1"
    with pytest.raises(TransportUnavailable, match="another host"):
        forced.connect(remote.descriptor)


def test_descriptors_carry_the_advertised_host(make_engine):
    from transfer_engine import TransferEngine

    with TransferEngine("named", host="127.0.0.1", transport="tcp", advertise_host="localhost") as named:
        assert named.descriptor().address == f"localhost:{named.port}"
        region, array = named.allocate_buffer(4096)
        visitor = make_engine("visitor", transport="tcp")
        peer = visitor.connect(PeerDescriptor.from_bytes(named.descriptor().to_bytes()))
        src = visitor.register(bytearray(b"x" * 4096))
        visitor.write(peer, [(src, 0, region, 0, 4096)]).wait(5)
        assert array.tobytes() == b"x" * 4096
