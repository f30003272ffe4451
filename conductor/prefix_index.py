"""The global prefix index: which node caches which KV blocks, kept exact by KV events
(`engine.block_pool.KVEvent`: the records the nodes' block pools emit, received with the
publishing node and its sequence number).

`longest_prefix(hashes)` answers, for every node, how many leading blocks of a request's
chain it holds. The map goes block hash -> holder(s), and the walk along the chain keeps
the set of nodes still matching, so the cost is O(prefix length + nodes that drop out),
not O(nodes × prefix length). Most blocks live on a single node, so a holder is stored as a
bare `NodeId` until a second node caches the same block (then a `set`), which keeps a
million indexed blocks in about 150 MB.

Tiers: events tagged with a tier below the device (`host`, `disk`: the node's own;
`cluster`: blocks the node put to the cluster store, which every node reads) go to one
index per tier (`tiers`), of the same shape; cluster blocks are held by `STORE_NODE`, not by
the node that put them (they outlive it), and the store evicts without telling, so those
entries are hints a node checks before loading; `bound_store` keeps them bounded to the
store's capacity in LRU order (`conductor.store_lru`), so hints the store has surely
evicted are dropped without the store saying so. `lower_tier_run` says how far a request's
chain continues below a node's device blocks, tier by tier.

Sequence numbers: events from a node must arrive as 0, 1, 2, ... An event older than
expected is a duplicate and is ignored. An event newer than expected means some were lost:
it is still applied (stores and removals are each safe on their own), the node is marked
stale, and the owner should call `resync(node, hashes, next_seq)` with a snapshot from it.
"""
from __future__ import annotations

from enum import Enum
from typing import Any, Iterable, Mapping, Sequence

from conductor.errors import IndexSyncError
from conductor.request import BlockHash, NodeId
from conductor.store_lru import StoreLru
from engine.block_pool import CLEARED, REMOVED, STORED, KVEvent


# A block hash as the index's maps key it. `Any`, not `int`, for the simulator's compiled
# build (`bench.sim.native`): a compiled loop over ints unboxes each hash and boxes it again
# (a new int object) for every dict or set it touches; as objects they pass through as they
# are. Lookups and events still take `BlockHash` / int sequences.
_Hash = Any

STORE_NODE = NodeId("cluster-store")  # the holder of every block in the cluster tier
LOWER_TIERS = ("host", "disk", "cluster")


