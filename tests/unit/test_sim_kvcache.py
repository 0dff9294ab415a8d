"""The prefix-caching KV block manager: hashing, hits, reference counts, LRU eviction, all-or-nothing."""

from __future__ import annotations

import pytest

from inferoute.sim.kvcache import PrefixKVCache, block_hashes

BS = 4


def toks(*blocks: int) -> list[int]:
    """One full block of 4 tokens per argument, tokens derived from the argument."""
    return [b * 10 + i for b in blocks for i in range(BS)]


def test_hashes_are_chained_over_full_blocks_only() -> None:
    a = block_hashes([*toks(1, 2, 3), 99], BS, "m")
    assert len(a) == 3  # the trailing partial block has no hash
    assert block_hashes(toks(1, 2, 3), BS, "m") == a
    b = block_hashes(toks(1, 2, 4), BS, "m")
    assert b[:2] == a[:2] and b[2] != a[2]
    # changing the first block changes every later hash (the chain names the whole prefix)
    c = block_hashes(toks(9, 2, 3), BS, "m")
    assert all(x != y for x, y in zip(a, c, strict=True))


def test_hashes_differ_per_namespace_and_seed() -> None:
    base = block_hashes(toks(1, 2), BS, "m")
    assert block_hashes(toks(1, 2), BS, "lora-a") != base
    assert block_hashes(toks(1, 2), BS, "m", seed=1) != base


def test_miss_then_hit_after_release() -> None:
    kv = PrefixKVCache(8, BS)
    h = block_hashes(toks(1, 2, 3), BS, "m")
    blocks, hit = kv.allocate(h, 4, max_hit_blocks=3) or ([], -1)
    assert hit == 0 and len(blocks) == 4
    assert kv.num_free == 4 and kv.usage == pytest.approx(0.5)
    kv.release(blocks)
    assert kv.num_free == 8 and kv.usage == 0.0
    assert kv.cached_prefix(h) == 3  # freed blocks keep their hashes
    again = kv.allocate(h, 4, max_hit_blocks=3)
    assert again is not None
    blocks2, hit2 = again
    assert hit2 == 3 and blocks2[:3] == blocks[:3]


def test_max_hit_blocks_caps_reuse() -> None:
    kv = PrefixKVCache(8, BS)
    h = block_hashes(toks(1, 2, 3), BS, "m")
    got = kv.allocate(h, 3, 3)
    assert got is not None
    kv.release(got[0])
    got2 = kv.allocate(h, 3, max_hit_blocks=2)
    assert got2 is not None and got2[1] == 2


def test_shared_blocks_are_reference_counted() -> None:
    kv = PrefixKVCache(8, BS)
    h = block_hashes(toks(1, 2), BS, "m")
    a = kv.allocate(h, 3, 2)
    b = kv.allocate(h, 3, 2)
    assert a is not None and b is not None
    assert b[1] == 2 and a[0][:2] == b[0][:2]
    assert kv.num_free == 8 - 4  # 2 shared + 1 private each
    kv.release(a[0])
    assert kv.num_free == 5  # only a's private block came back; the shared ones are still in use by b
    kv.release(b[0])
    assert kv.num_free == 8


def test_eviction_takes_least_recently_freed_first() -> None:
    kv = PrefixKVCache(4, BS)
    hx = block_hashes(toks(1, 2), BS, "m")
    hy = block_hashes(toks(3, 4), BS, "m")
    x = kv.allocate(hx, 2, 2)
    y = kv.allocate(hy, 2, 2)
    assert x is not None and y is not None
    kv.release(x[0])
    kv.release(y[0])
    z = kv.allocate(block_hashes(toks(5, 6), BS, "m"), 2, 2)
    assert z is not None
    assert kv.cached_prefix(hx) == 0  # x was freed first: evicted
    assert kv.cached_prefix(hy) == 2  # y survives
    assert kv.evictions == 2


def test_a_sequence_frees_its_tail_block_first() -> None:
    kv = PrefixKVCache(2, BS)
    hx = block_hashes(toks(1, 2), BS, "m")
    x = kv.allocate(hx, 2, 2)
    assert x is not None
    kv.release(x[0])
    assert kv.free_order() == [x[0][1], x[0][0]]
    one = kv.allocate(block_hashes(toks(7), BS, "m"), 1, 1)
    assert one is not None and one[0] == [x[0][1]]
    assert kv.cached_prefix(hx) == 1  # the first block of x is still reusable


def test_allocation_is_all_or_nothing() -> None:
    kv = PrefixKVCache(4, BS)
    held = kv.allocate(block_hashes(toks(1, 2, 3), BS, "m"), 3, 3)
    assert held is not None
    before = (kv.num_free, kv.free_order(), kv.num_cached)
    assert kv.allocate(block_hashes(toks(5, 6), BS, "m"), 2, 2) is None
    assert (kv.num_free, kv.free_order(), kv.num_cached) == before


def test_cached_free_blocks_count_toward_a_hit_not_twice() -> None:
    kv = PrefixKVCache(3, BS)
    h = block_hashes(toks(1, 2), BS, "m")
    first = kv.allocate(h, 2, 2)
    assert first is not None
    kv.release(first[0])
    # 3 free blocks, 2 of them hold the hit: a 3-block request reuses 2 and needs 1 new -> fits.
    got = kv.allocate(h, 3, 2)
    assert got is not None and got[1] == 2 and kv.num_free == 0


def test_over_release_is_detected() -> None:
    kv = PrefixKVCache(2, BS)
    got = kv.allocate([], 1, 0)
    assert got is not None
    kv.release(got[0])
    with pytest.raises(AssertionError):
        kv.release(got[0])
