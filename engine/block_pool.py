"""The KV block pool: reference counts, prefix caching by chained block hashes, lazy LRU eviction.

Every block of the node's KV region is in exactly one of three states:

* in use   -- ref_count > 0; owned by one or more running requests;
* cached   -- ref_count == 0 but still holds a full block whose hash is in the hash map;
              it sits in the free queue and is evicted (its hash dropped) only when reused;
* empty    -- ref_count == 0, no hash; in the free queue.

The free queue is in LRU order: `free()` appends at the tail, `allocate()` pops from the head.
A full block's key is `hash(parent_key, its token ids)` (xxhash64), so equal keys mean equal
prefixes; the block's token ids are kept and compared on lookup to rule out collisions.
Listeners see every hash stored or removed (the conductor's global index is built from them).

Tiers below the device (`engine/tiers`) attach as `tiers`: they see every cached block just
before eviction reuses it (`on_evict`: demotion), every newly cached block (`on_cache`), and
fill an admitted request's fresh blocks with the chain's next blocks they hold (`load_prefix`:
promotion).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, NewType, Sequence

import numpy as np
import xxhash

BlockHash = NewType("BlockHash", int)
BlockId = NewType("BlockId", int)

_ROOT = 0x6D6F6F6E  # parent key of a prompt's first block


def hash_block(parent: int | None, token_ids: Sequence[int]) -> BlockHash:
    h = xxhash.xxh64(seed=_ROOT if parent is None else 0)
    if parent is not None:
        h.update(int(parent).to_bytes(8, "little"))
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return BlockHash(h.intdigest())


def block_hashes(token_ids: Sequence[int], block_size: int, parent: int | None = None) -> list[BlockHash]:
    """Chained hashes of every *full* block of `token_ids`."""
    out: list[BlockHash] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start:start + block_size])
        out.append(parent)
    return out


def chain_mismatch(hashes: Sequence[int], token_ids: Sequence[int], block_size: int) -> str | None:
    """Why `hashes` (computed elsewhere: the conductor hashes every prompt at intake) are
    not the chain of `token_ids`' full blocks, or None when they pass the check.

    The check is cheap on purpose, two block hashes whatever the prompt's length: the count
    must be the prompt's full blocks, the first hash that of the first block (the root: the
    same hash function and seed) and the last the hash of the last block under its claimed
    parent (the prompt's tail, where two prompts of one length usually differ; a wrong
    parent fails it too). The blocks between are taken on trust. That is the choice: the
    chain comes from the node's caller, the conductor, which computes it from the very
    token list it sends, so the failures to expect are a conductor of another block size or
    hash version, or a chain sent with the wrong request, and these fail the check; a chain
    that fails is dropped and the node hashes the prompt itself (slower, not wrong). A chain
    forged in its middle would pass and could serve or publish KV under wrong keys; hashing
    every block again to rule that out would cost what sending the chain saves. A node's
    gRPC port already trusts its caller that far (the KV targets it writes and the pull
    sources it reads from could plant wrong KV too), so it must be reachable by the
    conductor alone (loopback by default)."""
    n = len(token_ids) // block_size
    if len(hashes) != n:
        return f"{len(hashes)} hashes for {n} full blocks of {block_size} tokens"
    if n == 0:
        return None
    if hashes[0] != hash_block(None, token_ids[:block_size]):
        return "the first block's hash differs"
    if n > 1 and hashes[-1] != hash_block(hashes[-2], token_ids[(n - 1) * block_size:n * block_size]):
        return "the last block's hash differs"
    return None


STORED, REMOVED, CLEARED = "stored", "removed", "cleared"  # KVEvent.kind


@dataclass(frozen=True, slots=True, init=False)
class KVEvent:
    """A change to the set of block hashes a node caches: the one record of it, from the
    block pool (and the tiers below it, `engine/tiers`) through the prefill node's event log
    to the conductor's global prefix index (`conductor/prefix_index.py`). Its only wire form
    is `node_pb2.KVEvent` (`proto.convert.kv_event_to_proto` / `kv_event_from_proto`).

    * `kind`: `stored` (`block_hashes`, a chain parent first, are now cached), `removed`
      (they were evicted) or `cleared` (the node dropped its whole cache);
    * `parent_hash`: the block before the first stored one (None at a prompt's start, and
      for removals); the index does not need it (a lookup walks a request's own chain), it
      keeps the event self-describing for replay and debugging;
    * `tier`: where the blocks are: `device` (the KV region), `host` / `disk` (the node's
      tiers below it), `cluster` (blocks the node put to the cluster store);
    * `seq`: the node's numbering, 1, 2, ... without gaps (the pool emits 0: the node's event
      log numbers them); `node`: the publishing node's id (set where the event is received).
    """

    kind: str
    block_hashes: tuple[int, ...] = ()
    parent_hash: int | None = None
    tier: str = "device"  # device | host | disk | cluster
    seq: int = 0
    node: str = ""

    # Written out (the fields, in order): a compiled dataclass's generated __init__ runs
    # interpreted. tests/bench/test_record_inits.py holds it to the fields.
    def __init__(self, kind: str, block_hashes: tuple[int, ...] = (), parent_hash: int | None = None,
                 tier: str = "device", seq: int = 0, node: str = "") -> None:
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "block_hashes", block_hashes)
        object.__setattr__(self, "parent_hash", parent_hash)
        object.__setattr__(self, "tier", tier)
        object.__setattr__(self, "seq", seq)
        object.__setattr__(self, "node", node)


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref = [0] * num_blocks
        self._hash: list[BlockHash | None] = [None] * num_blocks
        self._tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self._parent: list[int | None] = [None] * num_blocks  # a cached block's parent hash
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[BlockHash, int] = {}
        self._listeners: list[Callable[[KVEvent], None]] = []
        self.tiers = None  # engine.tiers.TierManager, when tiers below the device are attached
        self.prefix_queries = 0  # tokens looked up
        self.prefix_hits = 0  # tokens found cached

    # --- observation -------------------------------------------------------------------
    def add_listener(self, fn: Callable[[KVEvent], None]) -> None:
        self._listeners.append(fn)

    def _emit(self, event: KVEvent) -> None:
        for fn in self._listeners:
            fn(event)

    @property
    def num_free(self) -> int:
        """Blocks that can be allocated now (empty or cached-but-unused)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    def cached_hashes(self) -> list[int]:
        return list(self._cached)

    def cached_block(self, h: int) -> tuple[int, tuple[int, ...], int | None] | None:
        """(block, token ids, parent hash) of the device block cached as `h`, or None."""
        b = self._cached.get(h)  # type: ignore[call-overload]
        if b is None:
            return None
        return b, self._tokens[b], self._parent[b]  # type: ignore[return-value]

    def parent_of(self, block: int) -> int | None:
        """The parent hash of cached `block` (None for a prompt's first block, or not cached)."""
        return self._parent[block]

    # --- prefix cache ----------------------------------------------------------------
    def match_prefix(self, hashes: Sequence[BlockHash], token_ids: Sequence[int]) -> list[BlockId]:
        """Cached blocks holding the longest prefix of `hashes`; does not take references."""
        found: list[BlockId] = []
        bs = self.block_size
        for i, h in enumerate(hashes):
            b = self._cached.get(h)
            if b is None or self._tokens[b] != tuple(token_ids[i * bs:(i + 1) * bs]):
                break
            found.append(BlockId(b))
        return found

    def record_lookup(self, queried_tokens: int, hit_tokens: int) -> None:
        self.prefix_queries += queried_tokens
        self.prefix_hits += hit_tokens

    def touch(self, blocks: Sequence[int]) -> None:
        """Take a reference on (possibly cached, free) blocks."""
        for b in blocks:
            if self._ref[b] == 0:
                del self._free[b]
            self._ref[b] += 1

    def cache_block(self, block: int, h: BlockHash, token_ids: Sequence[int], parent: int | None) -> None:
        """Publish a full, computed block under its hash (first writer wins on duplicates)."""
        if self._hash[block] is not None or h in self._cached:
            return
        self._hash[block] = h
        self._tokens[block] = tuple(token_ids)
        self._parent[block] = parent
        self._cached[h] = block
        self._emit(KVEvent(STORED, (h,), parent))
        if self.tiers is not None:
            self.tiers.on_cache(block, h, token_ids)

    def load_prefix(self, request_id: str, hashes: Sequence[BlockHash], token_ids: Sequence[int],
                    cached: Sequence[int], new: Sequence[int], limit: int) -> int:
        """After `cached` (the device's blocks of the chain `hashes`) and `new` were taken for
        a request: fill the leading `new` blocks with the chain's next blocks from the tiers
        below, publish them, and return how many (at most `limit` - len(cached))."""
        if self.tiers is None:
            return 0
        return self.tiers.fill(request_id, hashes, token_ids, cached, new, limit)

    # --- allocation ------------------------------------------------------------------
    def allocate(self, n: int) -> list[BlockId] | None:
        """`n` blocks with one reference each, evicting LRU cached blocks; None if too few."""
        if n > len(self._free):
            return None
        out: list[BlockId] = []
        evicted: list[int] = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            h = self._hash[b]
            if h is not None:
                if self.tiers is not None:
                    self.tiers.on_evict(b, h, self._tokens[b])  # demote before the block is reused
                del self._cached[h]
                self._hash[b] = None
                self._tokens[b] = None
                self._parent[b] = None
                evicted.append(h)
            self._ref[b] = 1
            out.append(BlockId(b))
        if evicted:
            self._emit(KVEvent(REMOVED, tuple(evicted)))
        return out

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference from each block. Pass blocks in prefix order: the tail of a
        sequence becomes least-recently-used first, so shared prefixes outlive suffixes."""
        for b in reversed(blocks):
            if self._ref[b] <= 0:
                raise RuntimeError(f"block {b} freed more often than allocated")
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free[b] = None

    def reset_prefix_cache(self) -> int:
        """Forget every cached hash of unused blocks; returns how many were dropped."""
        dropped = [h for h, b in self._cached.items() if self._ref[b] == 0]
        for h in dropped:
            b = self._cached.pop(h)
            self._hash[b] = None
            self._tokens[b] = None
            self._parent[b] = None
        if dropped:
            self._emit(KVEvent(REMOVED, tuple(dropped)))
        return len(dropped)
