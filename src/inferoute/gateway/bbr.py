"""Body-based routing (BBR): find the request's model.

Pure functions, no I/O:

* :func:`extract_model` — the top-level JSON string ``model`` through a *validated* msgspec decode into a
  struct that has only that field: the whole document is checked for JSON syntax, but no other value
  becomes a Python object (measured several times faster than ``json.loads``; see docs/benchmarks/gateway.md).
* :class:`ModelReader` — the same answer, faster on bodies of a kilobyte and more: simdjson (SIMD validation
  of the whole document, UTF-8 included, then one lookup) through one reused parser. Whenever simdjson refuses
  a document or sees ``model`` twice, :func:`extract_model` decides, so both always agree (msgspec keeps the
  last duplicate, as Python's ``json`` does on the model server).
* :func:`model_or_default` — the seed's rules: missing, null, empty or non-string ``model``, invalid JSON or a
  non-JSON content type give ``default_model``; body-less requests are not parsed at all (None: no header).
* :func:`check_declared_length` / :class:`BodyLimit` — the size limit, enforced up front from
  ``Content-Length`` and again while reading (chunked uploads), both answering 413.

The remote variant (seed 000: the body streamed over ext_proc to a BBR server) lives in
:mod:`inferoute.extproc.bbr_client`; :class:`inferoute.gateway.routing.RouteDecider` chooses between them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import msgspec
import simdjson

from inferoute.errors import InferouteError
from inferoute.picking import MAX_MODEL_NAME_CHARS


class _ModelOnly(msgspec.Struct):
    model: object = msgspec.UNSET


_DECODER = msgspec.json.Decoder(_ModelOnly)


def extract_model(body: bytes | bytearray | memoryview) -> str | None:
    """The top-level ``model`` if it is a non-empty JSON string in a valid JSON object, else None."""
    try:
        value = _DECODER.decode(body).model
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):  # too deep: not for routing
        return None
    if isinstance(value, str) and value:
        return value
    return None


SIMD_MIN_BODY = 1024
"""Bodies from this size on go through simdjson (below it msgspec's small-document path is quicker)."""


class ModelReader:
    """:func:`extract_model` with simdjson for bodies of :data:`SIMD_MIN_BODY` bytes and more (see module).

    Owns one parser, reused (its buffers grow to the largest body seen, about twice its size): use one reader
    per event loop, never from several threads at once.
    """

    __slots__ = ("_parser",)

    def __init__(self) -> None:
        self._parser = simdjson.Parser()

    def extract(self, body: bytes | bytearray | memoryview) -> str | None:
        """The top-level ``model`` if it is a non-empty JSON string in a valid JSON object, else None."""
        if len(body) < SIMD_MIN_BODY:
            return extract_model(body)
        try:
            doc = self._parser.parse(body)
        except (ValueError, RuntimeError):  # invalid, or valid but outside simdjson's limits (depth, ...)
            return extract_model(body)
        if not isinstance(doc, simdjson.Object):
            return None
        if sum(1 for key in doc if key == "model") > 1:
            return extract_model(body)  # duplicate keys: the last one wins, as on the model server
        value = doc.get("model")
        if isinstance(value, str) and value:
            return value
        return None


def is_json_content_type(content_type: str | None) -> bool:
    """``application/json``, ``application/*+json`` and ``text/json``; a missing content type is given the
    benefit of the doubt (many clients omit it)."""
    if not content_type:
        return True
    mime = content_type.split(";", 1)[0].strip().lower()
    return mime in ("application/json", "text/json") or (
        mime.startswith("application/") and mime.endswith("+json")
    )


_UNSAFE_HEADER_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def is_header_safe(value: str) -> bool:
    """True when ``value`` can be sent as an HTTP header value (no CR, LF or other control characters)."""
    return _UNSAFE_HEADER_CHARS.search(value) is None


def model_or_default(
    body: bytes, content_type: str | None, default_model: str, reader: ModelReader | None = None
) -> str | None:
    """The model header value for a request: None for a body-less request (no header is set).

    ``reader`` (the process's :class:`ModelReader`) makes large bodies cheaper; the answer is the same.
    Raises 400 (cause ``bad-model``) when the model contains control characters (it cannot become a header)
    or is longer than :data:`~inferoute.picking.MAX_MODEL_NAME_CHARS`.
    """
    if not body:
        return None
    if not is_json_content_type(content_type):
        return default_model
    model = extract_model(body) if reader is None else reader.extract(body)
    if model is None:
        return default_model
    if len(model) > MAX_MODEL_NAME_CHARS:
        message = f"the model name is longer than {MAX_MODEL_NAME_CHARS} characters"
        raise InferouteError(400, message, cause="bad-model", param="model")
    if not is_header_safe(model):
        raise InferouteError(
            400, "the model name contains control characters", cause="bad-model", param="model"
        )
    return model


def too_large(limit: int, size: int | None = None) -> InferouteError:
    where = f" ({size} bytes)" if size is not None else ""
    return InferouteError(
        413, f"request body{where} exceeds the limit of {limit} bytes", cause="body-too-large"
    )


def check_declared_length(headers: Mapping[str, str], limit: int) -> int | None:
    """Validate ``Content-Length`` against ``limit`` before reading; the declared length (None if absent).

    Raises 413 when it is over the limit and 400 when it is not a non-negative integer.
    """
    raw = headers.get("content-length") or headers.get("Content-Length")
    if raw is None:
        return None
    raw = raw.strip()
    if not raw.isdigit():
        raise InferouteError(400, f"invalid Content-Length {raw!r}", cause="bad-request")
    size = int(raw)
    if size > limit:
        raise too_large(limit, size)
    return size


class BodyLimit:
    """Counts bytes as they are read and raises 413 as soon as ``limit`` is passed (chunked uploads)."""

    __slots__ = ("limit", "seen")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen = 0

    def feed(self, n: int) -> None:
        self.seen += n
        if self.seen > self.limit:
            raise too_large(self.limit)