class ApplyStatus(Enum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"  # seq older than expected: ignored
    GAP = "gap"  # seq newer than expected: applied, node marked stale


def _longest_prefix(holders: dict, block_hashes: Sequence[BlockHash]) -> dict[NodeId, int]:
    """Node -> leading blocks of `block_hashes` it holds in `holders` (block hash -> a node,
    or a set of them); nodes with 0 left out."""
    out: dict[NodeId, int] = {}
    if not block_hashes:
        return out
    hashes: Sequence[_Hash] = block_hashes
    first = holders.get(hashes[0])
    if first is None:
        return out
    single: NodeId | None = None
    alive: set[NodeId] | frozenset[NodeId] = frozenset()
    if type(first) is set:
        alive = first  # never mutated below: every narrowing builds a new set
        if len(alive) == 1:
            single = next(iter(alive))
    else:
        single = first  # type: ignore[assignment]
    depth = 1
    for h in hashes[1:]:
        held = holders.get(h)
        if held is None:
            break
        if single is not None:
            if held == single or (type(held) is set and single in held):
                depth += 1
                continue
            break
        if type(held) is set:
            narrowed = alive & held
        else:
            narrowed = {held} if held in alive else set()
        if len(narrowed) != len(alive):
            for node in alive:
                if node not in narrowed:
                    out[node] = depth
            if not narrowed:
                return out
            alive = narrowed
            if len(alive) == 1:
                single = next(iter(alive))
        depth += 1
    if single is not None:
        out[single] = depth
    else:
        for node in alive:
            out[node] = depth
    return out


def _drop_holder(holders: dict, h: _Hash, node: NodeId) -> None:
    """`node` no longer holds block `h` in a holder map (one node, or a set of two or more)."""
    held = holders[h]
    if type(held) is set:
        held.discard(node)
        if len(held) == 1:
            holders[h] = next(iter(held))
    else:
        del holders[h]


class GlobalPrefixIndex:
    def __init__(self) -> None:
        self._holders: dict[_Hash, NodeId | set[NodeId]] = {}
        self._blocks_of: dict[NodeId, set[_Hash]] = {}
        self._next_seq: dict[NodeId, int] = {}
        self._stale: set[NodeId] = set()
        self.gaps_detected = 0
        self.tiers: dict[str, GlobalPrefixIndex] = {}  # host / disk / cluster, fed by tier-tagged events
        self.store_lru: StoreLru | None = None  # the cluster tier bounded as the store is (`bound_store`)
        self.store_dropped = 0  # cluster-tier entries the bound dropped (the store evicted them, as modelled)

    def bound_store(self, capacity_blocks: int) -> None:
        """Model the cluster store's silent LRU eviction: from now on the cluster tier holds
        at most `capacity_blocks` entries (`conductor.store_lru`), oldest dropped first."""
        lru = self.store_lru = StoreLru(capacity_blocks)
        idx = self.tiers.get("cluster")
        if idx is not None:
            idx.remove(STORE_NODE, lru.put(sorted(idx._blocks_of.get(STORE_NODE, ()))))

    def store_hit(self, node: NodeId, block_hashes: Sequence[BlockHash]) -> None:
        """A request was placed on `node`: the cluster blocks it will load (the chain past its
        device and own-tier blocks) are read from the store, which refreshes them."""
        lru = self.store_lru
        if lru is None or "cluster" not in self.tiers or not block_hashes:
            return
        start = self.longest_prefix(block_hashes).get(node, 0)
        chain = self.lower_tier_chain(node, block_hashes, start)
        lru.touch(block_hashes[start + i] for i, t in enumerate(chain) if t == "cluster")

    def tier(self, name: str) -> "GlobalPrefixIndex":
        """The index of one tier below the device (created empty on first use)."""
        if name not in LOWER_TIERS:
            raise IndexSyncError(f"unknown KV tier {name!r}")
        idx = self.tiers.get(name)
        if idx is None:
            idx = self.tiers[name] = GlobalPrefixIndex()
        return idx

    def lower_tier_run(self, node: NodeId, block_hashes: Sequence[BlockHash], start: int) -> dict[str, int]:
        """From block `start` of the chain (where `node`'s device blocks end), how many
        consecutive blocks `node` holds in its host and disk tiers or the cluster store has,
        by tier (a block in several counts for the fastest: host, then disk, then cluster)."""
        out: dict[str, int] = {}
        for name in self.lower_tier_chain(node, block_hashes, start):
            out[name] = out.get(name, 0) + 1
        return out

    def lower_tier_chain(self, node: NodeId, block_hashes: Sequence[BlockHash], start: int) -> list[str]:
        """The tier each block of the chain from block `start` loads from on `node`, in chain
        order, up to the first block no tier holds (`lower_tier_run` counts it by tier)."""
        out: list[str] = []
        if not self.tiers:
            return out
        sources = [(t, self.tiers[t]._holders, STORE_NODE if t == "cluster" else node)
                   for t in LOWER_TIERS if t in self.tiers]
        hashes: Sequence[_Hash] = block_hashes
        for i in range(start, len(hashes)):
            h = hashes[i]
            for name, holders, who in sources:
                held = holders.get(h)
                if held is not None and (held == who or (type(held) is set and who in held)):
                    out.append(name)
                    break
            else:
                break
        return out

    def tier_holders(self, block_hashes: Sequence[BlockHash]) -> set[NodeId]:
        """Nodes whose own host or disk tier holds the chain's first block (they may serve
        the request from there though their device holds none of it)."""
        out: set[NodeId] = set()
        if not block_hashes:
            return out
        for name in ("host", "disk"):
            idx = self.tiers.get(name)
            if idx is not None:
                out |= idx.holders(block_hashes[0])
        return out

    # -- queries -----------------------------------------------------------------------
    def longest_prefix(self, block_hashes: Sequence[BlockHash]) -> dict[NodeId, int]:
        """Node -> number of leading blocks of `block_hashes` it caches (nodes with 0 left out)."""
        return _longest_prefix(self._holders, block_hashes)

    def holders(self, block_hash: BlockHash) -> frozenset[NodeId]:
        held = self._holders.get(block_hash)
        if held is None:
            return frozenset()
        return frozenset(held) if type(held) is set else frozenset((held,))  # type: ignore[arg-type]

    def blocks_on(self, node: NodeId) -> int:
        return len(self._blocks_of.get(node, ()))

    def nodes(self) -> list[NodeId]:
        return sorted(n for n, blocks in self._blocks_of.items() if blocks)

    def stale_nodes(self) -> frozenset[NodeId]:
        """Nodes that lost events since their last resync: their entries may be inexact."""
        return frozenset(self._stale)

    def mark_stale(self, node: NodeId) -> None:
        """The node published events this index never got (its heartbeat says so): its
        entries may be inexact until the next `resync`."""
        self._stale.add(node)

    def next_seq(self, node: NodeId) -> int:
        return self._next_seq.get(node, 0)

    @property
    def distinct_blocks(self) -> int:
        return len(self._holders)

    @property
    def entries(self) -> int:
        """(node, block) pairs indexed."""
        return sum(len(blocks) for blocks in self._blocks_of.values())

    # -- updates -----------------------------------------------------------------------
    def apply(self, event: KVEvent) -> ApplyStatus:
        node = NodeId(event.node)
        expected = self._next_seq.get(node, 0)
        if event.seq < expected:
            return ApplyStatus.DUPLICATE
        status = ApplyStatus.APPLIED
        if event.seq > expected:
            status = ApplyStatus.GAP
            self._stale.add(node)
            self.gaps_detected += 1
        self._next_seq[node] = event.seq + 1
        tier, kind = getattr(event, "tier", "device"), getattr(event, "kind", None)
        target, holder = (self, node) if tier == "device" else (self.tier(tier), STORE_NODE if tier == "cluster" else node)
        if kind == STORED:
            target.store(holder, event.block_hashes)
            if tier == "cluster" and self.store_lru is not None:
                dropped = self.store_lru.put(event.block_hashes)
                self.store_dropped += len(dropped)
                target.remove(holder, dropped)
        elif kind == REMOVED:
            target.remove(holder, event.block_hashes)
            if tier == "cluster" and self.store_lru is not None:
                self.store_lru.discard(event.block_hashes)
        elif kind == CLEARED:
            self.clear_node(node)
        else:
            raise IndexSyncError(f"not a KV event: {event!r}")
        return status

    def apply_all(self, events: Iterable[KVEvent]) -> list[ApplyStatus]:
        return [self.apply(e) for e in events]

    def store(self, node: NodeId, block_hashes: Iterable[int]) -> None:
        """Record that `node` caches these blocks (no sequence check; `apply` does that)."""
        holders = self._holders
        mine = self._blocks_of.get(node)
        if mine is None:
            mine = self._blocks_of[node] = set()
        hashes: Iterable[_Hash] = block_hashes
        new = [h for h in hashes if h not in mine]
        if not new:
            return
        mine.update(new)
        get = holders.get
        for h in new:
            held = get(h)
            if held is None:
                holders[h] = node
            elif type(held) is set:
                held.add(node)
            elif held != node:  # (a chain naming one block twice lists it twice in `new`)
                holders[h] = {held, node}  # type: ignore[arg-type]

    def remove(self, node: NodeId, block_hashes: Iterable[int]) -> None:
        """Record that `node` evicted these blocks; unknown blocks are ignored."""
        holders = self._holders
        mine = self._blocks_of.get(node)
        if not mine:
            return
        hashes: Iterable[_Hash] = block_hashes
        for h in hashes:
            if h not in mine:
                continue
            mine.discard(h)
            _drop_holder(holders, h, node)

    def clear_node(self, node: NodeId) -> None:
        """Forget what `node` holds: its device blocks and its own lower tiers (the cluster
        store's blocks are not the node's)."""
        mine = self._blocks_of.get(node)
        if mine:
            self.remove(node, list(mine))
        for name, idx in self.tiers.items():
            if name != "cluster":
                idx.clear_node(node)

    def remove_node(self, node: NodeId) -> None:
        """Forget a node entirely (it died or left): its blocks and its sequence state."""
        self.clear_node(node)
        self._blocks_of.pop(node, None)
        self._next_seq.pop(node, None)
        self._stale.discard(node)
        for name, idx in self.tiers.items():
            if name != "cluster":
                idx.remove_node(node)

    def resync(self, node: NodeId, block_hashes: Iterable[int], next_seq: int) -> None:
        """Replace what the index holds for `node` with a snapshot taken at `next_seq`."""
        self.clear_node(node)
        self.store(node, block_hashes)
        self._next_seq[node] = next_seq
        self._stale.discard(node)

    def snapshot(self) -> Mapping[NodeId, frozenset[int]]:
        """Node -> blocks it caches (a copy; for tests and debugging)."""
        return {n: frozenset(b) for n, b in self._blocks_of.items() if b}


class PendingPrefixes:
    """Blocks that queued prefills will cache: node -> the prompt blocks of the requests
    dispatched to it and not done yet, counted (two queued requests may share a block).

    A prefill node serves its queue in order, so a request placed behind them finds these
    blocks cached when it starts: as good as cached for a placement on that node (nothing
    to pull from it yet). `longest_prefix` answers as the global index does, from a holder
    map of the same shape (block hash -> a node, or a set of them) that the counts keep: a
    block enters it with its first count on a node and leaves it with its last.
    """

    def __init__(self) -> None:
        self._holders: dict[_Hash, NodeId | set[NodeId]] = {}
        self._counts: dict[NodeId, dict[_Hash, int]] = {}

    def add(self, node: NodeId, block_hashes: Sequence[BlockHash]) -> None:
        counts = self._counts.get(node)
        if counts is None:
            counts = self._counts[node] = {}
        holders = self._holders
        get, held_by = counts.get, holders.get
        hashes: Sequence[_Hash] = block_hashes
        for h in hashes:
            c = get(h)
            if c is not None:
                counts[h] = c + 1
                continue
            counts[h] = 1
            held = held_by(h)
            if held is None:
                holders[h] = node
            elif type(held) is set:
                held.add(node)
            elif held != node:
                holders[h] = {held, node}  # type: ignore[arg-type]

    def discard(self, node: NodeId, block_hashes: Sequence[BlockHash]) -> None:
        counts = self._counts.get(node)
        if not counts:
            return
        get = counts.get
        hashes: Sequence[_Hash] = block_hashes
        for h in hashes:
            c = get(h, 0)
            if c > 1:
                counts[h] = c - 1
            elif c == 1:
                del counts[h]
                _drop_holder(self._holders, h, node)

    def forget(self, node: NodeId) -> None:
        for h in self._counts.pop(node, {}):
            _drop_holder(self._holders, h, node)

    def longest_prefix(self, block_hashes: Sequence[BlockHash]) -> dict[NodeId, int]:
        return _longest_prefix(self._holders, block_hashes)

    def blocks_on(self, node: NodeId) -> int:
        return len(self._counts.get(node, ()))
