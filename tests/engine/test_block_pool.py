from engine.block_pool import BlockPool, KVEvent, block_hashes, hash_block


def test_hashes_are_chained_and_only_cover_full_blocks():
    a = block_hashes(list(range(40)), 16)
    b = block_hashes(list(range(32)) + [99] * 8, 16)
    assert len(a) == 2 and a == b  # the partial third block is not hashed
    c = block_hashes([7] + list(range(1, 40)), 16)
    assert c[0] != a[0] and c[1] != a[1]  # a changed first block changes every later key
    assert hash_block(a[0], list(range(16, 32))) == a[1]


def test_allocate_free_counts_exact():
    pool = BlockPool(8, 4)
    got = pool.allocate(5)
    assert len(got) == 5 and pool.num_free == 3 and pool.num_used == 5
    assert pool.allocate(4) is None and pool.num_free == 3  # failed allocation takes nothing
    pool.free(got)
    assert pool.num_free == 8 and pool.num_used == 0


def test_double_free_is_an_error():
    pool = BlockPool(2, 4)
    (b,) = pool.allocate(1)
    pool.free([b])
    try:
        pool.free([b])
    except RuntimeError as e:
        assert "freed more often" in str(e)
    else:
        raise AssertionError("double free accepted")


def test_prefix_match_touch_and_lazy_lru_eviction():
    events: list[KVEvent] = []
    pool = BlockPool(4, 2)
    pool.add_listener(events.append)
    toks = [1, 2, 3, 4]
    hs = block_hashes(toks, 2)
    blocks = pool.allocate(2)
    for i, (b, h) in enumerate(zip(blocks, hs)):
        pool.cache_block(b, h, toks[2 * i:2 * i + 2], hs[i - 1] if i else None)
    pool.free(blocks)
    assert pool.num_free == 4 and pool.num_cached == 2  # cached blocks are free but keep their hash
    assert pool.match_prefix(hs, toks) == blocks
    assert pool.match_prefix(hs, [1, 2, 3, 5]) == blocks[:1]  # token check guards the second block
    # two empty blocks go first, then the LRU cached block: the sequence's tail (freed first)
    pool.allocate(3)
    assert [e.kind for e in events] == ["stored", "stored", "removed"]
    assert events[-1].block_hashes == (hs[1],)
    assert pool.match_prefix(hs, toks) == blocks[:1]
    pool.touch(blocks[:1])
    assert pool.ref_count(blocks[0]) == 1 and pool.num_free == 0


def test_duplicate_hash_keeps_first_block():
    pool = BlockPool(4, 2)
    h = block_hashes([5, 6], 2)[0]
    a, b = pool.allocate(2)
    pool.cache_block(a, h, [5, 6], None)
    pool.cache_block(b, h, [5, 6], None)
    assert pool.num_cached == 1 and pool.match_prefix([h], [5, 6]) == [a]
