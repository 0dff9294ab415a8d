"""A deterministic tokenizer approximation (no vocabulary files, no model download).

How text becomes token ids:

1. Split into pieces with one regular expression: chat special tokens (``<|user|>``), words of at most 6
   characters with their leading space (``" hello"``), longer words cut into 4-character pieces (the
   first keeps the space: ``" int" "erna" "tion" "aliz" "ation"``, like BPE sub-words), single digits (as
   Llama-3 and GPT tokenizers do, digit groups are short), runs of other symbols with their leading
   space, and runs of whitespace. On English prose this gives ~4-5 characters per token, close to the ~4
   of real BPE tokenizers.
2. Each piece maps to a stable id in ``[0, VOCAB_SIZE)`` via xxh32 of its UTF-8 bytes (seed 0), so the same
   text always gives the same ids, in every process and on every run (Python's ``hash`` is salted; this
   is not). Collisions are harmless: ids only feed token counts and prefix-cache block hashes.

The picker may use :func:`count_tokens` to estimate prompt sizes the way the simulator counts them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence

import xxhash

VOCAB_SIZE = 128_256
"""Llama-3's vocabulary size; ids are taken modulo it."""

_L = r"[^\W\d_]"  # a letter (any script)
_PIECES = re.compile(
    r"<\|[a-z_]+\|>"  # chat special tokens
    rf"|(?: {_L}{{1,5}}|{_L}{{1,6}})(?!{_L})"  # a whole word of at most 6 characters with its space
    rf"| {_L}{{3}}|{_L}{{1,4}}"  # else 4-character pieces of a longer word (the first keeps the space)
    r"| ?\d"  # one digit
    r"| ?[^\w\s]+"  # a run of symbols
    r"|\s+|_+"
)


def pieces(text: str) -> list[str]:
    """Split ``text`` into token strings (see the module docstring)."""
    return _PIECES.findall(text)


def piece_matches(text: str) -> Iterator[re.Match[str]]:
    """The pieces of ``text`` with their positions."""
    return _PIECES.finditer(text)


class Tokenizer:
    """Text -> token ids, with a bounded memo of piece ids (common words are hashed once)."""

    __slots__ = ("_ids", "_max_memo")

    def __init__(self, max_memo: int = 200_000) -> None:
        self._ids: dict[str, int] = {}
        self._max_memo = max_memo

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; deterministic."""
        found = _PIECES.findall(text)
        ids = self._ids
        out = [ids.get(p, -1) for p in found]
        if -1 in out:
            if len(ids) >= self._max_memo:
                ids.clear()
            room = self._max_memo - len(ids)
            for i, tid in enumerate(out):
                if tid == -1:
                    piece = found[i]
                    out[i] = tid = piece_id(piece)
                    if room > 0 and piece not in ids:
                        ids[piece] = tid
                        room -= 1
        return out

    def count(self, text: str) -> int:
        """Number of tokens in ``text``."""
        return len(pieces(text))


def piece_id(piece: str) -> int:
    """The stable id of one piece."""
    return int(xxhash.xxh32_intdigest(piece.encode())) % VOCAB_SIZE


def count_tokens(text: str) -> int:
    """Number of tokens the simulator counts for ``text`` (no memo; for estimates elsewhere)."""
    return len(pieces(text))


def encode(text: str) -> list[int]:
    """Token ids of ``text`` (no memo)."""
    return [piece_id(p) for p in pieces(text)]


def render_chat(messages: Iterable[tuple[str, str]]) -> str:
    """The chat template the simulator applies before tokenizing: each message as
    ``<|role|>\\ncontent<|end|>\\n``, then ``<|assistant|>\\n`` (a generation prompt, ~3 tokens per turn
    of overhead, like Llama-3's template)."""
    parts = [f"<|{role}|>\n{content}<|end|>\n" for role, content in messages]
    parts.append("<|assistant|>\n")
    return "".join(parts)


def is_token_ids(value: Sequence[object]) -> bool:
    """True for a non-empty list of ints (a pre-tokenized prompt)."""
    return bool(value) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
