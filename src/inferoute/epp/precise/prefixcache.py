"""Tokens and block keys of recent prompts, found again by the text they start with. Pure.

Requests that share a prefix (a system prompt, a document, a conversation so far) would otherwise be tokenized
and keyed in full every time: ~2.5 ms for a 10 KB prompt with the simulator's tokenizer, ~0.5 ms more for its
block keys — on every pick. The same idea as llm-d's tokenization prefix store: the prompt's text is cut into
blocks of ``block_chars`` characters, hashed as a chain (``h[i] = xxh64(block i, seed=h[i-1])``, seeded by the
model), and each block's hash maps to the tokens, their end offsets and the block keys of the prompt that
introduced it. A new prompt walks its chain to the deepest block seen before, reuses every token that ends
inside that text (less one, so a token that could merge across the cut is redone), tokenizes only the rest,
and reuses every block key whose tokens all came from the cache.

Exact for tokenizers whose pieces come from a left-to-right scan (the simulator's); for BPE tokenizers a token
at the cut could in rare cases differ from a full tokenization, which can only shorten a prefix match.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import xxhash


@dataclass(frozen=True, slots=True)
class Tokenized:
    tokens: list[int]
    ends: list[int]
    """Character offset in the text where each token ends."""
    keys: list[int]
    """The block keys of ``tokens`` (full blocks)."""


Encode = Callable[[str, bool], tuple[list[int], list[int]]]
"""(text, add special tokens) -> (token ids, end offsets)."""
Keys = Callable[[Sequence[int], int | None], list[int]]
"""(tokens, parent key or None for the model's root) -> chained block keys of the full blocks."""


class TokenPrefixCache:
    def __init__(self, block_size: int, block_chars: int = 256, capacity: int = 8192) -> None:
        self.block_size = block_size
        """Tokens per block key."""
        self.block_chars = block_chars
        self.capacity = capacity
        """Text blocks remembered (least recently used forgotten first)."""
        self._blocks: OrderedDict[int, Tokenized] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.reused_tokens = 0

    def _chain(self, text: str, model: str) -> list[int]:
        step = self.block_chars
        h = xxhash.xxh64_intdigest(model.encode())
        out = []
        for start in range(0, len(text) - len(text) % step, step):
            h = xxhash.xxh64_intdigest(text[start : start + step].encode(), h)
            out.append(h)
        return out

    def tokenize(self, text: str, special: bool, model: str, encode: Encode, keys: Keys) -> Tokenized:
        """Tokens, offsets and keys of ``text``, reusing what an earlier prompt with the same start gave."""
        chain = self._chain(text, model)
        blocks = self._blocks
        depth, known = 0, None
        for i, h in enumerate(chain):
            entry = blocks.get(h)
            if entry is None:
                break
            depth, known = i + 1, entry
        if known is None:
            self.misses += 1
            tokens, ends = encode(text, special)
            result = Tokenized(tokens, ends, keys(tokens, None))
        else:
            self.hits += 1
            blocks.move_to_end(chain[depth - 1])
            result = self._extend(text, special, known, depth * self.block_chars, encode, keys)
        for h in chain[depth:]:
            blocks[h] = result
        while len(blocks) > self.capacity:
            blocks.popitem(last=False)
        return result

    def _extend(
        self, text: str, special: bool, known: Tokenized, chars: int, encode: Encode, keys: Keys
    ) -> Tokenized:
        n = max(0, bisect_right(known.ends, chars) - 1)  # tokens ending inside the shared text, less one
        cut = known.ends[n - 1] if n else 0
        tail, tail_ends = encode(text[cut:], special and n == 0)  # special tokens lead the text only
        tokens = known.tokens[:n] + tail
        ends = known.ends[:n] + [cut + e for e in tail_ends]
        k = min(len(known.keys), n // self.block_size)
        rest = keys(tokens[k * self.block_size :], known.keys[k - 1] if k else None)
        self.reused_tokens += n
        return Tokenized(tokens, ends, known.keys[:k] + rest)
