"""A paged KV cache with automatic prefix caching, modelled on vLLM V1's block manager.

* The cache has ``num_blocks`` blocks of ``block_size`` tokens.
* A prompt's *full* blocks are named by chained hashes: ``h[i] = xxh64(h[i-1] || token ids of block i)``,
  with ``h[-1]`` derived from a namespace (the model or LoRA adapter name), so identical prefixes under
  different adapters never share blocks, and a block's hash names its whole prefix.
* Blocks are reference counted. A block whose count drops to zero goes to the tail of the free queue but
  keeps its hash, so a later request with the same prefix can reuse it (a *hit*) until it is evicted.
* Allocation takes blocks from the head of the free queue: the least recently freed first (LRU). Taking a
  block that still holds a hash evicts that cached prefix. Requests free their blocks tail first (the last
  block of a sequence is the least likely to be shared), exactly as vLLM does.
* An allocation is all or nothing: a request is admitted only when all its blocks fit.
* A hash may be held by several physical blocks (a prefix recomputed after an earlier block of it was
  evicted); lookups use one copy, and each copy is evicted on its own, as in vLLM.
* With ``events`` set to a list, every eviction of a hashed block appends a ``BlockRemoved`` for it (the
  engine appends the ``BlockStored`` events, which need the token ids the cache does not keep).

Pure code: no clock, no I/O.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Sequence

import xxhash

from inferoute.kvevents.wire import BlockRemoved, KVEvent


def block_hashes(
    tokens: Sequence[int],
    block_size: int,
    namespace: str,
    seed: int = 0,
    parent: int | None = None,
    start_block: int = 0,
) -> list[int]:
    """Chained hashes of the full blocks of ``tokens`` from block ``start_block`` on (a trailing partial block
    has none); ``parent`` is the hash of block ``start_block - 1`` (None: the namespace root)."""
    if parent is None:
        parent = int(xxhash.xxh64_intdigest(namespace.encode(), seed=seed))
    out: list[int] = []
    full = len(tokens) - len(tokens) % block_size
    packed = array("I", tokens[start_block * block_size : full]).tobytes()
    stride = 4 * block_size
    for start in range(0, len(packed), stride):
        parent = int(xxhash.xxh64_intdigest(parent.to_bytes(8, "little") + packed[start : start + stride]))
        out.append(parent)
    return out


class PrefixKVCache:
    """Reference-counted blocks, a hash -> block map of cached prefixes and an LRU free queue."""

    __slots__ = (
        "_cached",
        "_copies",
        "_free",
        "_hash",
        "_ref",
        "block_size",
        "events",
        "evictions",
        "num_blocks",
    )

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks
        self._cached: dict[int, int] = {}
        self._copies: dict[int, list[int]] = {}
        """Further physical blocks holding a hash that ``_cached`` maps to another block."""
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.evictions = 0
        """Cached blocks whose content was dropped to make room."""
        self.events: list[KVEvent] | None = None
        """Where evictions are reported as ``BlockRemoved`` (None: not reported)."""

    # -- queries -------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks not referenced by any request (cached-but-unused blocks count as free, as in vLLM)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by requests (``vllm:kv_cache_usage_perc``)."""
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def num_cached(self) -> int:
        """Blocks that hold a reusable prefix hash."""
        return len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def cached_prefix(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of ``hashes`` are in the cache."""
        cached = self._cached
        n = 0
        for h in hashes:
            if h not in cached:
                break
            n += 1
        return n

    def is_cached(self, h: int) -> bool:
        return h in self._cached

    def free_order(self) -> list[int]:
        """Block ids in eviction order (tests and debugging)."""
        return list(self._free)

    def block_hash(self, block: int) -> int | None:
        return self._hash[block]

    # -- mutations -----------------------------------------------------------------------------------
    def allocate(
        self, hashes: Sequence[int], total_blocks: int, max_hit_blocks: int
    ) -> tuple[list[int], int] | None:
        """Allocate ``total_blocks`` blocks for a sequence whose full prompt blocks hash to ``hashes``.

        Reuses at most ``max_hit_blocks`` leading cached blocks. Returns ``(block ids, hit blocks)``, or
        None (and changes nothing) when the blocks do not fit.
        """
        hit = self.cached_prefix(hashes[: max(0, min(max_hit_blocks, total_blocks))])
        hit_ids = [self._cached[h] for h in hashes[:hit]]
        hits_in_free = sum(1 for b in hit_ids if self._ref[b] == 0)
        need = total_blocks - hit
        if len(self._free) - hits_in_free < need:
            return None
        ref = self._ref
        free = self._free
        for b in hit_ids:
            if ref[b] == 0:
                del free[b]
            ref[b] += 1
        blocks = hit_ids
        for i in range(hit, total_blocks):
            b, _ = free.popitem(last=False)
            if self._hash[b] is not None:
                self._evict(b)
            ref[b] = 1
            if i < len(hashes):
                self._store(b, hashes[i])
            blocks.append(b)
        return blocks, hit

    def _store(self, b: int, h: int) -> None:
        self._hash[b] = h
        if h not in self._cached:
            self._cached[h] = b
        else:
            self._copies.setdefault(h, []).append(b)

    def _evict(self, b: int) -> None:
        """Drop block ``b``'s hash (it is being reused for other content)."""
        old = self._hash[b]
        assert old is not None
        self._hash[b] = None
        self.evictions += 1
        copies = self._copies.get(old)
        if self._cached.get(old) == b:
            if copies:
                self._cached[old] = copies.pop()
            else:
                del self._cached[old]
        elif copies is not None:
            copies.remove(b)
        if copies is not None and not copies:
            del self._copies[old]
        if self.events is not None:
            self.events.append(BlockRemoved((old,)))

    def cache_block(self, b: int, h: int) -> bool:
        """Give block ``b`` (just filled by a running sequence, e.g. with generated tokens) the hash ``h`` so
        later prompts can reuse it; False when it already has one."""
        if self._hash[b] is not None:
            return False
        self._store(b, h)
        return True

    def reset(self) -> bool:
        """vLLM's ``reset_prefix_cache``: forget every cached hash; refused (False) while any block is in
        use. The caller reports ``AllBlocksCleared``."""
        if len(self._free) != self.num_blocks:
            return False
        self._hash = [None] * self.num_blocks
        self._cached.clear()
        self._copies.clear()
        return True

    def grow(self, blocks: list[int]) -> bool:
        """Append one fresh block to a sequence's ``blocks`` (decode growth); False when none is free."""
        if not self._free:
            return False
        b, _ = self._free.popitem(last=False)
        if self._hash[b] is not None:
            self._evict(b)
        self._ref[b] = 1
        blocks.append(b)
        return True

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; unreferenced blocks join the free queue tail-block first."""
        ref = self._ref
        free = self._free
        for b in reversed(blocks):
            ref[b] -= 1
            if ref[b] == 0:
                free[b] = None
            elif ref[b] < 0:
                raise AssertionError(f"block {b} released more often than allocated")
