"""The Mooncake adapter behind the same API (its tcp protocol, on loopback). Skipped,
with the reason, where Mooncake's engine does not load (.ci/install-mooncake.sh)."""

from __future__ import annotations

import time
from typing import Iterator

import numpy as np
import pytest

from transfer_engine import (
    PeerConnectionError,
    TransferRefused,
    TransferState,
    TransferTimeout,
    TransportUnavailable,
    mooncake_unavailable_reason,
)
from transfer_engine.testing import KV_BLOCK_BYTES, PeerProcess, PeerSpec, digest, pattern

MiB = 1 << 20
REASON = mooncake_unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


@pytest.fixture(scope="module")
def moon() -> Iterator[PeerProcess]:
    with PeerProcess(PeerSpec(segment="moon", transport="mooncake", region_sizes=(20 * KV_BLOCK_BYTES, MiB),
                              plain_regions=(1,))) as peer:
        yield peer


def test_kv_block_writes_and_reads_round_trip(make_engine, moon):
    engine = make_engine("moon-writer", transport="mooncake")
    peer = engine.connect(moon.descriptor)
    assert peer.transport.value == "mooncake"
    src = pattern(1, 12 * KV_BLOCK_BYTES)
    local = engine.register(src)
    moon.fill(0, 0, bytes(20 * KV_BLOCK_BYTES))
    blocks = np.random.default_rng(2).permutation(20)[:12]

    handle = engine.write(peer, [(local, i * KV_BLOCK_BYTES, moon.regions[0], int(b) * KV_BLOCK_BYTES, KV_BLOCK_BYTES)
                                 for i, b in enumerate(blocks)], timeout=30)
    handle.wait(30)

    assert handle.transport == "mooncake" and handle.poll() is TransferState.DONE
    expected = np.zeros(20 * KV_BLOCK_BYTES, dtype=np.uint8)
    for i, b in enumerate(blocks):
        expected[b * KV_BLOCK_BYTES:(b + 1) * KV_BLOCK_BYTES] = src[i * KV_BLOCK_BYTES:(i + 1) * KV_BLOCK_BYTES]
    assert moon.digest(0) == digest(expected)

    moon.fill_pattern(1, 3)
    back = np.zeros(MiB, dtype=np.uint8)
    engine.read(peer, [(engine.register(back), 0, moon.regions[1], 0, MiB)], timeout=30).wait(30)
    assert np.array_equal(back, pattern(3, MiB))
    assert engine.stats().done_by_transport == {"mooncake": 2}


def test_out_of_bounds_is_refused_before_mooncake_sees_it(make_engine, moon):
    engine = make_engine("moon-oob", transport="mooncake")
    peer = engine.connect(moon.descriptor)
    local = engine.register(np.ones(2 * MiB, dtype=np.uint8))
    moon.fill_pattern(1, 4)
    with pytest.raises(TransferRefused, match="out of bounds"):
        engine.write(peer, [(local, 0, moon.regions[1], MiB - 10, 20)], timeout=10).wait(10)
    with pytest.raises(TransferRefused, match="unknown region 42"):
        engine.write(peer, [(local, 0, 42, 0, 20)], timeout=10).wait(10)
    assert moon.digest(1) == digest(pattern(4, MiB))


def test_mooncake_needs_mooncake_on_both_ends(make_engine, moon):
    plain = make_engine("plain", transport="tcp")
    with pytest.raises(TransportUnavailable, match="does not run Mooncake"):
        make_engine("moon-2", transport="mooncake").connect(plain.address)
    peer = plain.connect(moon.descriptor)  # a Mooncake engine still serves our own TCP
    local = plain.register(pattern(5, 4096))
    plain.write(peer, [(local, 0, moon.regions[1], 0, 4096)]).wait(10)
    assert moon.read_bytes(1, 0, 4096) == pattern(5, 4096).tobytes()


def test_killing_a_mooncake_peer_fails_the_batch_within_its_timeout(make_engine):
    engine = make_engine("moon-writer", transport="mooncake")
    local = engine.register(np.ones(64 * MiB, dtype=np.uint8))
    victim = PeerProcess(PeerSpec(segment="moon-victim", transport="mooncake", region_sizes=(64 * MiB,))).start()
    try:
        peer = engine.connect(victim.descriptor)
        engine.write(peer, [(local, 0, peer.regions[0], 0, MiB)], timeout=10).wait(10)
        victim.pause()
        handle = engine.write(peer, [(local, 0, peer.regions[0], 0, 64 * MiB)], timeout=5)
        time.sleep(0.2)
        started = time.monotonic()
        victim.kill()
        with pytest.raises((PeerConnectionError, TransferTimeout)) as failure:
            handle.wait(10)
        assert "moon-victim" in str(failure.value) or victim.descriptor.mooncake_session in str(failure.value)
        assert time.monotonic() - started < 5.5
        assert handle.poll() is TransferState.FAILED
    finally:
        victim.kill()
