"""Failures end batches clearly and in time: a killed or frozen peer, a cancel, a closed
engine. A batch ends exactly once; nothing hangs; connections recover afterwards."""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from typing import Iterator

import numpy as np
import pytest

from transfer_engine import (
    EngineClosed,
    PeerConnectionError,
    PeerUnreachable,
    TransferCancelled,
    TransferState,
    TransferTimeout,
    WaitTimeout,
)
from transfer_engine.testing import PeerProcess, PeerSpec, digest, pattern

MiB = 1 << 20


@pytest.fixture(scope="module")
def sleepy() -> Iterator[PeerProcess]:
    """A peer the tests pause (SIGSTOP) and resume."""
    with PeerProcess(PeerSpec(segment="sleepy", region_sizes=(48 * MiB,))) as peer:
        yield peer


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def test_killing_the_peer_mid_batch_fails_the_batch_and_a_restarted_peer_works(make_engine):
    engine = make_engine("writer", transport="tcp")
    src = pattern(1, 64 * MiB)
    local = engine.register(src)
    victim = PeerProcess(PeerSpec(segment="victim", region_sizes=(64 * MiB,))).start()
    port = victim.descriptor.port
    try:
        peer = engine.connect(victim.descriptor)
        victim.pause()  # the write stalls with bytes in flight
        handle = engine.write(peer, [(local, 0, peer.regions[0], 0, src.nbytes)], timeout=30)
        wait_until(lambda: handle.poll() is TransferState.RUNNING)
        time.sleep(0.2)
        assert handle.poll() is TransferState.RUNNING

        killed_at = time.monotonic()
        victim.kill()
        # PeerDisconnected from a connection in use, PeerUnreachable from a stripe still connecting
        with pytest.raises(PeerConnectionError, match="victim"):
            handle.wait(10)
        assert time.monotonic() - killed_at < 5.0  # far inside the batch's 30 s timeout
        assert handle.poll() is TransferState.FAILED
    finally:
        victim.kill()

    with PeerProcess(PeerSpec(segment="victim-2", port=port, region_sizes=(64 * MiB,))) as reborn:
        engine.write(peer, [(local, 0, peer.regions[0], 0, 8 * MiB)], timeout=10).wait(10)  # same Peer: reconnects
        assert peer.segment == "victim-2"
        assert reborn.digest(0, 0, 8 * MiB) == digest(src[:8 * MiB])
        fresh = engine.connect(reborn.descriptor)
        engine.write(fresh, [(local, 0, fresh.regions[0], 0, src.nbytes)], timeout=10).wait(10)
        assert reborn.digest(0) == digest(src)
    stats = engine.stats()
    assert (stats.batches_done, stats.batches_failed) == (2, 1)


def test_a_frozen_peer_times_the_batch_out_and_the_next_batch_reconnects(make_engine, sleepy):
    engine = make_engine("writer", transport="tcp")
    src = pattern(2, 32 * MiB)
    local = engine.register(src)
    peer = engine.connect(sleepy.descriptor)
    sleepy.pause()
    try:
        started = time.monotonic()
        handle = engine.write(peer, [(local, 0, peer.regions[0], 0, src.nbytes)], timeout=0.5)
        with pytest.raises(TransferTimeout, match="0.5s timeout"):
            handle.wait(10)
        assert 0.45 < time.monotonic() - started < 3.0
    finally:
        sleepy.resume()
    time.sleep(0.1)
    assert handle.poll() is TransferState.FAILED  # late acknowledgements change nothing
    engine.write(peer, [(local, 0, peer.regions[0], 0, src.nbytes)], timeout=10).wait(10)
    assert sleepy.digest(0, 0, src.nbytes) == digest(src)
    stats = engine.stats()
    assert (stats.batches_timed_out, stats.batches_failed, stats.batches_done) == (1, 1, 1)


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_cancel_stops_a_batch_and_reports_it_cancelled(make_engine, sleepy, transport):
    engine = make_engine("writer", transport=transport)
    src = pattern(3, 40 * MiB)
    local = engine.register(src)
    peer = engine.connect(sleepy.descriptor)
    sleepy.fill(0, 0, bytes(48 * MiB))
    sleepy.pause()  # over tcp the batch stalls; over shm the copy does not need the peer
    try:
        first = engine.write(peer, [(local, 0, peer.regions[0], 0, src.nbytes)], timeout=10)
        second = engine.write(peer, [(local, 0, peer.regions[0], 0, MiB)], timeout=10)
        assert second.cancel() is True or second.poll() is TransferState.DONE
        cancelled = first.cancel()
    finally:
        sleepy.resume()
    if cancelled:
        assert first.poll() is TransferState.CANCELLED
        with pytest.raises(TransferCancelled, match=f"batch #{first.id}"):
            first.wait(5)
        assert first.cancel() is False
    else:  # the whole copy finished before the cancel: it stays DONE
        first.wait(5)
    later = engine.write(peer, [(local, 0, peer.regions[0], 8 * MiB, 8 * MiB)], timeout=10)
    later.wait(10)
    assert sleepy.digest(0, 8 * MiB, 8 * MiB) == digest(src[:8 * MiB])
    stats = engine.stats()
    assert stats.batches_cancelled == int(cancelled) + int(second.poll() is TransferState.CANCELLED)
    assert stats.batches_failed == 0


