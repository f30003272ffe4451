"""Randomized stress of the tiers' accounting: concurrent eviction, demotion, loads and reads
never lose a slot, never free one twice, never exceed a capacity, never hand out the wrong
bytes; and an engine driven through random traffic with tiny tiers, a lossy store, aborts
and damaged disk blocks gives the tokens of an engine without any caching."""
from __future__ import annotations

import random
import threading

import numpy as np

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling import SamplingParams
from engine.tiers import FakeStore, TierConfig, TierManager
from engine.tiers.disk import DiskTier
from engine.tiers.host import HostPool
from engine.tiers.record import problem, record_bytes, seal

BB, BS = 512, 4
RB = record_bytes(BB, BS)


def payload(h: int) -> np.ndarray:
    return np.random.default_rng(h).integers(0, 256, BB, dtype=np.uint8)


def toks(h: int) -> tuple[int, ...]:
    return (h, h + 1, h + 2, h + 3)


def test_concurrent_host_and_disk_traffic_keeps_exact_books(tmp_path):
    host = HostPool(12, RB)
    disk = DiskTier(tmp_path, 20, RB, BB)
    errors: list[str] = []
    counts = {"reads": 0, "disk_reads": 0}
    lock = threading.Lock()

    def demote(slot: int, victim) -> None:
        if disk.reserve(victim.block_hash):
            disk.write(victim.block_hash, host.array[slot].copy())

    def check(slot: int, h: int, where: str) -> None:
        rec = host.array[slot]
        bad = problem(rec, BB, h, toks(h))
        if bad is not None or not (rec[:BB] == payload(h)).all():
            errors.append(f"{where}: slot {slot} for block {h}: {bad or 'payload differs'}")

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(1500):
            h = rng.randrange(48)
            op = rng.random()
            if op < 0.35:  # a block arrives from the device
                got = host.reserve()
                if got is None:
                    continue
                slot, victim = got
                if victim is not None:
                    demote(slot, victim)
                host.array[slot, :BB] = payload(h)
                seal(host.array[slot], BB, h, toks(h))
                host.publish(slot, h, toks(h))
            elif op < 0.7:  # a reader copies a block out
                slot = host.pin(h, toks(h))
                if slot is not None:
                    check(slot, h, "host read")
                    host.unpin(slot)
                    with lock:
                        counts["reads"] += 1
            elif op < 0.95:  # a load from disk into the host pool
                got = host.reserve()
                if got is None:
                    continue
                slot, victim = got
                if victim is not None:
                    demote(slot, victim)
                if disk.read_into(h, toks(h), host.array[slot]) is None:
                    check(slot, h, "disk read")
                    with lock:
                        counts["disk_reads"] += 1
                    if not host.publish(slot, h, toks(h)):
                        pass  # another thread had it already
                else:
                    host.abandon(slot)
            else:  # everything unpinned goes down at once
                for slot, victim in host.evict_unpinned():
                    demote(slot, victim)
                    host.abandon(slot)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert host.problems() == [] and disk.problems() == []
    assert host.num_used == host.num_cached <= host.num_slots and host.num_pinned == 0
    assert host.high_water <= host.num_slots and disk.high_water <= disk.capacity
    assert disk.corrupt == 0 and counts["reads"] > 100 and counts["disk_reads"] > 50
    for h in host.hashes():  # every cached slot holds exactly its block
        slot = host.pin(h)
        check(slot, h, "final")
        host.unpin(slot)
    assert errors == []


class LossyStore(FakeStore):
    """A small evicting store that fails some puts and answers slowly now and then."""

    def __init__(self, capacity_bytes: int, seed: int) -> None:
        super().__init__(capacity_bytes, evict=True)
        self.rng = random.Random(seed)

    lossy = True

    def put_from(self, keys, addresses, lengths):
        self.fail_puts = 1 if self.lossy and self.rng.random() < 0.2 else 0
        return super().put_from(keys, addresses, lengths)

    def get_into(self, keys, addresses, lengths):
        if self.rng.random() < 0.3:
            threading.Event().wait(0.01)
        return super().get_into(keys, addresses, lengths)


