"""The conductor models the cluster store's silent LRU eviction: `StoreLru` and
`GlobalPrefixIndex.bound_store` keep the cluster tier's entries to the store's capacity."""
from __future__ import annotations

import pytest

from conductor.prefix_index import STORE_NODE, GlobalPrefixIndex
from conductor.request import BlockHash, NodeId
from conductor.store_lru import StoreLru
from engine.block_pool import REMOVED, STORED, KVEvent

A, B, C = NodeId("a"), NodeId("b"), NodeId("c")


def h(*ids: int) -> tuple[BlockHash, ...]:
    return tuple(BlockHash(i) for i in ids)


def cluster(idx: GlobalPrefixIndex) -> frozenset[int]:
    return idx.tier("cluster").snapshot().get(STORE_NODE, frozenset())


def test_store_lru_drops_the_least_recently_put_or_hit():
    lru = StoreLru(3)
    assert lru.put([1, 2, 3]) == []
    assert lru.put([4]) == [1]
    lru.touch([2, 99])  # a hit refreshes; an unknown block is ignored
    assert lru.order() == [3, 4, 2]
    assert lru.put([5]) == [3]
    assert lru.put([4]) == [] and lru.order() == [2, 5, 4]  # a put of a held block refreshes it
    lru.discard([5, 77])
    assert lru.order() == [2, 4] and len(lru) == 2 and 5 not in lru
    assert lru.put([6, 7, 8, 9]) == [2, 4, 6]  # one put larger than the room drops its own head
    assert lru.order() == [7, 8, 9]
    with pytest.raises(ValueError):
        StoreLru(0)


def test_the_bounded_cluster_tier_drops_what_the_store_has_surely_evicted():
    idx = GlobalPrefixIndex()
    idx.bound_store(3)
    idx.apply(KVEvent(STORED, h(1, 2, 3), tier="cluster", seq=0, node=A))
    idx.apply(KVEvent(STORED, h(4), tier="cluster", seq=0, node=B))
    assert cluster(idx) == {2, 3, 4} and idx.store_dropped == 1
    assert idx.lower_tier_run(C, h(1, 2, 3), 0) == {}  # block 1 is gone: no store run from the head
    assert idx.lower_tier_run(C, h(2, 3, 4), 0) == {"cluster": 3}
    # a lookup that found 3 absent: the model forgets it too, so the next put drops nothing
    idx.apply(KVEvent(REMOVED, h(3), tier="cluster", seq=1, node=C))
    idx.apply(KVEvent(STORED, h(5), tier="cluster", seq=1, node=A))
    assert cluster(idx) == {2, 4, 5} and idx.store_dropped == 1
    # the host and disk tiers are the nodes' own and exact: never bounded
    idx.apply(KVEvent(STORED, h(10, 11, 12, 13), tier="host", seq=2, node=A))
    assert idx.tier("host").blocks_on(A) == 4


def test_unbounded_the_cluster_tier_keeps_every_hint():
    idx = GlobalPrefixIndex()
    idx.apply(KVEvent(STORED, h(1, 2, 3), tier="cluster", seq=0, node=A))
    idx.apply(KVEvent(STORED, h(4), tier="cluster", seq=0, node=B))
    assert cluster(idx) == {1, 2, 3, 4} and idx.store_lru is None


def test_bounding_an_index_that_already_holds_more_trims_it():
    idx = GlobalPrefixIndex()
    idx.apply(KVEvent(STORED, h(1, 2, 3, 4, 5), tier="cluster", seq=0, node=A))
    idx.bound_store(2)
    assert len(cluster(idx)) == 2 and len(idx.store_lru) == 2


def test_a_placement_refreshes_the_store_blocks_the_node_will_load():
    idx = GlobalPrefixIndex()
    idx.bound_store(4)
    idx.apply(KVEvent(STORED, h(1, 2), seq=0, node=A))  # A's device holds the chain's first 2 blocks
    idx.apply(KVEvent(STORED, h(1, 3, 4, 10), tier="cluster", seq=1, node=B))
    idx.store_hit(A, h(1, 2, 3, 4, 5))  # A loads 3 and 4 from the store; 1 is on its device: not read
    assert idx.store_lru.order() == [1, 10, 3, 4]
    idx.apply(KVEvent(STORED, h(20, 21), tier="cluster", seq=2, node=B))
    assert cluster(idx) == {3, 4, 20, 21}
    idx.store_hit(C, h(7, 8))  # nothing of it in the store: no change
    assert idx.store_lru.order() == [3, 4, 20, 21]


def test_the_live_registry_sizes_the_store_from_the_first_nodes_block_layout():
    from conductor.registry import NodeRecord, NodeRegistry
    from engine.tiers.record import record_bytes
    from proto.halfmoon.v1 import node_pb2

    layout = node_pb2.KVLayout(block_size=16, block_bytes=16, total_blocks=64)
    rec_bytes = record_bytes(16, 16)  # a 16-byte block plus its trailer, padded: 128
    assert rec_bytes == 128
    reg = NodeRegistry(block_size=16, store_gib=(3 * rec_bytes + 100) / 2**30)  # room for 3 records, not 4
    reg.add(NodeRecord("p0", "prefill", "fake", layout, "", None, None, None), follow_events=False)
    assert reg.index.store_lru is not None and reg.index.store_lru.capacity == 3
    reg.index.apply(KVEvent(STORED, h(1, 2, 3, 4), tier="cluster", seq=0, node=A))
    assert cluster(reg.index) == {2, 3, 4}
    off = NodeRegistry(block_size=16)  # store_gib 0: unbounded
    off.add(NodeRecord("p0", "prefill", "fake", layout, "", None, None, None), follow_events=False)
    assert off.index.store_lru is None
