"""The approximate prefix index: where did we send which prompt prefixes?

Prompts are cut into blocks of ``block_size_tokens x chars_per_token`` bytes (GIE approximates a token by four
characters) and hashed as a chain: ``h[0] = xxh64(block 0, seed=xxh64(model))``, ``h[i] = xxh64(block i,
seed=h[i-1])``; a trailing partial block is hashed too. A block hash therefore identifies the whole prefix up
to and including that block, for that model.

After each pick the request's hashes are recorded for the chosen endpoint. Each endpoint keeps an LRU of at
most ``capacity`` hashes (GIE's ``lruCapacityPerServer``, or the endpoint's ``num_gpu_blocks`` with autoTune),
and a reverse map ``hash → endpoints`` answers "how many leading blocks of this prompt does each endpoint
probably still have cached?" in one pass that stops at the first block nobody holds.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

import xxhash

DEFAULT_BLOCK_SIZE_TOKENS = 16
DEFAULT_MAX_PREFIX_BLOCKS = 256
DEFAULT_LRU_CAPACITY = 31250
CHARS_PER_TOKEN = 4


def prefix_hashes(
    model: str,
    prompt: bytes,
    *,
    block_size_tokens: int = DEFAULT_BLOCK_SIZE_TOKENS,
    max_blocks: int = DEFAULT_MAX_PREFIX_BLOCKS,
    chars_per_token: int = CHARS_PER_TOKEN,
) -> list[int]:
    """Chained xxhash64 of the prompt's blocks (at most ``max_blocks``), the model name as the first seed."""
    block = max(1, block_size_tokens * chars_per_token)
    limit = min(len(prompt), block * max_blocks)
    h = xxhash.xxh64_intdigest(model.encode())
    view = memoryview(prompt)
    out: list[int] = []
    append = out.append
    intdigest = xxhash.xxh64_intdigest
    for start in range(0, limit, block):
        h = intdigest(view[start : start + block], h)
        append(h)
    return out


class PrefixIndex:
    """Per-endpoint LRU sets of block hashes plus the reverse map used for matching.

    This is the local, in-process implementation of the learned prefix state. Everything goes through
    :meth:`add` and :meth:`match`, so a KV-event-fed or shared implementation can replace it.
    """

    def __init__(self, default_capacity: int = DEFAULT_LRU_CAPACITY) -> None:
        self.default_capacity = default_capacity
        self._lru: dict[str, OrderedDict[int, None]] = {}
        self._capacity: dict[str, int] = {}
        self._holders: dict[int, set[str]] = {}

    def set_capacity(self, endpoint: str, capacity: int | None) -> None:
        """Per-endpoint LRU size (autoTune from ``num_gpu_blocks``); None restores the default."""
        cap = max(1, capacity) if capacity else self.default_capacity
        if self._capacity.get(endpoint) == cap:
            return
        self._capacity[endpoint] = cap
        lru = self._lru.get(endpoint)
        if lru is not None:
            self._evict(endpoint, lru, cap)

    def add(self, endpoint: str, hashes: Sequence[int]) -> None:
        """Record that ``endpoint`` now holds these blocks (most recently used)."""
        if not hashes:
            return
        lru = self._lru.get(endpoint)
        if lru is None:
            lru = self._lru[endpoint] = OrderedDict()
        holders = self._holders
        for h in hashes:
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
                s = holders.get(h)
                if s is None:
                    holders[h] = {endpoint}
                else:
                    s.add(endpoint)
        self._evict(endpoint, lru, self._capacity.get(endpoint, self.default_capacity))

    def _evict(self, endpoint: str, lru: OrderedDict[int, None], cap: int) -> None:
        holders = self._holders
        while len(lru) > cap:
            h, _ = lru.popitem(last=False)
            s = holders.get(h)
            if s is not None:
                s.discard(endpoint)
                if not s:
                    del holders[h]

    def match(self, hashes: Sequence[int], endpoints: Iterable[str] | None = None) -> dict[str, int]:
        """Leading blocks of ``hashes`` each endpoint holds (endpoints with no match are absent).

        Walks the chain once and stops at the first block no (remaining) endpoint holds.
        """
        out: dict[str, int] = {}
        holders = self._holders
        alive: set[str] | None = None if endpoints is None else set(endpoints)
        for i, h in enumerate(hashes):
            s = holders.get(h)
            current: set[str] = (set(s) if alive is None else alive & s) if s else set()
            if alive is not None and i > 0 and len(current) != len(alive):
                for ep in alive - current:
                    out[ep] = i
            if not current:
                return out
            alive = current
        for ep in alive or ():
            out[ep] = len(hashes)
        return out

    def remove_endpoint(self, endpoint: str) -> None:
        lru = self._lru.pop(endpoint, None)
        self._capacity.pop(endpoint, None)
        if lru is None:
            return
        for h in lru:
            s = self._holders.get(h)
            if s is not None:
                s.discard(endpoint)
                if not s:
                    del self._holders[h]

    def size(self) -> int:
        """Distinct block hashes held by any endpoint."""
        return len(self._holders)

    def endpoint_size(self, endpoint: str) -> int:
        lru = self._lru.get(endpoint)
        return len(lru) if lru is not None else 0
