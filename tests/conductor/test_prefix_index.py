"""The global prefix index stays exact under KV events, including evictions and lost events."""
from __future__ import annotations

import random

import pytest

from conductor.prefix_index import ApplyStatus, GlobalPrefixIndex
from conductor.request import BlockHash, NodeId
from engine.block_pool import CLEARED, REMOVED, STORED, KVEvent

A, B, C = NodeId("a"), NodeId("b"), NodeId("c")


def h(*ids: int) -> tuple[BlockHash, ...]:
    return tuple(BlockHash(i) for i in ids)


def test_longest_prefix_per_node():
    idx = GlobalPrefixIndex()
    idx.apply(KVEvent(STORED, h(1, 2, 3, 4), seq=0, node=A))
    idx.apply(KVEvent(STORED, h(1, 2), seq=0, node=B))
    idx.apply(KVEvent(STORED, h(9), seq=0, node=C))
    assert idx.longest_prefix(h(1, 2, 3, 4, 5)) == {A: 4, B: 2}
    assert idx.longest_prefix(h(1, 2, 7)) == {A: 2, B: 2}
    assert idx.longest_prefix(h(9, 2)) == {C: 1}
    assert idx.longest_prefix(h(5)) == {}
    assert idx.longest_prefix(()) == {}
    assert (idx.distinct_blocks, idx.entries, idx.blocks_on(A)) == (5, 7, 4)


def test_an_evicted_middle_block_cuts_the_prefix_there():
    idx = GlobalPrefixIndex()
    idx.apply(KVEvent(STORED, h(1, 2, 3, 4), seq=0, node=A))
    idx.apply(KVEvent(STORED, h(1, 2, 3, 4), seq=0, node=B))
    assert idx.apply(KVEvent(REMOVED, h(3), seq=1, node=A)) is ApplyStatus.APPLIED
    assert idx.longest_prefix(h(1, 2, 3, 4)) == {A: 2, B: 4}
    idx.apply(KVEvent(REMOVED, h(1), seq=1, node=B))
    assert idx.longest_prefix(h(1, 2, 3, 4)) == {A: 2}
    assert idx.holders(BlockHash(4)) == {A, B}  # still cached, just unreachable by prefix
    idx.apply(KVEvent(REMOVED, h(1, 2, 4, 99), seq=2, node=A))  # 99 was never stored: ignored
    assert idx.holders(BlockHash(1)) == frozenset() and idx.blocks_on(A) == 0


def test_storing_twice_and_removing_from_one_holder():
    idx = GlobalPrefixIndex()
    idx.store(A, h(1, 2))
    idx.store(A, h(1, 2))
    idx.store(B, h(1))
    assert idx.entries == 3
    idx.remove(B, h(1))
    assert idx.holders(BlockHash(1)) == {A}
    assert idx.longest_prefix(h(1, 2)) == {A: 2}


def test_duplicates_are_ignored_and_gaps_mark_the_node_stale():
    idx = GlobalPrefixIndex()
    assert idx.apply(KVEvent(STORED, h(1), seq=0, node=A)) is ApplyStatus.APPLIED
    assert idx.apply(KVEvent(STORED, h(2), seq=0, node=A)) is ApplyStatus.DUPLICATE
    assert idx.longest_prefix(h(1, 2)) == {A: 1}
    assert idx.apply(KVEvent(STORED, h(2), seq=3, node=A)) is ApplyStatus.GAP  # events 1 and 2 were lost
    assert idx.stale_nodes() == {A} and idx.gaps_detected == 1 and idx.next_seq(A) == 4
    assert idx.longest_prefix(h(1, 2)) == {A: 2}  # applied anyway
    idx.resync(A, h(7, 8), next_seq=10)
    assert idx.stale_nodes() == frozenset()
    assert idx.longest_prefix(h(1, 2)) == {} and idx.longest_prefix(h(7, 8)) == {A: 2}
    assert idx.apply(KVEvent(STORED, h(9), seq=10, node=A)) is ApplyStatus.APPLIED


def test_a_node_joining_mid_stream_is_stale_until_resynced():
    idx = GlobalPrefixIndex()
    assert idx.apply(KVEvent(STORED, h(1), seq=5, node=B)) is ApplyStatus.GAP
    assert idx.stale_nodes() == {B}


