"""Token usage from a response, cheaply: keep only the last bytes and look for the final ``"usage"`` object.

OpenAI servers put ``usage`` in the JSON body (non-streaming) or in the last data chunk before
``data: [DONE]`` (streaming with ``stream_options.include_usage``). Both sit at the end of the response, so a
bounded tail buffer is enough: each chunk is kept by reference (no copy) until newer chunks hold the last
8 KB, and the tail is joined once, at the end. The ``usage`` object is found from the end (one regex visits
only its braces, quotes and backslashes) and decoded with a typed msgspec decoder; a usage with other value
types (numbers as strings, floats) falls back to ``json`` and loose conversion, with the same result.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import msgspec

TAIL_BYTES = 8192


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


class TailBuffer:
    """The last ``limit`` bytes of a stream.

    Chunks are kept as they come (no concatenation per chunk: a streamed answer is hundreds of small
    chunks) and joined every :data:`COMPACT_EVERY` chunks, keeping the last ``limit`` bytes; a chunk of
    ``limit`` bytes or more replaces everything before it. :attr:`data` joins what is left."""

    __slots__ = ("_chunks", "limit", "total")

    COMPACT_EVERY = 16

    def __init__(self, limit: int = TAIL_BYTES) -> None:
        if limit < 1:
            raise ValueError("a tail buffer keeps at least one byte")
        self.limit = limit
        self._chunks: list[bytes] = []
        self.total = 0

    def feed(self, chunk: bytes) -> None:
        if type(chunk) is not bytes:
            chunk = bytes(chunk)  # the caller may reuse its buffer
        n = len(chunk)
        self.total += n
        if n >= self.limit:
            self._chunks = [chunk]
            return
        chunks = self._chunks
        chunks.append(chunk)
        if len(chunks) >= self.COMPACT_EVERY:
            self._compact()

    def _compact(self) -> None:
        data = b"".join(self._chunks)
        self._chunks = [data[-self.limit :] if len(data) > self.limit else data]

    @property
    def data(self) -> bytes:
        self._compact()
        return self._chunks[0]


_STRUCTURE = re.compile(rb'[{}"\\]')
"""The bytes that matter to the extent of a JSON object: braces, quotes and backslashes."""


def _object_at(data: bytes, start: int) -> bytes | None:
    """The balanced ``{...}`` starting at ``data[start]`` (strings are respected). Visits only the
    structural bytes (found by one regex), not every byte."""
    depth = 0
    in_str = False
    skip = -1  # the byte after a backslash in a string is escaped, whatever it is
    for m in _STRUCTURE.finditer(data, start):
        i = m.start()
        if i == skip:
            continue
        ch = data[i]
        if in_str:
            if ch == 0x5C:  # backslash
                skip = i + 1
            elif ch == 0x22:
                in_str = False
        elif ch == 0x22:
            in_str = True
        elif ch == 0x7B:
            depth += 1
        elif ch == 0x7D:
            depth -= 1
            if depth == 0:
                return data[start : i + 1]
    return None


def _braces_only(data: bytes, start: int) -> bytes | None:
    """``data[start:]`` up to where its braces balance, counting braces inside strings too (C-level finds
    and counts; usage objects have no braces in strings). Only a candidate: see :func:`parse_usage`."""
    depth = 1
    pos = start + 1
    while depth:
        close = data.find(b"}", pos)
        if close < 0:
            return None
        depth += data.count(b"{", pos, close) - 1
        pos = close + 1
    return data[start:pos]


class _Details(msgspec.Struct):
    cached_tokens: int | None = 0


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = 0
    completion_tokens: int | None = 0
    prompt_tokens_details: _Details | None = None


_usage_decoder = msgspec.json.Decoder(_Usage)


def _usage_of(obj: bytes) -> Usage | bool | None:
    """The usage in one ``{...}`` object: a :class:`Usage`, None when its values are unusable, False when it
    is not a JSON object (look further back)."""
    try:  # the common shape, typed: integers (or null) and a details object
        return _typed(_usage_decoder.decode(obj))
    except (msgspec.DecodeError, msgspec.ValidationError):
        return _usage_of_any(obj)


def _typed(u: _Usage) -> Usage:
    details = u.prompt_tokens_details
    cached = details.cached_tokens if details is not None else 0
    return Usage(u.prompt_tokens or 0, u.completion_tokens or 0, cached or 0)


def _usage_of_any(obj: bytes) -> Usage | bool | None:
    """:func:`_usage_of` for any JSON: the rules OpenAI-compatible servers are held to, loosely (numbers
    as strings or floats are converted, anything else gives None)."""
    try:
        u = json.loads(obj)
    except ValueError:
        return False
    if not isinstance(u, dict):
        return False
    details = u.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens", 0) if isinstance(details, dict) else 0
    try:
        return Usage(int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0), int(cached or 0))
    except (TypeError, ValueError):
        return None


def parse_usage(tail: bytes) -> Usage | None:
    """The last complete ``"usage": {...}`` object in ``tail``, or None."""
    pos = len(tail)
    while True:
        idx = tail.rfind(b'"usage"', 0, pos)
        if idx < 0:
            return None
        pos = idx
        brace = tail.find(b"{", idx + 7, idx + 64)
        if brace < 0 or tail[idx + 7 : brace].strip(b" \t\r\n:") != b"":
            continue  # "usage": null or not an object
        quick = _braces_only(tail, brace)
        if quick is not None:
            try:  # a valid object that ends where the braces balance is the one _object_at would find
                return _typed(_usage_decoder.decode(quick))
            except (msgspec.DecodeError, msgspec.ValidationError):
                pass
        obj = _object_at(tail, brace)
        if obj is None:
            continue
        usage = _usage_of(obj)
        if usage is not False:
            return usage if isinstance(usage, Usage) else None
