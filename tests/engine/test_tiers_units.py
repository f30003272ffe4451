"""The tier building blocks on their own: block records, the host pool, the disk tier, the
store interface's fake and the best-effort cluster tier, the config's checks."""
from __future__ import annotations

import numpy as np
import pytest

from engine.tiers.backend import NO_AVAILABLE_HANDLE, OBJECT_NOT_FOUND, FakeStore
from engine.tiers.cluster import ClusterTier
from engine.tiers.config import TierConfig, blocks_in
from engine.tiers.disk import DiskTier
from engine.tiers.host import HostPool
from engine.tiers.record import problem, record_bytes, record_tokens, seal

BB = 1000  # payload bytes of a test block
BS = 4  # tokens per block
RB = record_bytes(BB, BS)


def filled(h: int, tokens=(1, 2, 3, 4)) -> np.ndarray:
    buf = np.zeros(RB, dtype=np.uint8)
    buf[:BB] = np.random.default_rng(h).integers(0, 256, BB, dtype=np.uint8)
    seal(buf, BB, h, tokens)
    return buf


# --- records -----------------------------------------------------------------------
def test_record_round_trip_and_every_kind_of_damage_is_named():
    buf = filled(7)
    assert RB % 64 == 0 and RB >= BB + 24 + 16
    assert problem(buf, BB, 7, (1, 2, 3, 4)) is None
    assert record_tokens(buf, BB) == (1, 2, 3, 4)
    assert problem(buf, BB, 8, None) == "holds block 0000000000000007, not 0000000000000008"
    assert problem(buf, BB, 7, (1, 2, 3, 5)) == "token ids differ from the block's"
    bad = buf.copy()
    bad[500] ^= 1
    assert problem(bad, BB, 7, (1, 2, 3, 4)) == "checksum mismatch"
    bad = buf.copy()
    bad[BB] = 0
    assert problem(bad, BB, 7, None) == "not a block record (bad magic or version)"
    assert problem(np.zeros(RB, dtype=np.uint8), BB, 7, None) == "not a block record (bad magic or version)"


# --- host pool ---------------------------------------------------------------------
def test_host_pool_lru_eviction_skips_pinned_and_counts_exactly():
    pool = HostPool(3, RB)
    slots = []
    for h in (1, 2, 3):
        slot, victim = pool.reserve()
        assert victim is None
        pool.array[slot] = filled(h)
        assert pool.publish(slot, h, (1, 2, 3, 4))
        slots.append(slot)
    assert pool.num_used == pool.num_cached == 3
    pinned = pool.pin(1)  # 1 becomes most recently used and unevictable
    assert pinned == slots[0]
    slot, victim = pool.reserve()
    assert victim.block_hash == 2 and slot == slots[1]  # LRU unpinned
    assert problem(pool.array[slot], BB, 2, (1, 2, 3, 4)) is None  # bytes intact until overwritten
    assert not pool.contains(2) and pool.num_cached == 2 and pool.num_used == 3
    pool.abandon(slot)
    assert pool.num_used == 2 and pool.problems() == []
    pool.unpin(pinned)
    with pytest.raises(RuntimeError, match="unpinned more often"):
        pool.unpin(pinned)
    assert pool.high_water == 3 and pool.num_pinned == 0


def test_host_pool_first_publisher_wins_and_full_of_pins_refuses():
    pool = HostPool(2, RB)
    a, _ = pool.reserve()
    b, _ = pool.reserve()
    assert pool.reserve() is None  # both reserved
    assert pool.publish(a, 5, (1,), pin=True)
    assert not pool.publish(b, 5, (1,))  # same block twice: the second slot goes back
    assert pool.num_used == 1 and pool.num_cached == 1
    assert pool.pin(5, (2,)) is None  # other token ids: not this block
    c, _ = pool.reserve()
    assert pool.publish(c, 6, (1,), pin=True)
    assert pool.reserve() is None  # every slot pinned
    assert pool.problems() == []


# --- disk tier ---------------------------------------------------------------------
def test_disk_write_read_capacity_and_restart(tmp_path):
    disk = DiskTier(tmp_path, 2, RB, BB)
    for h in (1, 2):
        assert disk.reserve(h)
        assert disk.write(h, filled(h))
    assert not disk.reserve(1)  # already stored
    out = np.zeros(RB, dtype=np.uint8)
    assert disk.read_into(1, (1, 2, 3, 4), out) is None  # 1 is now most recently used
    assert (out == filled(1)).all()
    assert disk.reserve(3) and disk.write(3, filled(3))
    assert disk.hashes() == [1, 3] and disk.take_evicted() == [2]
    assert not disk.path_of(2).exists()
    assert disk.read_into(2, None, out) == "not on disk"
    assert disk.problems() == [] and disk.high_water == 2
    disk.close()
    again = DiskTier(tmp_path, 2, RB, BB)  # a restarted node finds its blocks
    assert sorted(again.hashes()) == [1, 3]
    assert again.read_into(3, (1, 2, 3, 4), out) is None
    again.close()
    smaller = DiskTier(tmp_path, 1, RB, BB)  # a smaller tier keeps the newest
    assert smaller.num_cached == 1 and smaller.problems() == []


