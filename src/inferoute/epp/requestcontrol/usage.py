"""Token usage from a response, cheaply: keep only the last bytes and look for the final ``"usage"`` object.

OpenAI servers put ``usage`` in the JSON body (non-streaming) or in the last data chunk before
``data: [DONE]`` (streaming with ``stream_options.include_usage``). Both sit at the end of the response, so a
bounded tail buffer is enough and the per-chunk cost is one bytes concatenation at most.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

TAIL_BYTES = 8192


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


class TailBuffer:
    """The last ``limit`` bytes of a stream."""

    __slots__ = ("_buf", "limit", "total")

    def __init__(self, limit: int = TAIL_BYTES) -> None:
        self.limit = limit
        self._buf = b""
        self.total = 0

    def feed(self, chunk: bytes) -> None:
        self.total += len(chunk)
        if len(chunk) >= self.limit:
            self._buf = bytes(chunk[-self.limit :])
        else:
            buf = self._buf + chunk
            self._buf = buf[-self.limit :] if len(buf) > self.limit else buf

    @property
    def data(self) -> bytes:
        return self._buf


def _object_at(data: bytes, start: int) -> bytes | None:
    """The balanced ``{...}`` starting at ``data[start]`` (strings are respected)."""
    depth = 0
    in_str = False
    esc = False
    for i in range(start, len(data)):
        ch = data[i]
        if in_str:
            if esc:
                esc = False
            elif ch == 0x5C:  # backslash
                esc = True
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
        obj = _object_at(tail, brace)
        if obj is None:
            continue
        try:
            u = json.loads(obj)
        except ValueError:
            continue
        if not isinstance(u, dict):
            continue
        details = u.get("prompt_tokens_details") or {}
        cached = details.get("cached_tokens", 0) if isinstance(details, dict) else 0
        try:
            return Usage(
                int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0), int(cached or 0)
            )
        except (TypeError, ValueError):
            return None
