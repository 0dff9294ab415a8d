"""Prefix hashing and the approximate prefix index."""

from __future__ import annotations

from inferoute.epp.learned import PrefixIndex
from inferoute.epp.scheduling.prefix import PrefixHashCache, prefix_hashes


def test_hash_chain_identifies_the_whole_prefix() -> None:
    a = prefix_hashes("m", b"A" * 64 + b"B" * 64, block_size_tokens=16)
    b = prefix_hashes("m", b"C" * 64 + b"B" * 64, block_size_tokens=16)
    assert len(a) == 2 and len(b) == 2
    assert a[1] != b[1]  # same second block, different history


def test_shared_prefix_shares_leading_hashes() -> None:
    a = prefix_hashes("m", b"x" * 640 + b"tail one", block_size_tokens=16)
    b = prefix_hashes("m", b"x" * 640 + b"tail two!", block_size_tokens=16)
    assert a[:10] == b[:10] and a[10] != b[10]


def test_model_seeds_the_chain_and_partial_block_is_hashed() -> None:
    assert prefix_hashes("m1", b"y" * 70)[0] != prefix_hashes("m2", b"y" * 70)[0]
    assert len(prefix_hashes("m", b"y" * 70, block_size_tokens=16)) == 2  # 64 + partial 6


def test_max_blocks_caps_the_work() -> None:
    assert len(prefix_hashes("m", b"z" * 200_000, block_size_tokens=16, max_blocks=256)) == 256
    assert prefix_hashes("m", b"") == []


def test_match_counts_leading_blocks_per_endpoint() -> None:
    idx = PrefixIndex()
    h = prefix_hashes("m", b"q" * 64 * 8, block_size_tokens=16)
    idx.add("a", h)
    idx.add("b", h[:3])
    idx.add("c", h[1:])  # holds later blocks but not the first: no prefix match
    assert idx.match(h) == {"a": 8, "b": 3}
    assert idx.match(h, ["b", "c"]) == {"b": 3}
    assert idx.match([12345]) == {}


def test_lru_evicts_oldest_blocks_per_endpoint() -> None:
    idx = PrefixIndex(default_capacity=4)
    old = prefix_hashes("m", b"o" * 64 * 4, block_size_tokens=16)
    new = prefix_hashes("m", b"n" * 64 * 4, block_size_tokens=16)
    idx.add("a", old)
    idx.add("b", old)
    idx.add("a", new)  # pushes old out of a's LRU, b keeps it
    assert idx.match(old) == {"b": 4}
    assert idx.match(new) == {"a": 4}
    assert idx.endpoint_size("a") == 4
    assert idx.size() == 8


def test_capacity_shrink_and_endpoint_removal() -> None:
    idx = PrefixIndex()
    h = prefix_hashes("m", b"s" * 64 * 10, block_size_tokens=16)
    idx.add("a", h)
    idx.set_capacity("a", 3)  # keeps the 3 most recently used: the last three blocks
    assert idx.endpoint_size("a") == 3
    assert idx.match(h) == {}  # first blocks gone → no leading match
    idx.add("b", h)
    idx.remove_endpoint("b")
    assert idx.match(h) == {} and idx.endpoint_size("b") == 0


def test_many_endpoints_and_reused_slots() -> None:
    idx = PrefixIndex()
    h = prefix_hashes("m", b"k" * 64 * 6, block_size_tokens=16)
    for i in range(200):  # more endpoints than bits in a machine word
        idx.add(f"ep-{i}", h[: 1 + i % 6])
    got = idx.match(h)
    assert len(got) == 200 and got["ep-5"] == 6 and got["ep-6"] == 1 and got["ep-199"] == 2
    assert idx.match(h, ["ep-11", "ep-12", "nobody"]) == {"ep-11": 6, "ep-12": 1}
    idx.remove_endpoint("ep-5")
    idx.add("newcomer", h[:4])  # takes the freed slot
    got = idx.match(h)
    assert "ep-5" not in got and got["newcomer"] == 4 and len(got) == 200


def test_lru_is_weighted_in_tokens() -> None:
    idx = PrefixIndex(default_capacity=1000)
    doc_a = prefix_hashes("m", b"a" * 64 * 4, block_size_tokens=16)  # 4 blocks
    doc_b = prefix_hashes("m", b"b" * 64 * 4, block_size_tokens=16)
    idx.add("r", doc_a, tokens_per_block=200)  # a long prompt hashed in 4 blocks: 800 tokens
    assert idx.endpoint_tokens("r") == 800 and idx.match(doc_a) == {"r": 4}
    idx.add("r", doc_b, tokens_per_block=200)  # 1600 > 1000: the oldest blocks (doc a) go
    assert idx.endpoint_tokens("r") <= 1000
    assert idx.match(doc_a) == {} and idx.match(doc_b) == {"r": 4}
    idx.set_capacity("r", 10_000)
    idx.add("r", doc_a, tokens_per_block=200)
    assert idx.match(doc_a) == {"r": 4} and idx.match(doc_b) == {"r": 4}


def test_hash_cache_gives_the_chains_prefix_hashes_gives() -> None:
    cache = PrefixHashCache(capacity=2, min_blocks=4)
    doc = bytes(range(256)) * 40  # 10 KB: 40 blocks of 256 bytes at 64 tokens a block
    cases = [
        ("m", doc, 64, 256),
        ("m", doc, 64, 256),  # a hit
        ("other-model", doc, 64, 256),
        ("m", doc[:-1], 64, 256),  # one byte less: another trailing block
        ("m", doc + b"tail beyond the cap", 64, 8),  # capped at 8 blocks: the tail is not hashed
        ("m", doc, 16, 256),
        ("m", doc[:600], 64, 256),  # fewer than min_blocks blocks: hashed directly
    ]
    for model, prompt, block, max_blocks in cases:
        expected = prefix_hashes(model, prompt, block_size_tokens=block, max_blocks=max_blocks)
        got = cache.hashes(model, memoryview(prompt), block_size_tokens=block, max_blocks=max_blocks)
        assert got == expected
    assert cache.hits == 1 and cache.misses == 5 and len(cache._chains) == 2  # capacity
    first = cache.hashes("m", doc, block_size_tokens=16)
    first.append(0)  # callers get their own list
    assert cache.hashes("m", doc, block_size_tokens=16) == prefix_hashes("m", doc, block_size_tokens=16)
    capped = prefix_hashes("m", doc + b"x", block_size_tokens=64, max_blocks=8)
    assert cache.hashes("m", doc + b"y", block_size_tokens=64, max_blocks=8) == capped  # same hashed bytes
