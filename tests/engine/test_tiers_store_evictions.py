"""The cluster store evicts without telling anyone (Mooncake Store drops objects whose read
lease ran out); the tiers find out when a lookup misses, report every block found absent as
removed from the cluster tier (the conductor's index drops the stale entry) and count the
misses on blocks they had seen there as evictions. And the in-process fake evicts in the
order a lease-based store does: least recently used, a lookup refreshing what it finds."""
from __future__ import annotations

import ctypes

import numpy as np

from engine.block_pool import KVEvent, block_hashes
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling import SamplingParams
from engine.tiers import FakeStore, TierConfig, TierManager
from engine.tiers.backend import OBJECT_NOT_FOUND
from engine.tiers.cluster import ClusterTier
from engine.tiers.record import record_bytes

BS = 16
PROMPT = list(range(300, 300 + 6 * BS + 5))  # 6 full blocks + 5 tokens
CHAIN = block_hashes(PROMPT, BS)
GREEDY = SamplingParams(max_tokens=4, ignore_eos=True)


def make(tiny_model_dir, tmp_path, store: FakeStore, **kw) -> tuple[LLMEngine, TierManager, list[KVEvent]]:
    eng = LLMEngine(tiny_model_dir, EngineConfig(num_blocks=32))
    gib = 64 * record_bytes(eng.kv.block_bytes, BS) / (1 << 30)
    tiers = TierManager.attach(eng, TierConfig(host_gib=gib, disk_dir=str(tmp_path / "kv"), store=True, **kw),
                               store=lambda: store)
    events: list[KVEvent] = []
    tiers.add_listener(events.append)
    return eng, tiers, events


def evict_device(eng: LLMEngine) -> None:
    eng.pool.free(eng.pool.allocate(eng.pool.num_free))


def cluster_removed(events: list[KVEvent]) -> list[int]:
    return [h for e in events if e.kind == "removed" and e.tier == "cluster" for h in e.block_hashes]


def test_a_lookup_that_misses_reports_the_blocks_the_store_dropped(tiny_model_dir, tmp_path):
    store = FakeStore()
    eng, tiers, events = make(tiny_model_dir, tmp_path / "a", store)
    eng.generate([PROMPT], GREEDY)
    evict_device(eng)  # demoted to the host pool and put to the store
    assert tiers.flush()
    assert sorted(h for e in events if e.kind == "stored" and e.tier == "cluster" for h in e.block_hashes) \
        == sorted(CHAIN)
    for h in CHAIN[3:]:  # the store drops the chain's last three blocks on its own
        assert store.remove(tiers.cluster.key(h)) == 0
    tiers.spill_host()
    assert tiers.flush()
    events.clear()
    eng.generate([PROMPT], GREEDY)  # the prefetch asks the store for the chain
    assert tiers.flush()
    assert tiers.stats().hit_tokens["cluster"] == 3 * BS
    assert cluster_removed(events) == CHAIN[3:]  # reported, so the conductor's index drops them
    assert tiers.stats().events["store_evicted"] == 3

    # a node that never saw the chain reports the misses too (the index may hold them from
    # the node that put them) but has observed no eviction of its own
    other, ot, oevents = make(tiny_model_dir, tmp_path / "b", store)
    for h in CHAIN[:3]:
        store.remove(tiers.cluster.key(h))
    other.generate([PROMPT], GREEDY)
    assert ot.flush()
    assert cluster_removed(oevents) == CHAIN[:6]
    assert "store_evicted" not in ot.stats().events
    tiers.close()
    ot.close()


def test_a_get_that_finds_the_object_gone_counts_an_eviction():
    store = FakeStore()
    buf = np.zeros(4 * 256, dtype=np.uint8)
    tier = ClusterTier(lambda: store, "ns", (buf.ctypes.data, buf.nbytes))
    addr = [buf.ctypes.data + i * 256 for i in range(3)]
    assert tier.put_from([1, 2, 3], addr, 256) == [True] * 3
    store.remove(tier.key(2))
    assert tier.get_into([1, 2, 3], addr, 256) == [True, False, True]
    assert tier.take_missing() == ([2], 1)
    assert tier.exists([2, 9]) == [False, False]  # 9 was never there: missing, not evicted
    assert tier.take_missing() == ([2, 9], 0)
    tier.remove(3)  # removed on purpose: not an eviction when a lookup misses it
    assert tier.exists([3], report=False) == [False]
    assert tier.take_missing() == ([], 0)


def test_the_fake_store_evicts_the_least_recently_used_a_lookup_refreshing():
    rec = 64
    buf = (ctypes.c_uint8 * (8 * rec))()
    base = ctypes.addressof(buf)
    store = FakeStore(3 * rec, evict=True)
    store.register(base, 8 * rec)
    put = lambda k, i: store.put_from([k], [base + i * rec], [rec])  # noqa: E731
    for i, k in enumerate("abc"):
        assert put(k, i) == [0]
    assert store.exists(["a"]) == [True]  # a lookup grants a lease: "a" is now the most recent
    assert put("d", 3) == [0]
    assert store.keys() == ["c", "a", "d"]  # "b" went, not "a" (the first written)
    assert store.get_into(["c"], [base + 5 * rec], [rec]) == [rec]  # so does a get
    assert put("e", 4) == [0]
    assert store.keys() == ["d", "c", "e"]  # "a" went: the least recently used
    assert store.get_into(["a"], [base], [rec]) == [OBJECT_NOT_FOUND]


def test_a_write_back_keeps_the_chain_blocks_the_store_had_already(tiny_model_dir, tmp_path):
    """The flake test_tiers_stress once saw (0 to 5 of 5 written-back blocks found): the
    write-back asks the store which of the chain's blocks it has and puts the rest; the fake
    then evicted the oldest written objects, which were the very blocks it had just found
    there (the chain's head, put long before), so the chain broke at its root. A lookup
    refreshes what it finds, as Mooncake's read lease does, and the chain survives whole."""
    store = FakeStore(evict=True)
    decode, dt, _ = make(tiny_model_dir, tmp_path / "d", store, write_back_on_finish=True)
    store.capacity_bytes = 8 * dt.record_bytes  # eight blocks
    decode.generate([PROMPT[:BS + 5]], GREEDY)  # turn 0: only the chain's first block (21 + 4 tokens)
    assert dt.flush()
    other = list(range(5000, 5000 + 7 * BS + 5))
    decode.generate([other], GREEDY)  # 7 more blocks: the store is full, its oldest object is the head
    assert dt.flush()
    assert len(store.keys()) == 8 and store.keys()[0] == dt.cluster.key(CHAIN[0])
    answer = decode.generate([PROMPT], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    assert dt.flush()  # written back: the head was there, blocks 1-5 were put (5 others evicted)
    assert all(dt.cluster.key(h) in store.keys() for h in CHAIN)
    prefill, pt, _ = make(tiny_model_dir, tmp_path / "p", store)  # a node that never saw the chain
    turn2 = PROMPT + answer + list(range(7000, 7020))
    prefill.generate([turn2], GREEDY)
    assert pt.flush()
    assert pt.stats().hit_tokens["cluster"] == 6 * BS  # the whole chain, from its head
    dt.close()
    pt.close()