def test_cancel_over_tcp_takes_effect_while_bytes_are_in_flight(make_engine, sleepy):
    engine = make_engine("writer", transport="tcp")
    local = engine.register(np.ones(40 * MiB, dtype=np.uint8))
    peer = engine.connect(sleepy.descriptor)
    sleepy.pause()
    try:
        handle = engine.write(peer, [(local, 0, peer.regions[0], 0, 40 * MiB)], timeout=10)
        wait_until(lambda: handle.poll() is TransferState.RUNNING)
        assert handle.cancel() is True
        assert handle.poll() is TransferState.CANCELLED
    finally:
        sleepy.resume()
    time.sleep(0.2)  # the frame in flight gets acknowledged; the batch stays cancelled
    assert handle.poll() is TransferState.CANCELLED


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_racing_cancels_never_turn_done_into_cancelled_or_failed(make_engine, sleepy, transport):
    engine = make_engine("racer", transport=transport)
    local = engine.register(pattern(4, MiB))
    peer = engine.connect(sleepy.descriptor)
    rng = random.Random(7)
    handles = [engine.write(peer, [(local, 0, peer.regions[0], (i % 40) * MiB, rng.choice([4096, 65536, MiB]))])
               for i in range(200)]
    endings: dict[int, int] = {}
    won: dict[int, bool] = {}

    def count(h) -> None:
        endings[h.id] = endings.get(h.id, 0) + 1

    for h in handles:
        h.add_done_callback(count)

    def canceller() -> None:
        for h in handles[::2]:
            won[h.id] = h.cancel()
            time.sleep(rng.random() * 1e-4)

    t = threading.Thread(target=canceller)
    t.start()
    t.join(10)
    for h in handles:
        try:
            h.wait(10)
        except TransferCancelled:
            pass  # checked below: only handles whose cancel() won may end this way
    for h in handles:
        assert endings[h.id] == 1
        if won.get(h.id):
            assert h.poll() is TransferState.CANCELLED and isinstance(h.error, TransferCancelled)
        else:
            assert h.poll() is TransferState.DONE and h.error is None
    stats = engine.stats()
    assert stats.batches_failed == 0
    assert stats.batches_cancelled == sum(won.values())
    assert stats.batches_done + stats.batches_cancelled == len(handles)


def test_wait_timeout_leaves_the_batch_running(make_engine, sleepy):
    engine = make_engine("writer", transport="tcp")
    local = engine.register(np.ones(32 * MiB, dtype=np.uint8))
    peer = engine.connect(sleepy.descriptor)
    sleepy.pause()
    try:
        handle = engine.write(peer, [(local, 0, peer.regions[0], 0, 32 * MiB)], timeout=10)
        with pytest.raises(WaitTimeout):
            handle.wait(0.1)
        assert not handle.done()
    finally:
        sleepy.resume()
    handle.wait(10)
    assert handle.poll() is TransferState.DONE


def test_closing_the_engine_fails_batches_in_flight_and_frees_shared_memory(make_engine, sleepy):
    engine = make_engine("closer", transport="tcp")
    local = engine.register(np.ones(32 * MiB, dtype=np.uint8))
    _, shm_array = engine.allocate_buffer(MiB)
    shm_names = [r.shm_name for r in engine.descriptor().regions if r.shm_name]
    assert len(shm_names) == 1 and os.path.exists(f"/dev/shm/{shm_names[0]}")
    peer = engine.connect(sleepy.descriptor)
    sleepy.pause()
    try:
        handle = engine.write(peer, [(local, 0, peer.regions[0], 0, 32 * MiB)], timeout=10)
        engine.close()
        with pytest.raises(EngineClosed):
            handle.wait(5)
    finally:
        sleepy.resume()
    engine.close()  # idempotent
    with pytest.raises(EngineClosed):
        engine.write(peer, [(local, 0, peer.regions[0], 0, 1)])
    assert not os.path.exists(f"/dev/shm/{shm_names[0]}")
    shm_array[:4] = 1  # our own mapping outlives the name


def test_connecting_to_nothing_is_unreachable(make_engine):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening
        started = time.monotonic()
        with pytest.raises(PeerUnreachable, match=f"127.0.0.1:{port}"):
            make_engine("lonely").connect(f"127.0.0.1:{port}")
    assert time.monotonic() - started < 5


def test_disconnect_fails_batches_in_flight_and_forgets_the_peer(make_engine, sleepy):
    from transfer_engine import InvalidTransfer, PeerDisconnected

    engine = make_engine("leaver", transport="tcp")
    local = engine.register(np.ones(32 * MiB, dtype=np.uint8))
    peer = engine.connect(sleepy.descriptor)
    sleepy.pause()
    try:
        handle = engine.write(peer, [(local, 0, peer.regions[0], 0, 32 * MiB)], timeout=10)
        engine.disconnect(peer)
        with pytest.raises(PeerDisconnected, match="disconnected by this engine"):
            handle.wait(5)
    finally:
        sleepy.resume()
    with pytest.raises(InvalidTransfer, match="not connected"):
        engine.write(peer, [(local, 0, peer.regions[0], 0, 1)])
    again = engine.connect(sleepy.descriptor)
    engine.write(again, [(local, 0, again.regions[0], 0, MiB)]).wait(10)
