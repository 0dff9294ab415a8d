"""The raw bytes of one top-level value of a JSON object that is already known to be valid, found without
reading the value itself.

Used for large request bodies: simdjson validates the whole document (SIMD, several GB/s) and lists its
top-level keys in order; the prompt's raw bytes are then cut out of the body by skipping the *other*
top-level members from both ends: the members before it forwards, the members after it backwards. Those are
small (``model``, ``stream``, ``max_tokens`` ...), so a 200 KB prompt is never scanned byte by byte in
Python. Strings are skipped with ``bytes.find`` / ``rfind`` of the quote (an escaped quote has an odd number
of backslashes before it); arrays and objects by their structural bytes, each search bounded to a window.

Anything unexpected — a member bigger than the step budget, a structure the scanner does not follow —
returns None, and the caller decodes the body the ordinary way. The scanner never has to judge validity.
"""

from __future__ import annotations

import re

_WS = b" \t\n\r"
BACKSLASH, QUOTE, COLON, COMMA = 0x5C, 0x22, 0x3A, 0x2C
OPEN_BRACKET, CLOSE_BRACKET, OPEN_BRACE, CLOSE_BRACE = 0x5B, 0x5D, 0x7B, 0x7D
_BRACKETS = (b"[", b"]", b"{", b"}")
_STRUCTURE = re.compile(rb'["\[\]{}]')
_SCALAR_END = re.compile(rb"[ \t\n\r,}\]]")
WINDOW = 1024
"""Bytes one search for the next structural byte may cover (numbers in a long array: give up instead)."""


class _GiveUp(Exception):
    """Not worth it (or not understood): decode the ordinary way."""


class _Scanner:
    __slots__ = ("body", "steps")

    def __init__(self, body: bytes, steps: int) -> None:
        self.body = body
        self.steps = steps

    def _step(self) -> None:
        self.steps -= 1
        if self.steps < 0:
            raise _GiveUp

    def _escaped(self, quote: int) -> bool:
        """Whether ``body[quote]`` is preceded by an odd number of backslashes (part of a string)."""
        body = self.body
        k = quote - 1
        while body[k] == BACKSLASH:
            k -= 1
        return (quote - 1 - k) % 2 == 1

    # -- forwards --------------------------------------------------------------------------------------------
    def string_end(self, i: int) -> int:
        """``body[i]`` opens a string: the index after its closing quote."""
        body = self.body
        j = i
        while True:
            self._step()
            j = body.find(b'"', j + 1)
            if j < 0:
                raise _GiveUp
            if body[j - 1] != BACKSLASH or not self._escaped(j):
                return j + 1

    def value_end(self, i: int) -> int:
        """The index after the value that starts at ``body[i]``."""
        body = self.body
        c = body[i]
        if c == QUOTE:
            return self.string_end(i)
        if c in (OPEN_BRACKET, OPEN_BRACE):
            depth = 0
            pos = i
            search = _STRUCTURE.search
            while True:
                self._step()
                m = search(body, pos, pos + WINDOW)
                if m is None:
                    raise _GiveUp
                j = m.start()
                self.steps -= (j - pos) >> 8  # a regex search costs by the byte: charge long gaps
                c = body[j]
                if c == QUOTE:
                    pos = self.string_end(j)
                    continue
                depth += 1 if c in (OPEN_BRACKET, OPEN_BRACE) else -1
                if depth == 0:
                    return j + 1
                pos = j + 1
        m = _SCALAR_END.search(body, i, i + WINDOW)
        if m is None:
            raise _GiveUp
        return m.start()

    # -- backwards -------------------------------------------------------------------------------------------
    def string_start(self, end: int) -> int:
        """``body[end - 1]`` closes a string: the index of its opening quote."""
        body = self.body
        j = end - 1
        while True:
            self._step()
            j = body.rfind(b'"', 0, j)
            if j < 0:
                raise _GiveUp
            if body[j - 1] != BACKSLASH or not self._escaped(j):
                return j

    def compound_start(self, end: int) -> int:
        """``body[end - 1]`` closes an array or object: the index of its opening bracket."""
        body = self.body
        depth = 0
        pos = end
        while True:
            self._step()
            lo = pos - WINDOW if pos > WINDOW else 0
            j = body.rfind(b'"', lo, pos)
            for ch in _BRACKETS:
                k = body.rfind(ch, j + 1 if j >= lo else lo, pos)
                if k > j:
                    j = k
            if j < 0:
                raise _GiveUp
            self.steps -= (pos - j) >> 8  # five searches over the gap: charge long ones
            c = body[j]
            if c == QUOTE:
                pos = self.string_start(j + 1)
                continue
            depth += 1 if c in (CLOSE_BRACKET, CLOSE_BRACE) else -1
            if depth == 0:
                return j
            pos = j

    def member_start(self, end: int) -> int:
        """The member (``"key": value``) ends at ``end``: the index of its key's opening quote."""
        body = self.body
        c = body[end - 1]
        if c == QUOTE:
            colon = self.string_start(end)
        elif c in (CLOSE_BRACKET, CLOSE_BRACE):
            colon = self.compound_start(end)
        else:  # a scalar has no colon: its key ends at the last one
            colon = body.rfind(b":", end - WINDOW if end > WINDOW else 0, end) + 1
            if colon <= 0:
                raise _GiveUp
        while body[colon - 1] in _WS:
            colon -= 1
        if body[colon - 1] != COLON:
            raise _GiveUp
        key_end = colon - 1
        while body[key_end - 1] in _WS:
            key_end -= 1
        if body[key_end - 1] != QUOTE:
            raise _GiveUp
        return self.string_start(key_end)


