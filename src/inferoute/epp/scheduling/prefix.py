"""Approximate prefix blocks: how the picker cuts a prompt into chained block keys without tokenizing it.

Prompts are cut into blocks of ``block_size_tokens x chars_per_token`` bytes (GIE approximates a token by four
characters) and hashed as a chain: ``h[0] = xxh64(block 0, seed=xxh64(model))``, ``h[i] = xxh64(block i,
seed=h[i-1])``; a trailing partial block is hashed too. A block hash therefore identifies the whole prefix up
to and including that block, for that model.

After each pick the scheduler returns a :class:`~inferoute.epp.learned.port.Placed` record of the request's
keys for the chosen endpoint; the approximate store (:mod:`inferoute.epp.learned.approx`) remembers them.
"""

from __future__ import annotations

from collections import OrderedDict

import xxhash

DEFAULT_BLOCK_SIZE_TOKENS = 16
DEFAULT_MAX_PREFIX_BLOCKS = 256
CHARS_PER_TOKEN = 4


def prefix_hashes(
    model: str,
    prompt: bytes | memoryview,
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


class PrefixHashCache:
    """The chains of recent long prompts, so a shared document is not hashed block by block again.

    Long prompts are where prefixes are shared (system prompts, documents, conversation history), and their
    chain is the expensive part: 256 chained ``xxh64`` calls over 64 KB cost ~45 µs, one ``xxh3_128`` of the
    same bytes ~1.5 µs. The key is that 128-bit digest of exactly the bytes the chain covers, with their
    length, the block size and the model, so a hit returns what :func:`prefix_hashes` would compute (short of
    a 128-bit collision). Prompts of fewer than ``min_blocks`` blocks are hashed directly (no cache cost)."""

    def __init__(self, capacity: int = 256, min_blocks: int = 32) -> None:
        self.capacity = capacity
        self.min_blocks = min_blocks
        self._chains: OrderedDict[tuple[int, int, int, str], list[int]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def hashes(
        self,
        model: str,
        prompt: bytes | memoryview,
        *,
        block_size_tokens: int = DEFAULT_BLOCK_SIZE_TOKENS,
        max_blocks: int = DEFAULT_MAX_PREFIX_BLOCKS,
    ) -> list[int]:
        """:func:`prefix_hashes` (a new list each time: callers may keep it)."""
        block = max(1, block_size_tokens * CHARS_PER_TOKEN)
        limit = min(len(prompt), block * max_blocks)
        if limit < block * self.min_blocks:
            return prefix_hashes(model, prompt, block_size_tokens=block_size_tokens, max_blocks=max_blocks)
        key = (xxhash.xxh3_128_intdigest(memoryview(prompt)[:limit]), limit, block, model)
        chains = self._chains
        chain = chains.get(key)
        if chain is not None:
            self.hits += 1
            chains.move_to_end(key)
            return list(chain)
        self.misses += 1
        chain = prefix_hashes(model, prompt, block_size_tokens=block_size_tokens, max_blocks=max_blocks)
        chains[key] = chain
        if len(chains) > self.capacity:
            chains.popitem(last=False)
        return list(chain)
