"""The cluster tier: block records in the store every node shares (Mooncake Store), by key.

A block's key is ``halfmoon/<namespace>/<hash as 16 hex digits>``; the namespace is the
fingerprint of the model and the KV layout, so nodes of different models or KV dtypes never
read each other's blocks. Objects are whole block records (`engine/tiers/record.py`) moved
zero-copy between the store and the host pool, which is registered with the store once.

Everything here is best-effort and runs on the tier manager's I/O threads: a call that fails
or raises counts as a failure and marks the store down for `retry_s` (calls are skipped,
not waited on, meanwhile); the store is connected lazily by the first call, and again after
`retry_s` when that fails, with the reason kept for `halfmoon status` and the log.

Evictions: Mooncake Store evicts on its own (objects whose read lease ran out, at its high
watermark) and tells no one. What the cluster tier sees instead is a lookup that misses:
`exists` answering no, or `get_into` not finding the object. Every such miss is kept for the
tier manager (`take_missing`), which reports it to the conductor as a removed cluster block,
so the global index drops store entries it believed in once a node finds them gone; a miss
on a block this node put or saw in the store before (the last `KNOWN_BLOCKS` of them) is an
eviction it observed, and counted (`store_evicted`).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Callable, Sequence

from engine.tiers.backend import OBJECT_NOT_FOUND, StoreBackend

log = logging.getLogger(__name__)
KNOWN_BLOCKS = 1 << 16  # the store blocks a node remembers having seen, to tell evictions from never-stored


class ClusterTier:
    def __init__(self, connect: Callable[[], StoreBackend], namespace: str, region: tuple[int, int],
                 *, retry_s: float = 10.0) -> None:
        self._connect = connect
        self.namespace = namespace
        self._region = region
        self.retry_s = retry_s
        self._backend: StoreBackend | None = None
        self._lock = threading.Lock()
        self._down_until = 0.0
        self.state = "connecting"  # connecting | up | down
        self.reason = ""
        self._seen_lock = threading.Lock()
        self._known: OrderedDict[int, None] = OrderedDict()  # blocks seen in the store, oldest first
        self._missing: list[int] = []  # blocks lookups found absent, not yet taken
        self._evicted = 0  # of those, blocks seen in the store before

    def key(self, h: int) -> str:
        return f"halfmoon/{self.namespace}/{h:016x}"

    @property
    def ready(self) -> bool:
        """Worth a call now (connected, or due for another try)."""
        return self.state != "down" or time.monotonic() >= self._down_until

    def _mark_down(self, reason: str) -> None:
        with self._lock:
            if self.state != "down":
                log.warning("cluster KV tier down for %.0f s: %s (requests go on without it)", self.retry_s, reason)
            self.state, self.reason = "down", reason
            self._down_until = time.monotonic() + self.retry_s

    def backend(self) -> StoreBackend | None:
        """The connected backend, connecting first if need be; None while the store is down."""
        if self._backend is not None and self.state == "up":
            return self._backend
        if not self.ready:
            return None
        with self._lock:
            if self._backend is None:
                try:
                    b = self._connect()
                    b.register(*self._region)
                except Exception as e:  # any failure leaves the tier off, with the reason
                    self.state, self.reason = "down", str(e)
                    self._down_until = time.monotonic() + self.retry_s
                    log.warning("cluster KV tier off: %s (retrying every %.0f s)", e, self.retry_s)
                    return None
                self._backend = b
                log.info("cluster KV tier up: %s store, namespace %s", b.name, self.namespace)
            self.state, self.reason = "up", ""
            return self._backend

    # --- what the lookups saw ------------------------------------------------------------
    def _observe(self, hashes: Sequence[int], present: Sequence[bool | None], *, report: bool = True) -> None:
        """Per block: True seen in the store, False found absent, None no answer. An absent
        block is kept for `take_missing` when `report`; one seen before counts as evicted."""
        with self._seen_lock:
            known = self._known
            for h, p in zip(hashes, present):
                if p:
                    known[h] = None
                    known.move_to_end(h)
                    if len(known) > KNOWN_BLOCKS:
                        known.popitem(last=False)
                elif p is not None:
                    if h in known:
                        del known[h]
                        self._evicted += 1
                    if report:
                        self._missing.append(h)

    def take_missing(self) -> tuple[list[int], int]:
        """(blocks lookups found absent since the last call, how many lookups found a block
        seen in the store before gone: evictions observed)."""
        with self._seen_lock:
            out, self._missing = self._missing, []
            n, self._evicted = self._evicted, 0
            return out, n

    # --- calls --------------------------------------------------------------------------
    def exists(self, hashes: Sequence[int], *, report: bool = True) -> list[bool]:
        """Per block whether the store has it; absent blocks are kept for `take_missing`
        (with `report`: a caller that puts them next passes False)."""
        b = self.backend()
        if b is None:
            return [False] * len(hashes)
        try:
            res = b.exists([self.key(h) for h in hashes])
        except Exception as e:
            self._mark_down(f"exists failed: {e}")
            return [False] * len(hashes)
        self._observe(hashes, res, report=report)
        return res

    def get_into(self, hashes: Sequence[int], addresses: Sequence[int], length: int) -> list[bool]:
        """Copy each block's record to its address; per block whether it arrived whole."""
        b = self.backend()
        if b is None:
            return [False] * len(hashes)
        try:
            res = b.get_into([self.key(h) for h in hashes], addresses, [length] * len(hashes))
        except Exception as e:
            self._mark_down(f"get failed: {e}")
            return [False] * len(hashes)
        if any(r == -900 for r in res):
            self._mark_down("get failed: the master does not answer")
        self._observe(hashes, [True if r == length else False if r == OBJECT_NOT_FOUND else None for r in res])
        return [r == length for r in res]

    def put_from(self, hashes: Sequence[int], addresses: Sequence[int], length: int) -> list[bool]:
        b = self.backend()
        if b is None:
            return [False] * len(hashes)
        try:
            res = b.put_from([self.key(h) for h in hashes], addresses, [length] * len(hashes))
        except Exception as e:
            self._mark_down(f"put failed: {e}")
            return [False] * len(hashes)
        if any(r == -900 for r in res):
            self._mark_down("put failed: the master does not answer")
        self._observe(hashes, [True if r == 0 else None for r in res])
        return [r == 0 for r in res]

    def remove(self, h: int) -> bool:
        b = self.backend()
        if b is None:
            return False
        with self._seen_lock:
            self._known.pop(h, None)  # removed on purpose: not an eviction
        try:
            return b.remove(self.key(h)) == 0
        except Exception as e:
            self._mark_down(f"remove failed: {e}")
            return False

    def close(self) -> None:
        with self._lock:
            if self._backend is not None:
                try:
                    self._backend.close()
                finally:
                    self._backend = None
                    self.state = "down"
                    self.reason = "closed"
                    self._down_until = float("inf")