def _ws_end(body: bytes, i: int) -> int:
    """The index of the first non-whitespace byte from ``i`` (IndexError past the end)."""
    while body[i] in _WS:
        i += 1
    return i


def _ws_start(body: bytes, end: int) -> int:
    """The index after the last non-whitespace byte before ``end``."""
    while end > 0 and body[end - 1] in _WS:
        end -= 1
    return end


def member_value(body: bytes, index: int, count: int, key: bytes, *, steps: int) -> memoryview | None:
    """The raw bytes (a view into ``body``) of the value of the ``index``-th of the ``count`` top-level
    members of the valid JSON object ``body``, whose key is ``key`` (a key spelled with escapes is accepted as
    it is: the caller knows the order of the decoded keys). None when the scan needs more than ``steps`` steps
    or meets anything it does not follow."""
    scan = _Scanner(body, steps)
    try:
        i = _ws_end(body, 0)
        if body[i] != OPEN_BRACE:
            return None
        i = _ws_end(body, i + 1)
        for _ in range(index):  # the members before it, forwards
            if body[i] != QUOTE:
                return None
            i = _ws_end(body, scan.string_end(i))
            if body[i] != COLON:
                return None
            i = _ws_end(body, scan.value_end(_ws_end(body, i + 1)))
            if body[i] != COMMA:
                return None
            i = _ws_end(body, i + 1)
        if body[i] != QUOTE:
            return None
        key_end = scan.string_end(i)
        raw_key = body[i + 1 : key_end - 1]
        if raw_key != key and b"\\" not in raw_key:
            return None
        colon = _ws_end(body, key_end)
        if body[colon] != COLON:
            return None
        start = _ws_end(body, colon + 1)

        end = _ws_start(body, len(body))
        if body[end - 1] != CLOSE_BRACE:
            return None
        end = _ws_start(body, end - 1)
        for _ in range(count - index - 1):  # the members after it, backwards
            end = _ws_start(body, scan.member_start(end))
            if body[end - 1] != COMMA:
                return None
            end = _ws_start(body, end - 1)
        if end <= start:
            return None
        return memoryview(body)[start:end]
    except (_GiveUp, IndexError):
        return None
