"""Body-based routing (BBR): find the request's model.

Pure functions, no I/O:

* :func:`model_or_default` — the seed's rules: missing, null, empty or non-string ``model``, invalid JSON or a
  non-JSON content type give ``default_model``; body-less requests are not parsed at all (None: no header).
  The body is parsed once, by the picker's own parser
  (:class:`~inferoute.epp.requestcontrol.parse.BodyParser`: a validating msgspec decode that builds no Python
  object for the prompt, simdjson for large bodies), and the parse is returned with the model so that an
  embedded picker does not parse the body again.
* :func:`check_declared_length` / :class:`BodyLimit` — the size limit, enforced up front from
  ``Content-Length`` and again while reading (chunked uploads), both answering 413.

The remote variant (seed 000: the body streamed over ext_proc to a BBR server) lives in
:mod:`inferoute.extproc.bbr_client`; :class:`inferoute.gateway.routing.RequestRouter` chooses between them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from inferoute.epp.requestcontrol.parse import BodyParse, BodyParser
from inferoute.errors import InferouteError
from inferoute.picking import MAX_MODEL_NAME_CHARS


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
    body: bytes, content_type: str | None, default_model: str, parser: BodyParser
) -> tuple[str | None, BodyParse]:
    """The model header value for a request (None for a body-less one: no header is set), and the parse of
    the body to hand to the picker (None when the body was not parsed: empty, or not JSON).

    ``parser`` is the process's :class:`BodyParser`. Raises 400 (cause ``bad-model``) when the model contains
    control characters (it cannot become a header) or is longer than
    :data:`~inferoute.picking.MAX_MODEL_NAME_CHARS`.
    """
    if not body:
        return None, None
    if not is_json_content_type(content_type):
        return default_model, None
    try:
        parsed = parser.parse(body)
    except InferouteError as exc:  # no usable model: the default here, the picker answers the 400 itself
        return default_model, exc
    model = parsed.model
    if len(model) > MAX_MODEL_NAME_CHARS:
        message = f"the model name is longer than {MAX_MODEL_NAME_CHARS} characters"
        raise InferouteError(400, message, cause="bad-model", param="model")
    if not is_header_safe(model):
        raise InferouteError(
            400, "the model name contains control characters", cause="bad-model", param="model"
        )
    return model, parsed


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
