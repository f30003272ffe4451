"""The tier manager: moves KV blocks between the device region and the tiers below it.

Attached to an engine's block pool (`BlockPool.tiers`), it is called at four points:

* **eviction** (`on_evict`, inside `BlockPool.allocate`, before the block is reused): under
  ``write_back`` the block is copied into the host pool; a host slot it displaces is demoted
  to disk (its bytes queued for the disk writer);
* **caching** (`on_cache`, when a computed block is published): under ``write_through`` it is
  copied down at once; under ``write_through_selective`` device hits are counted at
  admission and a block is copied down at `selective_hits`;
* **planning** (`park`, when a request is queued): the request's chain is looked up device ->
  host -> disk -> cluster; the host blocks it will use are pinned, and if some blocks are on
  disk or in the store the request is parked while the loader thread brings them into the
  host pool (pinned for it), so their I/O overlaps the steps the engine runs meanwhile; the
  engine admits it once they are in (`take_ready`), or after `prefetch_timeout_s` without
  the rest;
* **admission** (`fill`, from the scheduler after it allocated the prompt's blocks): the
  chain's blocks found in the host pool are copied into the new device blocks and published
  in the prefix cache (promotion); the request computes only what no tier held.

Every block that enters the host pool from the device is also put to the cluster store
(queued for the writer thread, from its pinned host slot) together with its ancestors: the
device evicts a chain tail first, and a block is usable from the store only when every block
before it is there too, so the ancestors still on the device are copied down with it (up to
the first one the host pool already holds, which went down with its own ancestors) and put
where the store lacks them (`ancestor_puts`; `ancestor_missing` when one is in no tier here).
A finished request's blocks go there too when `write_back_on_finish` is set (`write_back`,
decode nodes). The store evicts without telling anyone; a lookup that finds a block absent
(the prefetch's `exists`, a get that misses) is reported as a removed cluster block, so the
conductor's index of the store is corrected once a node finds an entry gone, and a miss on a
block seen in the store before is counted (`store_evicted`, `engine/tiers/cluster.py`). Store puts,
disk writes and loads are best-effort: a failure is counted, the block is recomputed later,
and no request fails or waits past its prefetch timeout because of a tier.
"""
from __future__ import annotations

import ctypes
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from engine.block_pool import BlockPool, KVEvent
from engine.kv_cache import KVCache
from engine.tiers.backend import StoreBackend
from engine.tiers.cluster import ClusterTier
from engine.tiers.config import TierConfig, blocks_in
from engine.tiers.disk import DiskTier
from engine.tiers.host import HostPool, Victim
from engine.tiers.namespace import kv_namespace
from engine.tiers.policy import WritePolicy
from engine.tiers.record import problem, record_bytes, seal
from engine.tiers.stats import Recorder, TierStats, TierUse

if TYPE_CHECKING:
    from engine.request import Request

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Plan:
    """One queued request's lower-tier blocks: what to fetch, what is pinned for it."""

    request: "Request"
    hashes: list[int]  # the chain after the device's blocks, up to the last cacheable block
    tokens: list[tuple[int, ...]]
    fetch_from: int  # index into `hashes` of the first block not in the host pool at planning
    deadline: float
    slots: list[int] = field(default_factory=list)  # host slots pinned for this request
    origin: dict[int, str] = field(default_factory=dict)  # hash -> tier it was fetched from
    closed: bool = False  # admitted or cancelled: pins taken after this are given back at once
    lock: threading.Lock = field(default_factory=threading.Lock)

    def keep(self, host: HostPool, slot: int) -> bool:
        with self.lock:
            if not self.closed:
                self.slots.append(slot)
                return True
        host.unpin(slot)
        return False

    def close(self, host: HostPool) -> None:
        with self.lock:
            self.closed = True
            slots, self.slots = self.slots, []
        for s in slots:
            host.unpin(s)


