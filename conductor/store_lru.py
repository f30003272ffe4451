"""The cluster store's eviction, modelled by the conductor: Mooncake Store drops its least
recently used objects when a segment fills and tells no one, so the global index's cluster
tier would keep every block ever put (stale hints that route requests to a store that has
lost them). `StoreLru` keeps the index's view bounded the way the store is: at most
`capacity` blocks, in least-recently-used order, where a put or a hit of a block refreshes
it (as Mooncake's LRU does on put / exists / get) and a block pushed past capacity is
dropped from the index. It is a model, not the store's truth: refreshes the conductor does
not see (a node's own `exists`) make it drop a block the store still has, which costs a
hint, never a wrong answer (a node checks the store before loading).

The capacity is the store's size in blocks: its memory (the keeper's plus the segments
nodes mount) over one block record's bytes (`GlobalPrefixIndex.bound_store`).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterable


class StoreLru:
    """Block hashes in least-recently-used order, at most `capacity` of them."""

    __slots__ = ("capacity", "_order")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"store capacity must be >= 1 block, got {capacity}")
        self.capacity = capacity
        self._order: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, h: int) -> bool:
        return h in self._order

    def order(self) -> list[int]:
        """Oldest first (for tests)."""
        return list(self._order)

    def put(self, hashes: Iterable[int]) -> list[int]:
        """Blocks put, in order: each becomes the most recent. Returns the blocks pushed past
        capacity, oldest first (a block put in this call can be among them when the call
        alone puts more than `capacity`)."""
        order = self._order
        move = order.move_to_end
        for h in hashes:
            if h in order:
                move(h)
            else:
                order[h] = None
        dropped = []
        while len(order) > self.capacity:
            dropped.append(order.popitem(last=False)[0])
        return dropped

    def touch(self, hashes: Iterable[int]) -> None:
        """Blocks hit (read): those it holds become the most recent; others are ignored."""
        order = self._order
        for h in hashes:
            if h in order:
                order.move_to_end(h)

    def discard(self, hashes: Iterable[int]) -> None:
        """Blocks known gone (a lookup found them absent)."""
        order = self._order
        for h in hashes:
            order.pop(h, None)
