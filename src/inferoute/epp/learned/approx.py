"""The approximate prefix store: per-endpoint LRU sets of block keys learned from the picker's own placements.

Each endpoint keeps an LRU weighted in tokens: every block carries the prompt tokens it stands for (more than
one block size when a long prompt was hashed only up to its first blocks, since the server caches the whole
prompt), and the LRU holds at most ``capacity`` tokens — GIE's ``lruCapacityPerServer`` x block size, or with
autoTune the server's real KV capacity ``num_gpu_blocks x block_size`` (:class:`~.port.Capacity` records).
A reverse map ``key -> endpoints`` answers "how many leading blocks of this prompt does each endpoint probably
still have cached?" in one pass that stops at the first block nobody holds. Keys come from the caller (the
scheduler's chained xxh64 of prompt bytes, :mod:`inferoute.epp.scheduling.prefix`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from inferoute.epp.learned.port import Capacity, Placed, Record

DEFAULT_LRU_CAPACITY = 31250
"""Blocks per endpoint (GIE's ``lruCapacityPerServer``)."""
DEFAULT_CAPACITY_TOKENS = DEFAULT_LRU_CAPACITY * 16
"""Tokens per endpoint: ``lruCapacityPerServer`` blocks of GIE's default 16 tokens."""


class PrefixIndex:
    """Per-endpoint LRU sets of block hashes plus the reverse map used for matching.

    The reverse map stores, for each block hash, a bit mask of the endpoints holding it (each endpoint gets a
    bit). Masks are plain ints, so matching is a chain of ``&`` operations, and the index holds a handful of
    containers instead of one set per block (which would make every full garbage collection walk millions of
    objects and show up as pick-latency spikes).

    It implements :class:`~inferoute.epp.learned.port.PrefixStore` (:meth:`apply`, :meth:`match`,
    :meth:`forget`, :meth:`size`); :meth:`add` and :meth:`set_capacity` are what its records do.
    """

    def __init__(self, default_capacity: int = DEFAULT_CAPACITY_TOKENS) -> None:
        self.default_capacity = default_capacity
        """Tokens remembered per endpoint unless :meth:`set_capacity` says otherwise."""
        self._lru: dict[str, OrderedDict[int, int]] = {}
        self._used: dict[str, int] = {}
        self._capacity: dict[str, int] = {}
        self._holders: dict[int, int] = {}
        self._bit: dict[str, int] = {}
        self._names: dict[int, str] = {}
        self._free_bits: list[int] = []

    def _bit_of(self, endpoint: str) -> int:
        bit = self._bit.get(endpoint)
        if bit is None:
            index = self._free_bits.pop() if self._free_bits else len(self._bit)
            bit = self._bit[endpoint] = 1 << index
            self._names[index] = endpoint
        return bit

    def set_capacity(self, endpoint: str, capacity: int | None) -> None:
        """Per-endpoint LRU size in tokens (autoTune: ``num_gpu_blocks x block_size``); None: the default."""
        cap = max(1, capacity) if capacity else self.default_capacity
        if self._capacity.get(endpoint) == cap:
            return
        self._capacity[endpoint] = cap
        lru = self._lru.get(endpoint)
        if lru is not None:
            self._evict(endpoint, lru, cap)

    def add(self, endpoint: str, hashes: Sequence[int], tokens_per_block: int = 1) -> None:
        """Record that ``endpoint`` now holds these blocks (most recently used), each standing for
        ``tokens_per_block`` tokens of its KV cache."""
        if not hashes:
            return
        lru = self._lru.get(endpoint)
        if lru is None:
            lru = self._lru[endpoint] = OrderedDict()
        bit = self._bit_of(endpoint)
        holders = self._holders
        weight = max(1, tokens_per_block)
        used = self._used.get(endpoint, 0)
        touch, weight_of = lru.move_to_end, lru.__getitem__
        for h in hashes:  # mostly blocks already held (a shared prefix): touched, weight checked
            try:
                touch(h)
            except KeyError:
                lru[h] = weight
                used += weight
                holders[h] = holders.get(h, 0) | bit
                continue
            old = weight_of(h)
            if old != weight:
                lru[h] = weight
                used += weight - old
        self._used[endpoint] = used
        self._evict(endpoint, lru, self._capacity.get(endpoint, self.default_capacity))

    def _evict(self, endpoint: str, lru: OrderedDict[int, int], cap: int) -> None:
        holders = self._holders
        keep = ~self._bit_of(endpoint)
        used = self._used.get(endpoint, 0)
        while used > cap and lru:
            h, weight = lru.popitem(last=False)
            used -= weight
            mask = holders.get(h, 0) & keep
            if mask:
                holders[h] = mask
            else:
                holders.pop(h, None)
        self._used[endpoint] = used

    def match(self, hashes: Sequence[int], endpoints: Iterable[str] | None = None) -> dict[str, int]:
        """Leading blocks of ``hashes`` each endpoint holds (endpoints with no match are absent).

        Walks the chain once and stops at the first block no (remaining) endpoint holds.
        """
        out: dict[str, int] = {}
        if not hashes:
            return out
        if endpoints is None:
            alive = -1  # every endpoint
        else:
            alive = 0
            bits = self._bit
            for ep in endpoints:
                alive |= bits.get(ep, 0)
        holders = self._holders
        names = self._names
        n = 0
        for n, h in enumerate(hashes):
            held = holders.get(h, 0) & alive
            if held != alive:
                if n > 0:
                    dropped = alive & ~held
                    while dropped:
                        low = dropped & -dropped
                        out[names[low.bit_length() - 1]] = n
                        dropped ^= low
                if not held:
                    return out
                alive = held
        else:
            n = len(hashes)
        while alive:
            low = alive & -alive
            out[names[low.bit_length() - 1]] = n
            alive ^= low
        return out

    def held_tokens(self, endpoint: str) -> int:
        """Tokens the blocks remembered for ``endpoint`` stand for (at most its capacity)."""
        return self._used.get(endpoint, 0)

    def apply(self, records: Iterable[Record]) -> None:
        for r in records:
            if isinstance(r, Placed):
                self.add(r.endpoint, r.keys, r.tokens_per_block)
            elif isinstance(r, Capacity):
                self.set_capacity(r.endpoint, r.tokens)

    def forget(self, endpoints: Iterable[str]) -> None:
        for ep in endpoints:
            self.remove_endpoint(ep)

    def remove_endpoint(self, endpoint: str) -> None:
        lru = self._lru.pop(endpoint, None)
        self._capacity.pop(endpoint, None)
        self._used.pop(endpoint, None)
        bit = self._bit.pop(endpoint, None)
        if bit is None:
            return
        keep = ~bit
        holders = self._holders
        for h in lru or ():
            mask = holders.get(h, 0) & keep
            if mask:
                holders[h] = mask
            else:
                holders.pop(h, None)
        index = bit.bit_length() - 1
        del self._names[index]
        self._free_bits.append(index)

    def size(self) -> int:
        """Distinct block hashes held by any endpoint."""
        return len(self._holders)

    def endpoint_size(self, endpoint: str) -> int:
        """Blocks remembered for ``endpoint``."""
        lru = self._lru.get(endpoint)
        return len(lru) if lru is not None else 0

    def endpoint_tokens(self, endpoint: str) -> int:
        """Tokens those blocks stand for."""
        return self._used.get(endpoint, 0)
