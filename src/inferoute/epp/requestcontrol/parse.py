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
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import msgspec
import simdjson

from inferoute.epp.requestcontrol.spans import member_value
from inferoute.errors import InferouteError

CHARS_PER_TOKEN = 4


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
    """Decode a request body. Raises :class:`InferouteError` 400 when it is not a JSON object or has no
    string ``model``."""
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
        if len(body) >= SIMD_MIN_BODY and type(body) is bytes:  # (the cut needs bytes.find / rfind)
            parsed = self._large(body)
            if parsed is not None:
                return parsed
        return parse_body(body)

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