class TierManager:
    def __init__(self, config: TierConfig, kv: KVCache, pool: BlockPool, *, namespace: str,
                 store: Callable[[], StoreBackend] | None = None, prefetch_timeout_s: float = 2.0) -> None:
        config.validate()
        self.config = config
        self.kv = kv
        self.pool = pool
        self.block_size = kv.block_size
        self.block_bytes = kv.block_bytes
        self.record_bytes = record_bytes(self.block_bytes, self.block_size)
        self.policy = config.write_policy
        self.prefetch_timeout_s = prefetch_timeout_s
        self.host = HostPool(blocks_in(config.host_gib, self.record_bytes), self.record_bytes)
        self.disk = (DiskTier(config.disk_path() / namespace, blocks_in(config.disk_gib, self.record_bytes),
                              self.record_bytes, self.block_bytes) if config.disk_gib > 0 else None)
        self.cluster: ClusterTier | None = None
        if config.store:
            if store is None:
                store = self._mooncake_connector()
            self.cluster = ClusterTier(store, namespace, self.host.region())
        self.rec = Recorder()
        self._listeners: list[Callable[[KVEvent], None]] = []
        self._hits: dict[int, int] = {}  # write_through_selective: device hits per cached block
        self._writes: queue.Queue = queue.Queue()
        self._write_budget = threading.BoundedSemaphore(config.write_queue_blocks)
        self._loads: queue.Queue = queue.Queue()
        self._cond = threading.Condition()
        self._parked: dict[str, _Plan] = {}  # waiting for the loader
        self._ready: list[_Plan] = []  # loaded (or timed out), for the engine to queue
        self._admitting: dict[str, _Plan] = {}  # queued in the scheduler, pins held until admission
        self._closed = False
        self._outstanding = 0  # tasks queued or running on the I/O threads
        self._idle = threading.Condition()
        # one writer (disk writes, store puts, in order); two loaders, so a request with
        # nothing below the host pool is not held up behind another's long load
        self._threads = [threading.Thread(target=self._serve, args=(self._writes,), name="kv-tier-writer", daemon=True),
                         *(threading.Thread(target=self._serve, args=(self._loads,), name=f"kv-tier-loader-{i}",
                                            daemon=True) for i in range(2))]
        for t in self._threads:
            t.start()
        if self.cluster is not None:
            self._submit(self._writes, self._connect_store)
        # then the writer yields to the engine threads (after the store client started its own
        # threads, which inherit a thread's nice value and also serve the loaders' gets)
        self._submit(self._writes, _lower_priority)
        pool.tiers = self

    @classmethod
    def attach(cls, engine, config: TierConfig, *, store: Callable[[], StoreBackend] | None = None,
               **kw) -> "TierManager":
        """Build the tiers for `engine` (an `LLMEngine`) under its model's namespace and attach
        them (`engine.tiers`); `store` connects to the cluster store (default: Mooncake Store
        at `config.store_master`)."""
        if engine.tiers is not None:
            engine.tiers.close()
        ns = kv_namespace(engine.model_dir, dtype=engine.config.dtype, kv_dtype=engine.kv.dtype_name,
                          block_size=engine.config.block_size)
        engine.tiers = cls(config, engine.kv, engine.pool, namespace=ns, store=store, **kw)
        return engine.tiers

    def _mooncake_connector(self) -> Callable[[], StoreBackend]:
        from engine.tiers.mooncake_store import MooncakeStoreBackend

        c = self.config

        def connect() -> StoreBackend:
            return MooncakeStoreBackend.connect(local_host=c.store_local_host, master=c.store_master,
                                                metadata=c.store_metadata,
                                                segment_bytes=int(c.store_segment_gib * (1 << 30)))
        return connect

    def _connect_store(self) -> None:
        self.cluster.backend()

    # --- events -----------------------------------------------------------------------
    def add_listener(self, fn: Callable[[KVEvent], None]) -> None:
        """`fn(KVEvent)` for every block stored in / removed from the host and disk tiers, and
        stored in the cluster store by this node (from the engine thread or an I/O thread)."""
        self._listeners.append(fn)

    def _emit(self, kind: str, hashes: Sequence[int], tier: str) -> None:
        if hashes:
            ev = KVEvent(kind, tuple(hashes), tier=tier)
            for fn in self._listeners:
                fn(ev)

    def _emit_disk_evictions(self) -> None:
        if self.disk is not None:
            self._emit("removed", self.disk.take_evicted(), "disk")

    def _emit_store_misses(self) -> None:
        """Blocks the store's lookups found absent: removed from the cluster tier."""
        missing, evicted = self.cluster.take_missing()
        if evicted:
            self.rec.count("store_evicted", evicted)
        self._emit("removed", list(dict.fromkeys(missing)), "cluster")

    # --- byte views -------------------------------------------------------------------
    def _device(self, block: int) -> torch.Tensor:
        return self.kv.tensor[block].reshape(-1).view(torch.uint8)

    def _payload(self, slot: int) -> torch.Tensor:
        return self.host.tensor[slot, : self.block_bytes]

    @staticmethod
    def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
        """One block's bytes: a plain memmove between CPU tensors (one thread, no torch
        intra-op pool to wake on a busy machine), torch's copy when a GPU is involved."""
        if dst.is_cuda or src.is_cuda:
            dst.copy_(src, non_blocking=False)
        else:
            ctypes.memmove(dst.data_ptr(), src.data_ptr(), src.numel() * src.element_size())

    # --- device -> host ---------------------------------------------------------------
    def on_evict(self, block: int, h: int, tokens: Sequence[int]) -> None:
        """`BlockPool.allocate` is about to reuse cached `block` (engine thread)."""
        self._hits.pop(h, None)
        if self.policy is WritePolicy.WRITE_BACK and self.config.copy_down:
            self._copy_down(block, h, tokens)

    def on_cache(self, block: int, h: int, tokens: Sequence[int]) -> None:
        """`block` was just published as `h` in the device prefix cache (engine thread)."""
        if self.policy is WritePolicy.WRITE_THROUGH and self.config.copy_down:
            self._copy_down(block, h, tokens)

    def _count_device_hits(self, hashes: Sequence[int], blocks: Sequence[int], tokens: Sequence[int]) -> None:
        if self.policy is not WritePolicy.WRITE_THROUGH_SELECTIVE or not self.config.copy_down:
            return
        bs = self.block_size
        for i, (h, b) in enumerate(zip(hashes, blocks)):
            n = self._hits.get(h, 0) + 1
            self._hits[h] = n
            if n == self.config.selective_hits:
                self._copy_down(b, h, tokens[i * bs:(i + 1) * bs])

    def _copy_down(self, block: int, h: int, tokens: Sequence[int], *, put: bool = True) -> int | None:
        """Copy device `block` into the host pool as `h` (and queue its put to the store).
        Returns its slot pinned once, for a caller that passes `put=False` and wants it;
        otherwise None. Nothing happens when `h` is in the host pool already, or no slot is free."""
        slot = self.host.pin(h, tokens)
        if slot is not None:
            if put:
                self.host.unpin(slot)
                return None
            return slot
        got = self.host.reserve()
        if got is None:
            self.rec.count("host_full")
            return None
        slot, victim = got
        if victim is not None:
            self._demote(slot, victim)
        self._copy(self._payload(slot), self._device(block))
        seal(self.host.array[slot], self.block_bytes, h, tokens)
        self.rec.move("device", "host", self.block_bytes)
        if not self.host.publish(slot, h, tokens, pin=True):
            return self._copy_down(block, h, tokens, put=put)  # a loader published it meanwhile
        self._emit("stored", (h,), "host")
        if put and self.cluster is not None:
            hashes, slots = self._ancestors(block)
            self._queue_put(hashes + [h], slots + [slot], only_missing=bool(hashes))
            return None
        if put:
            self.host.unpin(slot)
            return None
        return slot

    def _ancestors(self, block: int) -> tuple[list[int], list[int]]:
        """The chain before device `block` as pinned host slots, root first, for a put: each
        ancestor still on the device is copied down; the walk ends at the root, at one the
        host pool holds already (included: the store may have dropped it), or where a block
        is in neither (counted) or no host slot is free."""
        hashes: list[int] = []
        slots: list[int] = []
        parent = self.pool.parent_of(block)
        while parent is not None:
            slot = self.host.pin(parent)
            if slot is not None:
                hashes.append(parent)
                slots.append(slot)
                break
            found = self.pool.cached_block(parent)
            if found is None:
                self.rec.count("ancestor_missing")
                break
            b, toks, grand = found
            slot = self._copy_down(b, parent, toks, put=False)
            if slot is None:
                break
            hashes.append(parent)
            slots.append(slot)
            parent = grand
        if hashes:
            self.rec.count("ancestor_puts", len(hashes))
        hashes.reverse()
        slots.reverse()
        return hashes, slots

    def _demote(self, slot: int, victim: Victim) -> None:
        """The host pool gave up `slot`'s block (still intact in it): to disk, best-effort."""
        self._emit("removed", (victim.block_hash,), "host")
        if self.disk is None:
            return
        if not self._write_budget.acquire(blocking=False):
            self.rec.count("disk_write_dropped")
            return
        if not self.disk.reserve(victim.block_hash):
            self._write_budget.release()
            self._emit_disk_evictions()
            return
        data = self.host.array[slot].copy()
        self._emit_disk_evictions()
        self._submit(self._writes, self._write_disk, victim.block_hash, data)

    def _write_disk(self, h: int, data) -> None:
        try:
            if self.disk.write(h, data):
                self.rec.move("host", "disk", self.record_bytes)
                self._emit("stored", (h,), "disk")
            else:
                self.rec.count("disk_write_errors")
        finally:
            self._write_budget.release()

    def _queue_put(self, hashes: list[int], slots: list[int], *, only_missing: bool = False) -> None:
        """Put pinned host slots to the store on the writer thread (which unpins them)."""
        if not self._write_budget.acquire(blocking=False):
            self.rec.count("put_dropped", len(hashes))
            for s in slots:
                self.host.unpin(s)
            return
        self._submit(self._writes, self._put, hashes, slots, only_missing)

    def _put(self, hashes: list[int], slots: list[int], only_missing: bool) -> None:
        try:
            todo = list(zip(hashes, slots))
            if only_missing and todo:
                have = self.cluster.exists(hashes, report=False)  # what it lacks is put next, not reported
                todo = [hs for hs, present in zip(todo, have) if not present]
            if not todo:
                return
            ok = self.cluster.put_from([h for h, _ in todo], [self.host.slot_address(s) for _, s in todo],
                                       self.record_bytes)
            done = [h for (h, _), good in zip(todo, ok) if good]
            self.rec.move("host", "cluster", self.record_bytes * len(done))
            self.rec.count("put_failures", len(todo) - len(done))
            self._emit("stored", done, "cluster")
            if only_missing:  # found absent, and the store refused them: out of the cluster tier
                self._emit("removed", [h for (h, _), good in zip(todo, ok) if not good], "cluster")
        finally:
            if self.cluster is not None:
                self._emit_store_misses()
            for s in slots:
                self.host.unpin(s)
            self._write_budget.release()

    def write_back(self, request: "Request") -> None:
        """A finished request's full computed blocks (prompt and answer) go to the cluster
        store, so the conversation's next turn finds them from any node (engine thread,
        before the request's blocks are freed)."""
        if self.cluster is None or not self.config.write_back_on_finish or not self.cluster.ready or self._closed:
            return
        bs = self.block_size
        tokens = request.all_token_ids
        hashes, slots = [], []
        for i, h in enumerate(request.block_hashes):
            slot = self._copy_down(request.block_ids[i], h, tokens[i * bs:(i + 1) * bs], put=False)
            if slot is None:
                break  # no host slot free: the rest of the chain could not be used anyway
            hashes.append(h)
            slots.append(slot)
        if hashes:
            self.rec.count("write_backs")
            self._queue_put(hashes, slots, only_missing=True)

    # --- planning: pins and fetches before admission -----------------------------------
    def park(self, request: "Request") -> bool:
        """Plan `request`'s loads (engine thread). True when it must wait for the loader
        (`take_ready` hands it back); False when it can be queued now."""
        bs = self.block_size
        tokens = request.all_token_ids
        limit = (len(tokens) - 1) // bs
        if limit <= 0 or self._closed:
            return False
        hashes = request.chain_hashes(bs, limit)
        start = len(self.pool.match_prefix(hashes, tokens))
        if start >= limit:
            return False
        plan = _Plan(request, hashes[start:], [tuple(tokens[i * bs:(i + 1) * bs]) for i in range(start, limit)],
                     0, time.monotonic() + self.prefetch_timeout_s)
        for h, toks in zip(plan.hashes, plan.tokens):
            slot = self.host.pin(h, toks)
            if slot is None:
                break
            plan.slots.append(slot)
            plan.fetch_from += 1
        rest = plan.hashes[plan.fetch_from:]
        lower = rest and ((self.disk is not None and self.disk.contains(rest[0]))
                          or (self.cluster is not None and self.cluster.ready))
        with self._cond:
            if lower:
                self._parked[request.request_id] = plan
            elif plan.slots:
                self._admitting[request.request_id] = plan
        if lower:
            self._submit(self._loads, self._fetch, plan)
        return bool(lower)

    def _fetch(self, plan: _Plan) -> None:
        """Bring `plan`'s blocks below the host pool into it, in chain order (loader thread)."""
        try:
            in_store: list[bool] | None = None
            asked_at = 0
            for i in range(plan.fetch_from, len(plan.hashes)):
                if plan.closed or self._closed:
                    break
                h, toks = plan.hashes[i], plan.tokens[i]
                slot = self.host.pin(h, toks)
                if slot is not None:
                    plan.keep(self.host, slot)
                    continue
                if self.host.num_pinned * 2 >= self.host.num_slots:
                    self.rec.count("prefetch_host_full")
                    break  # leave half the host pool to demotions
                if self.disk is not None and self.disk.contains(h):
                    if not self._load(plan, h, toks, "disk"):
                        break
                    continue
                if self.cluster is None:
                    break
                if in_store is None:
                    in_store, asked_at = self.cluster.exists(plan.hashes[i:]), i
                    self._emit_store_misses()
                if not in_store[i - asked_at]:
                    break
                if not self._load(plan, h, toks, "cluster"):
                    break
        finally:
            with self._cond:
                if self._parked.pop(plan.request.request_id, None) is plan:
                    self._ready.append(plan)
                    self._cond.notify_all()

    def _load(self, plan: _Plan, h: int, toks: tuple[int, ...], tier: str) -> bool:
        got = self.host.reserve()
        if got is None:
            self.rec.count("prefetch_host_full")
            return False
        slot, victim = got
        if victim is not None:
            self._demote(slot, victim)
        t0 = time.perf_counter()
        if tier == "disk":
            bad = self.disk.read_into(h, toks, self.host.array[slot])
            self._emit_disk_evictions()
        else:
            ok = self.cluster.get_into([h], [self.host.slot_address(slot)], self.record_bytes)[0]
            self._emit_store_misses()
            bad = None if ok else "not in the store"
            if ok:
                bad = problem(self.host.array[slot], self.block_bytes, h, toks)
                if bad is not None:
                    self.rec.count("corrupt_blocks")
        if bad is not None:
            self.host.abandon(slot)
            self.rec.count(f"{tier}_load_failures")
            log.debug("%s block %016x not used: %s", tier, h, bad)
            return False
        self.rec.latency(tier, time.perf_counter() - t0)
        self.rec.move(tier, "host", self.record_bytes)
        if self.host.publish(slot, h, toks, pin=True):
            self._emit("stored", (h,), "host")
        else:
            slot = self.host.pin(h, toks)
            if slot is None:
                return False
        plan.origin[h] = tier
        plan.keep(self.host, slot)
        return True

    def take_ready(self, wait: bool) -> list["Request"]:
        """Parked requests whose loads finished or timed out, to queue now (engine thread).
        With `wait`, block briefly (up to 50 ms) for one when nothing else is runnable."""
        with self._cond:
            if wait and not self._ready and self._parked:
                soonest = min(p.deadline for p in self._parked.values())
                self._cond.wait(max(0.0, min(0.05, soonest - time.monotonic())))
            now = time.monotonic()
            late = [p for p in self._parked.values() if p.deadline <= now]
            for p in late:
                del self._parked[p.request.request_id]
            self.rec.count("prefetch_timeouts", len(late))
            ready, self._ready = self._ready + late, []
            for p in ready:
                self._admitting[p.request.request_id] = p
        return [p.request for p in ready]

    @property
    def num_parked(self) -> int:
        with self._cond:
            return len(self._parked) + len(self._ready)

    def cancel(self, request_id: str) -> None:
        """The request ended before admission (engine thread): give back its pins."""
        with self._cond:
            plan = self._parked.pop(request_id, None) or self._admitting.pop(request_id, None)
            if plan is None:
                plan = next((p for p in self._ready if p.request.request_id == request_id), None)
                if plan is not None:
                    self._ready.remove(plan)
        if plan is not None:
            plan.close(self.host)

    # --- admission ----------------------------------------------------------------------
    def fill(self, request_id: str, hashes: Sequence[int], tokens: Sequence[int], cached: Sequence[int],
             new: Sequence[int], limit: int) -> int:
        """After the device matched `cached` blocks of the chain `hashes` and `new` blocks
        were allocated for the rest: copy the chain's next blocks from the host pool into
        `new`, publish them in the prefix cache, return how many (scheduler, engine thread)."""
        bs = self.block_size
        self.rec.hit("device", len(cached) * bs)
        self._count_device_hits(hashes, cached, tokens)
        with self._cond:
            plan = self._admitting.pop(request_id, None)
        n = 0
        t0 = time.perf_counter()
        try:
            start = len(cached)
            while start + n < min(limit, len(hashes)) and n < len(new):
                j = start + n
                h, toks = hashes[j], tokens[j * bs:(j + 1) * bs]
                slot = self.host.pin(h, toks)
                if slot is None:
                    break
                try:
                    self._copy(self._device(new[n]), self._payload(slot))
                finally:
                    self.host.unpin(slot)
                self.pool.cache_block(new[n], h, toks, hashes[j - 1] if j else None)
                self.rec.hit(plan.origin.get(h, "host") if plan is not None else "host", bs)
                n += 1
        finally:
            if plan is not None:
                plan.close(self.host)
        if n:
            self.rec.latency("host", time.perf_counter() - t0)
            self.rec.move("host", "device", n * self.block_bytes)
        return n

    # --- operations -----------------------------------------------------------------------
    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued disk write, store put and load is done; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._outstanding == 0, timeout)

    def spill_host(self) -> int:
        """Demote every unpinned host block (to disk when there is one); how many. For
        tests and benchmarks that want blocks on the tier below."""
        victims = self.host.evict_unpinned()
        for slot, v in victims:
            self._demote(slot, v)
            self.host.abandon(slot)
        return len(victims)

    def stats(self) -> TierStats:
        use = {"host": TierUse(self.host.num_slots, self.host.num_cached, self.host.high_water)}
        if self.disk is not None:
            use["disk"] = TierUse(self.disk.capacity, self.disk.num_cached, self.disk.high_water)
        state, reason = ("off", "") if self.cluster is None else (self.cluster.state, self.cluster.reason)
        snap = self.rec.snapshot(use, state, reason)
        if self.disk is not None and self.disk.corrupt:
            snap.events["corrupt_blocks"] = snap.events.get("corrupt_blocks", 0) + self.disk.corrupt
        return snap

    def problems(self) -> list[str]:
        """Broken accounting once idle (no request planned or loading, queues flushed)."""
        out = self.host.problems()
        with self._cond:
            busy = len(self._parked) + len(self._ready) + len(self._admitting)
        if not busy and self.host.num_pinned:
            out.append(f"{self.host.num_pinned} host slots still pinned with no request planned")
        if self.host.num_reserved:
            out.append(f"{self.host.num_reserved} host slots reserved with no load or demotion running")
        if self.host.high_water > self.host.num_slots:
            out.append(f"host high water {self.host.high_water} > {self.host.num_slots} slots")
        if self.disk is not None:
            out += self.disk.problems()
        return out

    def close(self) -> None:
        """Stop the I/O threads (after what is queued) and detach from the block pool: the
        engine goes on without tiers."""
        if self._closed:
            return
        self._closed = True
        if self.pool.tiers is self:
            self.pool.tiers = None
        for q in (self._writes, self._loads, self._loads):
            q.put(None)
        for t in self._threads:
            t.join(10)
        if self.cluster is not None:
            self.cluster.close()
        if self.disk is not None:
            self.disk.close()

    def _submit(self, q: queue.Queue, fn: Callable, *args) -> None:
        with self._idle:
            self._outstanding += 1
        q.put((fn, args))

    def _serve(self, q: queue.Queue) -> None:
        while True:
            item = q.get()
            if item is None:
                return
            fn, args = item
            try:
                fn(*args)
            except Exception:
                log.exception("KV tier task %s failed", getattr(fn, "__name__", fn))
            finally:
                with self._idle:
                    self._outstanding -= 1
                    if self._outstanding == 0:
                        self._idle.notify_all()


WRITER_NICE = 10  # added to the writer thread's nice value


def _lower_priority() -> None:
    """Run the calling thread WRITER_NICE steps nicer. The writer's disk writes and store puts
    are background work nothing waits on, so on a host short of cores they should yield to the
    engine threads (this node's and a colocated peer's decode steps) instead of taking time
    slices from them. Linux nice values are per thread; elsewhere this does nothing."""
    import os

    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + WRITER_NICE))
    except (AttributeError, OSError):
        pass

