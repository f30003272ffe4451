"""The host DRAM tier: a preallocated pool of block-record slots, indexed by block hash, LRU.

The whole pool is one uint8 tensor (`tensor`, also `array` as numpy over the same memory)
allocated at start, so a node registers it once with its transfer engine / the Mooncake
Store client (`region()`). Every slot is in exactly one state:

* free     -- in the free list;
* reserved -- taken by `reserve()` for a writer filling it (a demotion from the device, a
              load from disk or the store); not findable until `publish()`;
* cached   -- in the index under its block hash; findable; `pin()`-ned while a reader
              (a copy to the device, a disk write, a store put) uses its bytes, and only
              evicted (by a later `reserve()`) when unpinned.

All state changes happen under one lock; copies of slot bytes happen outside it, on a slot
the copier has reserved or pinned, so engine and I/O threads share the pool safely.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


@dataclass(frozen=True, slots=True)
class Victim:
    """A cached slot `reserve()` evicted; its bytes stay intact until the reserver overwrites them."""

    block_hash: int
    tokens: tuple[int, ...]


class HostPool:
    def __init__(self, num_slots: int, record_bytes: int, *, pin_memory: bool = False) -> None:
        if num_slots <= 0:
            raise ValueError(f"the host tier needs at least one slot, got {num_slots}")
        self.num_slots = num_slots
        self.record_bytes = record_bytes
        self.tensor = torch.empty((num_slots, record_bytes), dtype=torch.uint8, pin_memory=pin_memory)
        self.tensor.zero_()  # touch every page now, not on the engine thread's first demotions
        self.array: np.ndarray = self.tensor.numpy()
        self._lock = threading.Lock()
        self._index: OrderedDict[int, int] = OrderedDict()  # hash -> slot, least recently used first
        self._hash: list[int | None] = [None] * num_slots
        self._tokens: list[tuple[int, ...] | None] = [None] * num_slots
        self._pins = [0] * num_slots
        self._npinned = 0  # slots with a pin
        self._free: list[int] = list(range(num_slots - 1, -1, -1))
        self._reserved: set[int] = set()
        self.high_water = 0  # most slots ever reserved or cached at once

    # --- observation ----------------------------------------------------------------
    def region(self) -> tuple[int, int]:
        """(address, length) of the pool's memory, for registration with a transfer engine."""
        return self.tensor.data_ptr(), self.tensor.numel()

    def slot_address(self, slot: int) -> int:
        return self.tensor.data_ptr() + slot * self.record_bytes

    @property
    def num_cached(self) -> int:
        with self._lock:
            return len(self._index)

    @property
    def num_used(self) -> int:
        with self._lock:
            return self.num_slots - len(self._free)

    def contains(self, h: int) -> bool:
        with self._lock:
            return h in self._index

    def hashes(self) -> list[int]:
        with self._lock:
            return list(self._index)

    @property
    def num_pinned(self) -> int:
        return self._npinned

    @property
    def num_reserved(self) -> int:
        with self._lock:
            return len(self._reserved)

    # --- writers --------------------------------------------------------------------
    def reserve(self) -> tuple[int, Victim | None] | None:
        """A slot to fill: a free one, else the least recently used unpinned cached one (its
        entry leaves the index; the caller demotes its bytes before overwriting them). None
        when every slot is reserved or pinned."""
        with self._lock:
            victim = None
            if self._free:
                slot = self._free.pop()
            else:
                slot = next((s for s in self._index.values() if not self._pins[s]), None)
                if slot is None:
                    return None
                h = self._hash[slot]
                del self._index[h]
                victim = Victim(h, self._tokens[slot])
                self._hash[slot] = self._tokens[slot] = None
            self._reserved.add(slot)
            self.high_water = max(self.high_water, self.num_slots - len(self._free))
            return slot, victim

    def publish(self, slot: int, h: int, tokens: Sequence[int], *, pin: bool = False) -> bool:
        """Make a reserved, filled slot findable as block `h` (pinned once if `pin`). False
        (and the slot freed) when `h` is already cached: the first writer wins."""
        with self._lock:
            self._reserved.remove(slot)
            if h in self._index:
                self._free.append(slot)
                return False
            self._index[h] = slot
            self._hash[slot] = h
            self._tokens[slot] = tuple(tokens)
            if pin:
                self._pin(slot)
            return True

    def abandon(self, slot: int) -> None:
        """Give back a reserved slot unfilled (a load that failed)."""
        with self._lock:
            self._reserved.remove(slot)
            self._free.append(slot)

    # --- readers --------------------------------------------------------------------
    def pin(self, h: int, tokens: Sequence[int] | None = None) -> int | None:
        """The slot caching block `h` (its token ids equal to `tokens` when given), pinned
        and made most recently used; None if not cached."""
        with self._lock:
            slot = self._index.get(h)
            if slot is None or (tokens is not None and self._tokens[slot] != tuple(tokens)):
                return None
            self._index.move_to_end(h)
            self._pin(slot)
            return slot

    def _pin(self, slot: int) -> None:
        self._npinned += self._pins[slot] == 0
        self._pins[slot] += 1

    def unpin(self, slot: int) -> None:
        with self._lock:
            if self._pins[slot] <= 0:
                raise RuntimeError(f"host slot {slot} unpinned more often than pinned")
            self._pins[slot] -= 1
            self._npinned -= self._pins[slot] == 0

    def evict_unpinned(self) -> list[tuple[int, Victim]]:
        """Take every unpinned cached slot out of the index, least recently used first, as
        reserved slots with their victims (the caller demotes and then `abandon`s each)."""
        with self._lock:
            out = []
            for h, slot in list(self._index.items()):
                if not self._pins[slot]:
                    del self._index[h]
                    out.append((slot, Victim(h, self._tokens[slot])))
                    self._hash[slot] = self._tokens[slot] = None
                    self._reserved.add(slot)
            return out

    # --- accounting -----------------------------------------------------------------
    def problems(self) -> list[str]:
        """Broken invariants (empty when the books balance): every slot in exactly one state."""
        with self._lock:
            out = []
            cached = set(self._index.values())
            free = set(self._free)
            if len(free) != len(self._free):
                out.append("a slot is in the free list twice")
            for name, a, b in (("free", free, cached), ("free", free, self._reserved),
                               ("cached", cached, self._reserved)):
                if a & b:
                    out.append(f"slots {sorted(a & b)} are both {name} and {'reserved' if b is self._reserved else 'cached'}")
            if len(free) + len(cached) + len(self._reserved) != self.num_slots:
                out.append(f"{len(free)} free + {len(cached)} cached + {len(self._reserved)} reserved "
                           f"!= {self.num_slots} slots")
            for h, s in self._index.items():
                if self._hash[s] != h:
                    out.append(f"slot {s} indexed as {h:016x} but holds {self._hash[s]}")
            for s, p in enumerate(self._pins):
                if p and s not in cached:
                    out.append(f"slot {s} is pinned but not cached")
            if self._npinned != sum(1 for p in self._pins if p):
                out.append(f"pinned count {self._npinned} != {sum(1 for p in self._pins if p)} pinned slots")
            return out
