"""Parse an OpenAI completions / chat request: only ``model``, the prompt bytes and ``stream``.

This is the one parse of a request body. In embedded mode the data plane's in-process BBR runs it (the model
header comes from :attr:`ParsedBody.model`) and hands the result to the picker on
:attr:`inferoute.picking.PickRequest.parsed`, so the director does not parse the body again; a remote picker
or a body BBR did not parse is parsed by the director itself.

msgspec decodes into a struct that keeps ``prompt`` and ``messages`` as raw JSON (``msgspec.Raw``): no Python
strings are built for the prompt, the prefix hash runs over the raw bytes, and a 200 KB prompt costs a
validating scan only. Chat prompts are the JSON of the ``messages`` array, as GIE's approximate prefix
producer.

:class:`BodyParser` gives the same answers faster for large bodies (from :data:`SIMD_MIN_BODY`): simdjson
validates the document and decodes ``model`` and ``stream`` (~0.15 ns per byte against msgspec's ~0.6), and
the prompt's raw bytes are cut out by :func:`~inferoute.epp.requestcontrol.spans.member_value`, which skips
the small members around it. Whenever simdjson refuses the body, a key of interest repeats, ``model`` is not a
non-empty string or the cut needs too many steps, :func:`parse_body` decides, so errors and edge cases are
msgspec's, as before.

Both refuse a body nested deeper than :data:`MAX_JSON_DEPTH` with a 400 before parsing it
(:func:`nested_deeper_than`): the parsers' own limits are the interpreter's recursion limit (msgspec, shared
with the Python frames below it, so it moves with the call stack) and 1024 (simdjson).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import accumulate

import msgspec
import simdjson

from inferoute.epp.requestcontrol.spans import member_value
from inferoute.errors import InferouteError

CHARS_PER_TOKEN = 4
MAX_JSON_DEPTH = 128
"""Arrays and objects a request body may nest (the body's own object is level 1): deeper is a 400. OpenAI
requests nest a handful of levels; tool and response-format JSON schemas a few dozen at most."""
_NOT_STRUCTURE = bytes(c for c in range(256) if c not in b'"[]{}')
_AS_STEPS = bytes.maketrans(b"[]{}", b"\x01\xff\x01\xff")
"""Brackets as +1 / -1 (signed bytes) for the running depth."""


def _openings_over(data: bytes, limit: int) -> bool:
    """Whether ``data`` holds more than ``limit`` ``[`` and ``{`` in all (strings included): each found by
    ``bytes.find`` (memchr), at most ``limit + 1`` of them, so a body without many brackets costs microseconds
    (``bytes.count`` is a byte-by-byte loop, ~1 ns per byte)."""
    found = 0
    for opening in (b"[", b"{"):
        pos = data.find(opening)
        while pos >= 0:
            found += 1
            if found > limit:
                return True
            pos = data.find(opening, pos + 1)
    return False


def nested_deeper_than(body: bytes | memoryview, limit: int) -> bool:
    """Whether the JSON in ``body`` nests arrays and objects more than ``limit`` levels deep.

    Fast when it cannot: a body with at most ``limit`` opening brackets, strings included, is not looked at
    further (:func:`_openings_over`). Otherwise (code in a prompt, long conversations, tool schemas) the
    strings are cut out in C-speed passes: escaped backslashes and quotes neutralised (``replace``), all but
    quotes and brackets deleted (``translate``), empty strings dropped (removing two adjacent quotes keeps
    every other quote's side), and every other piece of ``split(b'"')`` is outside the strings. Of the
    brackets left, each ``replace`` of ``[]`` removes exactly the innermost level (every deepest point of
    valid JSON is an opening followed by a closing); two such passes, then runs of equal steps folded into
    one (a monotone run's deepest point is one of its ends), then the running depth of what is left by
    ``itertools.accumulate`` (linear: 10 MB of nothing but brackets take about as long as msgspec's own
    decode of them).
    Unbalanced brackets are invalid JSON, a 400 either way (unterminated strings and stray closings are left
    to the parser).
    """
    data = bytes(body)
    if not _openings_over(data, limit):
        return False
    if b"\\" in data:
        data = data.replace(b"\\\\", b"__").replace(b'\\"', b"__")
    quotes_and_brackets = data.translate(None, _NOT_STRUCTURE).replace(b'""', b"")
    outside = b"".join(quotes_and_brackets.split(b'"')[::2])
    steps = outside.translate(_AS_STEPS)
    if len(steps) <= limit:
        return False
    levels = 0
    for _ in range(2):  # the innermost level (message objects, tool parameters ...) in C first
        shorter = steps.replace(b"\x01\xff", b"")
        if len(shorter) == len(steps):
            break
        steps, levels = shorter, levels + 1
    for step, run in _RUNS:  # four equal steps in a row are one step of their sum: the same deepest point
        steps = steps.replace(step * 4, run).replace(_down(step) * 4, _down(run))
    return levels + max(accumulate(memoryview(steps).cast("b")), default=0) > limit


def _down(step: bytes) -> bytes:
    return bytes([256 - step[0]])


_RUNS = ((b"\x01", b"\x04"), (b"\x04", b"\x10"), (b"\x10", b"\x40"))
"""Steps of +-1, 4 and 16 folded into ones of +-4, 16 and 64 (signed bytes: 64 fits, 256 would not)."""


def _too_deep() -> InferouteError:
    return InferouteError(
        400,
        f"the request body nests arrays and objects deeper than {MAX_JSON_DEPTH} levels",
        cause="bad-request",
    )


class _Body(msgspec.Struct):
    model: object = None
    prompt: msgspec.Raw = msgspec.Raw(b"")
    messages: msgspec.Raw = msgspec.Raw(b"")
    input: msgspec.Raw = msgspec.Raw(b"")
    stream: object = False


_decoder = msgspec.json.Decoder(_Body)


@dataclass(frozen=True, slots=True)
class ParsedBody:
    model: str
    prompt: bytes | memoryview
    """Raw JSON bytes of ``prompt`` (completions), ``messages`` (chat) or ``input`` (responses/embeddings): a
    view into the request body, not a copy."""
    stream: bool

    @property
    def prompt_tokens(self) -> int:
        """Token estimate (bytes / 4, GIE's approximation)."""
        return (len(self.prompt) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


def parse_body(body: bytes) -> ParsedBody:
    """Decode a request body. Raises :class:`InferouteError` 400 when it is not a JSON object, has no
    string ``model`` or nests deeper than :data:`MAX_JSON_DEPTH`."""
    if nested_deeper_than(body, MAX_JSON_DEPTH):
        raise _too_deep()
    return _decode(body)


def _decode(body: bytes) -> ParsedBody:
    try:
        parsed = _decoder.decode(body)
    except msgspec.DecodeError as exc:
        if not body.strip():
            msg = 'the request body is empty: send a JSON object such as {"model": "...", "prompt": "..."}'
        elif str(exc) == "Input data was truncated":
            msg = "the request body is not valid JSON: it ends before the JSON value is complete"
        else:
            msg = f"the request body is not valid JSON: {exc}"
        raise InferouteError(400, msg, cause="bad-request") from exc
    except RecursionError as exc:
        raise InferouteError(400, "the request body is nested too deeply", cause="bad-request") from exc
    if parsed.model is None:
        raise InferouteError(400, "model not found in request body", cause="bad-request", param="model")
    if not isinstance(parsed.model, str) or not parsed.model:
        raise InferouteError(400, "model must be a non-empty string", cause="bad-request", param="model")
    raw = parsed.prompt or parsed.messages or parsed.input
    prompt = memoryview(raw) if raw else b""
    return ParsedBody(parsed.model, b"" if prompt == b"null" else prompt, parsed.stream is True)


SIMD_MIN_BODY = 64 * 1024
"""Bodies from this size on try simdjson first. Measured on chat bodies (docs/benchmarks/gateway.md, "One
parse per request"): below ~64 KiB msgspec's validating decode is quicker than simdjson plus the prompt cut,
whose fixed cost (parser call, key list, the cut) is tens of µs; from 64 KiB on simdjson wins, by more as
bodies grow."""

BodyParse = ParsedBody | InferouteError | None
"""A data plane's parse of a body handed to the picker: the result, the 400 the body deserves, or None when
the data plane did not parse it."""
PROMPT_KEYS = ("prompt", "messages", "input")
"""Where the prompt is, in order of preference (the first present one is used)."""
_KEYS_OF_INTEREST = ("model", "stream", *PROMPT_KEYS)
_OBJECT_START = re.compile(rb"[ \t\n\r]*\{")


class BodyParser:
    """:func:`parse_body`, quicker for large bodies (see the module docstring); same answers.

    Owns one simdjson parser, reused: one per event loop, never used from several threads at once."""

    __slots__ = ("_parser",)

    def __init__(self) -> None:
        self._parser = simdjson.Parser()

    def parse(self, body: bytes) -> ParsedBody:
        if nested_deeper_than(body, MAX_JSON_DEPTH):
            raise _too_deep()
        if len(body) >= SIMD_MIN_BODY and type(body) is bytes:  # (the cut needs bytes.find / rfind)
            parsed = self._large(body)
            if parsed is not None:
                return parsed
        return _decode(body)

    def _large(self, body: bytes) -> ParsedBody | None:
        if _OBJECT_START.match(body) is None:
            return None  # e.g. a byte-order mark, which simdjson skips and msgspec refuses
        try:
            doc = self._parser.parse(body)
        except (ValueError, RuntimeError):  # invalid, or outside simdjson's limits: msgspec decides
            return None
        if not isinstance(doc, simdjson.Object):
            return None
        keys = list(doc.keys())
        if any(keys.count(k) > 1 for k in _KEYS_OF_INTEREST):
            return None  # msgspec takes the last duplicate, simdjson the first
        model = doc.get("model")
        stream = doc.get("stream") is True
        del doc  # the parser is reused: no proxy of this document may outlive the call
        if not isinstance(model, str) or not model:
            return None  # msgspec words the error
        for key in PROMPT_KEYS:
            if key in keys:
                raw = member_value(
                    body, keys.index(key), len(keys), key.encode(), steps=16 + len(body) // 8192
                )
                if raw is None:
                    return None
                null = len(raw) == 4 and raw.tobytes() == b"null"
                return ParsedBody(model, b"" if null else raw, stream)
        return ParsedBody(model, b"", stream)