def test_clear_and_remove_node():
    idx = GlobalPrefixIndex()
    idx.apply(KVEvent(STORED, h(1, 2), seq=0, node=A))
    idx.apply(KVEvent(STORED, h(1, 2), seq=0, node=B))
    idx.apply(KVEvent(CLEARED, seq=1, node=A))
    assert idx.longest_prefix(h(1, 2)) == {B: 2} and idx.next_seq(A) == 2
    idx.remove_node(B)
    assert idx.longest_prefix(h(1, 2)) == {} and idx.entries == 0 and idx.next_seq(B) == 0


def test_random_events_match_a_brute_force_model():
    """Differential test: after every event the index answers exactly what a per-node set
    of blocks answers, for chained prompts that share prefixes."""
    rng = random.Random(42)
    nodes = [NodeId(f"n{i}") for i in range(6)]
    # 40 conversations of up to 12 blocks, all opening with block 0 (a shared system prompt)
    chains = [h(0, *(1000 * c + i for i in range(1, rng.randint(2, 12)))) for c in range(40)]
    truth: dict[NodeId, set[int]] = {n: set() for n in nodes}
    seq = {n: 0 for n in nodes}
    idx = GlobalPrefixIndex()
    for step in range(3000):
        node = rng.choice(nodes)
        chain = rng.choice(chains)
        if rng.random() < 0.6:
            blocks = chain[: rng.randint(1, len(chain))]
            event = KVEvent(STORED, blocks, seq=seq[node], node=node)
            truth[node].update(blocks)
        else:  # evict a random subset of what the node holds (LRU order is the node's business)
            held = sorted(truth[node])
            blocks = tuple(rng.sample(held, k=min(len(held), rng.randint(1, 4)))) if held else h(123456)
            event = KVEvent(REMOVED, blocks, seq=seq[node], node=node)
            truth[node].difference_update(blocks)
        seq[node] += 1
        assert idx.apply(event) is ApplyStatus.APPLIED
        query = rng.choice(chains)[: rng.randint(1, 12)] + h(rng.randint(1, 10**6))
        expected = {}
        for n in nodes:
            depth = 0
            while depth < len(query) and query[depth] in truth[n]:
                depth += 1
            if depth:
                expected[n] = depth
        assert idx.longest_prefix(query) == expected, f"after event {step}"
    assert idx.snapshot() == {n: frozenset(b) for n, b in truth.items() if b}
    assert idx.entries == sum(len(b) for b in truth.values())


def test_apply_rejects_what_is_not_an_event():
    from dataclasses import dataclass

    from conductor.errors import IndexSyncError

    @dataclass
    class Bogus:
        node: NodeId
        seq: int

    with pytest.raises(IndexSyncError, match="not a KV event"):
        GlobalPrefixIndex().apply(Bogus(A, 0))  # type: ignore[arg-type]
    with pytest.raises(IndexSyncError, match="not a KV event"):
        GlobalPrefixIndex().apply(KVEvent("evicted", (1,), seq=0, node=A))  # not a kind


def test_pending_prefixes_answer_as_an_index_of_the_blocks_still_counted():
    """Random adds, discards and forgets on shared chains: `PendingPrefixes` answers every
    query as a `GlobalPrefixIndex` holding exactly the blocks with a count left per node."""
    import random
    from collections import Counter

    from conductor.prefix_index import GlobalPrefixIndex, PendingPrefixes

    rng = random.Random(7)
    nodes = [NodeId(f"p{i}") for i in range(4)]
    chains = [tuple(range(b, b + rng.randint(1, 6))) for b in (0, 0, 2, 10, 10, 20)]
    pending = PendingPrefixes()
    counts: dict = {n: Counter() for n in nodes}
    queued: list = []
    for step in range(600):
        r = rng.random()
        if r < 0.5:
            node, chain = rng.choice(nodes), rng.choice(chains)
            pending.add(node, chain)
            counts[node].update(chain)
            queued.append((node, chain))
        elif r < 0.9 and queued:
            node, chain = queued.pop(rng.randrange(len(queued)))
            pending.discard(node, chain)
            counts[node].subtract(chain)
        elif r >= 0.9:
            node = rng.choice(nodes)
            pending.forget(node)
            counts[node] = Counter()
            queued = [q for q in queued if q[0] != node]
        reference = GlobalPrefixIndex()
        for node, c in counts.items():
            reference.store(node, [h for h, k in c.items() if k > 0])
        for chain in chains:
            assert pending.longest_prefix(chain) == reference.longest_prefix(chain), step
        for node in nodes:
            assert pending.blocks_on(node) == sum(1 for k in counts[node].values() if k > 0), step