@pytest.mark.parametrize("damage", ["flip", "truncate", "extend", "other_block"])
def test_damaged_disk_record_is_refused_and_deleted(tmp_path, damage):
    disk = DiskTier(tmp_path, 4, RB, BB)
    assert disk.reserve(9) and disk.write(9, filled(9))
    path = disk.path_of(9)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[123] ^= 0x40
    elif damage == "truncate":
        data = data[: RB // 2]
    elif damage == "extend":
        data += b"x"
    else:
        data = bytearray(filled(10).tobytes())
    path.write_bytes(bytes(data))
    out = np.zeros(RB, dtype=np.uint8)
    why = disk.read_into(9, (1, 2, 3, 4), out)
    expected = {"flip": "checksum mismatch", "truncate": f"truncated: {RB // 2} of {RB} bytes",
                "extend": "longer than a record", "other_block": "holds block 000000000000000a, not 0000000000000009"}
    assert why == expected[damage]
    assert disk.corrupt == 1 and not path.exists() and not disk.contains(9)
    assert disk.problems() == []


def test_disk_scan_drops_wrong_sized_files_and_leftovers(tmp_path):
    (tmp_path / "00000000000000aa.kv").write_bytes(b"short")
    (tmp_path / "00000000000000bb.tmp").write_bytes(b"half")
    (tmp_path / "00000000000000cc.kv").write_bytes(filled(0xCC).tobytes())
    disk = DiskTier(tmp_path, 4, RB, BB)
    assert disk.hashes() == [0xCC]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "00000000000000cc.kv"]


# --- store fake and cluster tier -------------------------------------------------------
def test_fake_store_semantics():
    store = FakeStore(capacity_bytes=2 * RB)
    src = filled(1)
    dst = np.zeros(RB, dtype=np.uint8)
    a, b = src.ctypes.data, dst.ctypes.data
    store.register(a, RB)
    store.register(b, RB)
    assert store.put_from(["k1", "k2", "k3"], [a] * 3, [RB] * 3) == [0, 0, NO_AVAILABLE_HANDLE]  # full
    assert store.put_from(["k1"], [a], [RB]) == [0]  # an existing key is kept, not an error
    assert store.exists(["k1", "k3"]) == [True, False]
    assert store.get_into(["k1", "k3"], [b, b], [RB, RB]) == [RB, OBJECT_NOT_FOUND]
    assert (dst == src).all()
    with pytest.raises(ValueError, match="not in a registered buffer"):
        store.get_into(["k1"], [b + 8], [RB])
    store.down = True
    with pytest.raises(ConnectionError):
        store.exists(["k1"])


def test_cluster_tier_is_best_effort_and_reconnects():
    store = FakeStore()
    buf = np.zeros(2 * RB, dtype=np.uint8)
    buf[:RB] = filled(3)
    attempts = []

    def connect():
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("master not there yet")
        return store

    tier = ClusterTier(connect, "ns", (buf.ctypes.data, buf.nbytes), retry_s=0.0)
    assert tier.put_from([3], [buf.ctypes.data], RB) == [False]  # first connect fails: counted, not raised
    assert tier.state == "down" and "master not there yet" in tier.reason
    assert tier.put_from([3], [buf.ctypes.data], RB) == [True]  # retried at the next call
    assert tier.state == "up" and store.keys() == ["halfmoon/ns/0000000000000003"]
    assert tier.exists([3, 4]) == [True, False]
    assert tier.get_into([3], [buf.ctypes.data + RB], RB) == [True]
    assert (buf[RB:] == buf[:RB]).all()
    store.down = True
    assert tier.exists([3]) == [False] and tier.state == "down"
    assert tier.get_into([3], [buf.ctypes.data + RB], RB) == [False]
    slow = ClusterTier(lambda: store, "ns", (buf.ctypes.data, buf.nbytes), retry_s=60.0)
    store.down = False
    assert slow.exists([3]) == [True]
    store.down = True
    assert slow.exists([3]) == [False]
    store.down = False
    assert not slow.ready and slow.exists([3]) == [False]  # skipped, not waited on, while marked down


# --- config --------------------------------------------------------------------------
@pytest.mark.parametrize("kw, message", [
    ({"host_gib": -1}, "kv_tiers.host_gib must be >= 0, got -1"),
    ({"host_gib": 1, "policy": "write_around"}, "kv_tiers.policy must be one of write_through, "
                                                "write_through_selective, write_back, got 'write_around'"),
    ({"disk_gib": 1}, "kv_tiers.host_gib must be > 0 when the disk tier or the store is on"),
    ({"store": True}, "kv_tiers.host_gib must be > 0 when the disk tier or the store is on"),
    ({"host_gib": 1, "selective_hits": 0}, "kv_tiers.selective_hits must be >= 1, got 0"),
    ({"host_gib": 1, "store": True, "store_master": "nohost"}, "kv_tiers.store_master must be host:port"),
])
def test_config_errors_name_the_field(kw, message):
    with pytest.raises(ValueError) as e:
        TierConfig(**kw).validate()
    assert message in str(e.value)


def test_sizes_in_gib_become_whole_records():
    assert blocks_in(1.0, 1 << 20) == 1024
    assert blocks_in(0.0, 1 << 20) == 0
    assert TierConfig(host_gib=0.5).enabled and not TierConfig().enabled


def test_one_process_owns_a_disk_directory_a_second_gets_a_private_one(tmp_path):
    import os

    first = DiskTier(tmp_path / "kv", 4, RB, BB)
    assert first.reserve(1) and first.write(1, filled(1))
    second = DiskTier(tmp_path / "kv", 4, RB, BB)  # e.g. another cluster's node of the same name
    assert second.dir == tmp_path / f"kv-{os.getpid()}" and second.num_cached == 0
    assert second.reserve(1) and second.write(1, filled(1))
    second.close()
    assert not second.dir.exists()  # a private directory goes with its owner
    assert first.hashes() == [1] and first.problems() == []
    first.close()
    again = DiskTier(tmp_path / "kv", 4, RB, BB)  # released: the next owner finds the blocks
    assert again.dir == tmp_path / "kv" and again.hashes() == [1]
    again.close()