def test_random_traffic_through_tiny_tiers_keeps_tokens_and_books(tiny_model_dir, tmp_path):
    rng = random.Random(12)
    bs = 16
    prefixes = [[rng.randrange(10, 40000) for _ in range(bs * n)] for n in (1, 2, 3, 4, 2, 3, 4, 5)]  # 24 blocks
    ref_engine = LLMEngine(tiny_model_dir, EngineConfig(num_blocks=64))

    def reference(prompt, params):
        ref_engine.pool.reset_prefix_cache()  # no caching at all
        return ref_engine.generate([prompt], params)[0]

    eng = LLMEngine(tiny_model_dir, EngineConfig(num_blocks=24, max_num_batched_tokens=48))
    rb = record_bytes(eng.kv.block_bytes, bs)
    store = LossyStore(20 * rb, seed=3)
    cfg = TierConfig(host_gib=10 * rb / (1 << 30), disk_gib=16 * rb / (1 << 30), disk_dir=str(tmp_path / "kv"),
                     store=True, write_back_on_finish=True, write_queue_blocks=8)
    tiers = TierManager.attach(eng, cfg, store=lambda: store)
    checked = aborted = 0
    for batch in range(24):
        want: dict[str, tuple[list[int], SamplingParams]] = {}
        for i in range(rng.randint(1, 3)):
            prompt = rng.choice(prefixes) + [rng.randrange(10, 40000) for _ in range(rng.randint(0, 40))]
            params = SamplingParams(max_tokens=rng.randint(1, 10), ignore_eos=True)
            rid = f"b{batch}-{i}"
            eng.add_request(rid, params, prompt_token_ids=prompt)
            want[rid] = (prompt, params)
        got: dict[str, list[int]] = {r: [] for r in want}
        victim = rng.choice(list(want)) if rng.random() < 0.3 else None
        steps = 0
        while eng.has_unfinished():
            for o in eng.step():
                got[o.request_id] += o.new_token_ids
            steps += 1
            if victim is not None and steps == 2:
                eng.abort(victim)
                aborted += 1
        for rid, (prompt, params) in want.items():
            if rid != victim:
                assert got[rid] == reference(prompt, params), rid
                checked += 1
        assert tiers.flush()
        assert tiers.problems() == []
        assert eng.stats().num_blocks_free == 24 and eng.audit().num_reclaimed == 0
        assert store._bytes <= store.capacity_bytes
        r = rng.random()
        if r < 0.25:
            tiers.spill_host()
        elif r < 0.4 and tiers.disk.hashes():  # damage a disk block: caught, recomputed
            path = tiers.disk.path_of(rng.choice(tiers.disk.hashes()))
            if path.exists():
                data = bytearray(path.read_bytes())
                data[rng.randrange(len(data))] ^= 0x10
                path.write_bytes(bytes(data))
        elif r < 0.5:
            store.clear()
        assert tiers.flush()
    # Which tier serves what above depends on the writer threads' timing (the lossy store's
    # failures are drawn in the order puts arrive, a write-back is cut short while queued puts
    # pin the tiny host pool: `host_full`), so a last pass makes each tier below the device
    # the only copy in turn and asks for one prefix from it, which must then serve all of it.
    # The device starts empty (no eviction's copy-down pins host slots meanwhile) and the host
    # pool has room for the whole chain. (The store once served 0 to 5 of its 5 blocks: the
    # fake evicted the least recently *written* objects, so the write-back's puts pushed out
    # the chain's head it had just found in the store; it now evicts the least recently used,
    # as Mooncake's read leases do: test_tiers_store_evictions pins that case.)
    store.lossy = False

    def keep_only_store() -> None:
        eng.pool.reset_prefix_cache()  # the device forgets everything (no demotion) ...
        tiers.spill_host()
        assert tiers.flush()
        tiers.disk.clear()  # ... and so do the host pool and the disk

    assert tiers.flush()
    keep_only_store()
    prompt = prefixes[-1] + [11, 12, 13]
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    for tier in ("host", "disk", "cluster"):
        assert eng.generate([prompt], params)[0] == reference(prompt, params)  # written back on finish
        assert tiers.flush()
        eng.pool.reset_prefix_cache()
        if tier != "host":
            tiers.spill_host()  # the host pool's copies go to disk
            assert tiers.flush()
        if tier == "cluster":
            tiers.disk.clear()
        before = tiers.stats().hit_tokens[tier]
        assert eng.generate([prompt], params)[0] == reference(prompt, params)
        assert tiers.flush()
        st = tiers.stats()
        assert st.hit_tokens[tier] - before == 5 * bs, (tier, st.events)  # the whole chain
        keep_only_store()
    assert tiers.problems() == [] and eng.stats().num_blocks_free == 24
    st = tiers.stats()
    assert checked >= 30
    assert tiers.host.high_water <= tiers.host.num_slots and tiers.disk.high_water <= tiers.disk.capacity
    assert all(st.hit_tokens[t] > 0 for t in ("device", "host", "disk")), st.hit_tokens
    tiers.close()
