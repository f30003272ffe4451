"""A block put to the cluster store takes its ancestors along: the device evicts a chain's
tail first, and without its head blocks in the store the tail is of no use to another node."""
from __future__ import annotations

from test_tiers_engine import BS, GREEDY, PROMPT, make, reference, settle  # noqa: F401  (fixture)

from engine.tiers import FakeStore


def evict_tail(eng, n: int) -> None:
    """Make the device evict exactly its `n` least recently used cached blocks (a freed
    request's tail goes first): take free blocks one by one until `n` cached ones went."""
    goal = eng.pool.num_cached - n
    held = []
    while eng.pool.num_cached > goal:
        held += eng.pool.allocate(1)
    eng.pool.free(held)


def test_a_chain_tail_evicted_alone_is_usable_from_the_store_by_another_node(tiny_model_dir, tmp_path, reference):
    store = FakeStore()
    eng, tiers = make(tiny_model_dir, tmp_path / "a", disk=0, store=store)
    want = reference(PROMPT)
    assert eng.generate([PROMPT], GREEDY)[0] == want
    assert eng.pool.num_cached == 6  # 6 full blocks of prompt + answer (101 + 7 computed tokens)
    evict_tail(eng, 1)
    settle(tiers)
    assert eng.pool.num_cached == 5  # the head is still on the device ...
    assert len(store.keys()) == 6  # ... and in the store, with the evicted tail
    assert tiers.host.num_cached == 6  # the ancestors went through the host pool
    ev = tiers.stats().events
    assert ev.get("ancestor_puts") == 5 and ev.get("put_failures", 0) == 0 and "ancestor_missing" not in ev

    other, ot = make(tiny_model_dir, tmp_path / "b", disk=0, store=store)  # a node that never saw the prompt
    assert other.generate([PROMPT], GREEDY)[0] == want
    assert ot.stats().hit_tokens["cluster"] == 6 * BS

    # the next block to go went down to the host pool and the store as an ancestor already:
    # nothing is copied or put twice
    puts = store.puts
    evict_tail(eng, 1)
    settle(tiers)
    assert eng.pool.num_cached == 4 and len(store.keys()) == 6
    assert tiers.stats().events["ancestor_puts"] == 5
    assert store.puts == puts
    assert tiers.host.num_cached == 6
    settle(ot)
    tiers.close()
    ot.close()


def test_no_ancestor_walk_without_a_store(tiny_model_dir, tmp_path, reference):
    eng, tiers = make(tiny_model_dir, tmp_path, disk=0)
    assert eng.generate([PROMPT], GREEDY)[0] == reference(PROMPT)
    evict_tail(eng, 1)
    settle(tiers)
    assert tiers.host.num_cached == 1  # write-back copies only the evicted block down
    assert "ancestor_puts" not in tiers.stats().events
    tiers.close()
