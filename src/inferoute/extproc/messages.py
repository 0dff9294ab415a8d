"""Pure builders and parsers for ext_proc messages (no I/O).

Both sides of the Endpoint Picker Protocol use these: the EPP servicer (parse requests, build replies) and
the data-plane client (build requests, parse replies). They are on the per-request hot path of a Python
process that is the bottleneck behind Envoy, so they avoid needless copies and lookups.

Protocol facts encoded here (see reference/spec/004 and the GIE handlers):

- Envoy 1.40 sends header values in ``raw_value`` (bytes); older proxies and tools use ``value``: read both.
- The destination goes in the ``x-gateway-destination-endpoint`` header AND in dynamic metadata
  ``envoy.lb/x-gateway-destination-endpoint`` with identical values (``ip:port`` or a comma list).
- Mutated or echoed bodies travel as ``streamed_response`` chunks of at most 62,000 bytes, and the headers
  reply sets ``Content-Length`` to the body's size.
- The subset hint is ``metadata_context.filter_metadata["envoy.lb.subset_hint"]
  ["x-gateway-destination-endpoint-subset"]``: a list of ``ip``/``ip:port`` strings, or a comma string.
- The served endpoint is ``metadata_context.filter_metadata["envoy.lb"]
  ["x-gateway-destination-endpoint-served"]``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Final

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from inferoute.picking import (
    DESTINATION_HEADER,
    DESTINATION_SERVED_KEY,
    FAILED_ENDPOINTS_KEY,
    FALLBACKS_KEY,
    LB_NAMESPACE,
    RESTORE_NAMESPACE,
    SUBSET_KEY,
    SUBSET_NAMESPACE,
)

__all__ = [
    "BODY_CHUNK_SIZE",
    "EXT_PROC_ATTRIBUTES_KEY",
    "BodyMode",
    "ProcessingRequest",
    "ProcessingResponse",
    "body_chunk_request",
    "body_chunks",
    "body_response",
    "code_details_of",
    "connect_failure_of",
    "destination_from_response",
    "failed_endpoints",
    "fallbacks_from_response",
    "headers_request",
    "headers_response",
    "immediate_response",
    "parse_headers",
    "protocol_config",
    "request_phase",
    "served_endpoint",
    "split_endpoints",
    "subset_hint",
    "trailers_request",
    "trailers_response",
]

ProcessingRequest = pb.ProcessingRequest
ProcessingResponse = pb.ProcessingResponse
BodyMode = processing_mode_pb2.ProcessingMode.BodySendMode

BODY_CHUNK_SIZE: Final = 62_000
"""Largest body chunk in a ``streamed_response`` (GIE's margin under the 64 KiB HTTP/2 frame default)."""

EXT_PROC_ATTRIBUTES_KEY: Final = "envoy.filters.http.ext_proc"
"""Key of ``ProcessingRequest.attributes`` holding requested attributes (``upstream.address``,
``response.code_details``)."""

_OVERWRITE: Final = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
NONE: Final = processing_mode_pb2.ProcessingMode.NONE
STREAMED: Final = processing_mode_pb2.ProcessingMode.STREAMED
BUFFERED: Final = processing_mode_pb2.ProcessingMode.BUFFERED
FULL_DUPLEX_STREAMED: Final = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED


# ----------------------------------------------------------------------------------------------- parsing


def request_phase(request: pb.ProcessingRequest) -> str:
    """The name of the set oneof: ``request_headers``, ``request_body``, ... or ``""``."""
    return request.WhichOneof("request") or ""


def parse_headers(header_map: Any) -> dict[str, str]:
    """A ``HeaderMap`` as a dict with lower-case names, reading ``raw_value`` and falling back to ``value``.

    Repeated headers are joined with ``,`` (HTTP list semantics); pseudo headers (``:path``) are kept.
    """
    out: dict[str, str] = {}
    for h in header_map.headers:
        raw = h.raw_value
        value = raw.decode("utf-8", "replace") if raw else h.value
        key = h.key.lower()
        prev = out.get(key)
        out[key] = value if prev is None else f"{prev},{value}"
    return out


def split_endpoints(value: str) -> tuple[str, ...]:
    """``"a:1, b:2"`` -> ``("a:1", "b:2")``; empty tokens dropped."""
    return tuple(t for t in (p.strip() for p in value.split(",")) if t)


def _value_tokens(value: Any) -> tuple[str, ...] | None:
    kind = value.WhichOneof("kind")
    if kind == "list_value":
        out: list[str] = []
        for item in value.list_value.values:
            if item.WhichOneof("kind") == "string_value":
                out.extend(split_endpoints(item.string_value))
        return tuple(out)
    if kind == "string_value":
        return split_endpoints(value.string_value)
    if kind == "null_value":
        return ()
    return None


def subset_hint(request: pb.ProcessingRequest) -> tuple[str, ...] | None:
    """The endpoint subset the EPP must pick from, or None when the data plane sent no hint.

    Accepts a list of strings (the spec's form) or a comma string (lwepp's). A present but empty hint returns
    ``()``: the EPP must answer 503. A value of another type is treated as empty (never as "whole pool").
    """
    fm = request.metadata_context.filter_metadata
    if SUBSET_NAMESPACE not in fm:
        return None
    fields = fm[SUBSET_NAMESPACE].fields
    if SUBSET_KEY not in fields:
        return None
    tokens = _value_tokens(fields[SUBSET_KEY])
    return tokens if tokens is not None else ()


def served_endpoint(request: pb.ProcessingRequest) -> str | None:
    """The endpoint that served the response, from the response-phase message.

    Preference: ``metadata_context.filter_metadata["envoy.lb"]["x-gateway-destination-endpoint-served"]``
    (the spec); else the ``upstream.address`` attribute (what Envoy reports via ``response_attributes``).
    """
    fm = request.metadata_context.filter_metadata
    if LB_NAMESPACE in fm:
        fields = fm[LB_NAMESPACE].fields
        if DESTINATION_SERVED_KEY in fields:
            v = fields[DESTINATION_SERVED_KEY]
            if v.WhichOneof("kind") == "string_value" and v.string_value:
                return str(v.string_value)
    attrs = request.attributes
    if EXT_PROC_ATTRIBUTES_KEY in attrs:
        fields = attrs[EXT_PROC_ATTRIBUTES_KEY].fields
        if "upstream.address" in fields:
            v = fields["upstream.address"]
            if v.WhichOneof("kind") == "string_value" and v.string_value:
                return str(v.string_value)
    return None


_CONNECT_FAILURES: Final = ("connection_failure", "connection_timeout")
"""Envoy's reset reasons for an upstream connection that was never established
(``remote_connection_failure``, ``local_connection_failure``, ``connection_failure``, ``connection_timeout``),
as they appear in the ``response.code_details`` attribute:
``upstream_reset_before_response_started{remote_connection_failure|...}``."""


def code_details_of(request: pb.ProcessingRequest) -> str | None:
    """Envoy's ``response.code_details`` attribute of a response-phase message (``via_upstream`` for a model
    server's answer), None when absent. Envoy sends it when the bootstrap asks for it in
    ``response_attributes`` (``inferoute envoy-config`` does); other data planes do not."""
    attrs = request.attributes
    if EXT_PROC_ATTRIBUTES_KEY not in attrs:
        return None
    fields = attrs[EXT_PROC_ATTRIBUTES_KEY].fields
    if "response.code_details" not in fields:
        return None
    return str(fields["response.code_details"].string_value)


def connect_failure_of(request: pb.ProcessingRequest) -> str | None:
    """Envoy's ``response.code_details`` when the response is Envoy's own answer to an upstream connection
    it could not open (refused, reset while connecting, timed out), else None. That local 503 passes the
    ext_proc filter's response phase like a model server's answer."""
    details = code_details_of(request)
    if details is None or not details.startswith("upstream_reset_before_response_started"):
        return None
    reasons = details.partition("{")[2].partition("|")[0].rstrip("}")
    return details if reasons.endswith(_CONNECT_FAILURES) else None


def status_of(headers: Mapping[str, str]) -> int:
    """The ``:status`` pseudo header as an int (0 when absent or malformed)."""
    try:
        return int(headers.get(":status", "0"))
    except ValueError:
        return 0


# ------------------------------------------------------------------------------------------- EPP replies


def _set_header(mutation: Any, name: str, value: str) -> None:
    """Append an overwriting ``HeaderValueOption`` to ``mutation`` (filled in place: building one and
    appending it copies it, twice the cost on the decision's path)."""
    option = mutation.add()
    header = option.header
    header.key = name
    header.raw_value = value.encode()
    option.append_action = _OVERWRITE


def headers_response(
    phase: str = "request_headers",
    *,
    destination: Sequence[str] | None = None,
    set_headers: Mapping[str, str] | None = None,
    content_length: int | None = None,
    replace_body: bytes | None = None,
    destination_header: str = DESTINATION_HEADER,
    restore_model: tuple[str, str] | None = None,
    remove_headers: Sequence[str] = (),
    fallbacks: Sequence[str] = (),
) -> pb.ProcessingResponse:
    """A ``HeadersResponse`` for ``phase`` (``request_headers`` or ``response_headers``).

    With ``destination``: sets the destination header and the identical ``envoy.lb`` dynamic metadata (a
    comma list for fallbacks) and asks for ``clear_route_cache``. ``content_length`` sets ``Content-Length``
    (required when the body is echoed or replaced). All header mutations overwrite, so a client-supplied value
    cannot survive. ``phase`` may also be ``request_body`` (the BUFFERED-mode decision), where
    ``replace_body`` sets a whole new body (``body_mutation.body``). ``restore_model`` ``(served, asked)``
    goes in the ``inferoute.model`` dynamic metadata (:func:`restore_from_response`); ``remove_headers`` are
    removed. ``fallbacks`` (the picker's added endpoints) go only in the ``envoy.lb`` metadata under
    ``FALLBACKS_KEY``, which inferoute's data planes read and Envoy ignores (its ORIGINAL_DST cluster
    takes one endpoint).
    """
    resp = pb.ProcessingResponse()
    common = getattr(resp, phase).response
    if (
        destination is None
        and not set_headers
        and content_length is None
        and replace_body is None
        and restore_model is None
        and not remove_headers
    ):
        # An empty CommonResponse (status CONTINUE) must still be marked present on the oneof.
        getattr(resp, phase).SetInParent()
        return resp
    mutation = common.header_mutation.set_headers
    if destination is not None:
        value = ",".join(destination)
        _set_header(mutation, destination_header, value)
        common.clear_route_cache = True
        lb = resp.dynamic_metadata.fields[LB_NAMESPACE].struct_value
        lb.fields[DESTINATION_HEADER].string_value = value
        if fallbacks:
            lb.fields[FALLBACKS_KEY].string_value = ",".join(fallbacks)
    if set_headers:
        for k, v in set_headers.items():
            _set_header(mutation, k, v)
    if content_length is not None:
        _set_header(mutation, "content-length", str(content_length))
    if remove_headers:
        common.header_mutation.remove_headers.extend(remove_headers)
    if replace_body is not None:
        common.body_mutation.body = replace_body
    if restore_model is not None:
        ns = resp.dynamic_metadata.fields[RESTORE_NAMESPACE].struct_value
        ns.fields["served"].string_value, ns.fields["asked"].string_value = restore_model
    return resp


def fallbacks_from_response(resp: pb.ProcessingResponse) -> tuple[str, ...]:
    """The fallbacks a picker added to its decision (``envoy.lb`` metadata ``FALLBACKS_KEY``)."""
    fields = resp.dynamic_metadata.fields
    if LB_NAMESPACE not in fields:
        return ()
    inner = fields[LB_NAMESPACE].struct_value.fields
    if FALLBACKS_KEY not in inner:
        return ()
    return split_endpoints(inner[FALLBACKS_KEY].string_value)


def restore_from_response(resp: pb.ProcessingResponse) -> tuple[str, str] | None:
    """The ``(served, asked)`` model names of a decision (see :func:`headers_response`), None when absent."""
    fields = resp.dynamic_metadata.fields
    if RESTORE_NAMESPACE not in fields:
        return None
    inner = fields[RESTORE_NAMESPACE].struct_value.fields
    if "served" not in inner or "asked" not in inner:
        return None
    return inner["served"].string_value, inner["asked"].string_value


def body_response(phase: str = "request_body") -> pb.ProcessingResponse:
    """An empty ``BodyResponse`` (continue, body unchanged) for BUFFERED/STREAMED modes."""
    resp = pb.ProcessingResponse()
    getattr(resp, phase).SetInParent()
    return resp


def body_chunks(
    body: bytes | memoryview,
    phase: str = "request_body",
    *,
    end_of_stream: bool = True,
    chunk_size: int = BODY_CHUNK_SIZE,
) -> Iterator[pb.ProcessingResponse]:
    """Yield ``streamed_response`` body mutations of at most ``chunk_size`` bytes.

    The last one carries ``end_of_stream``. An empty body yields one empty chunk.
    """
    view = memoryview(body)
    n = len(view)
    if n == 0:
        yield _chunk(b"", phase, end_of_stream)
        return
    for start in range(0, n, chunk_size):
        stop = start + chunk_size
        yield _chunk(view[start:stop], phase, end_of_stream and stop >= n)


_SMALL_VARINTS: Final = tuple(bytes((n,)) for n in range(0x80))


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _SMALL_VARINTS[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# ProcessingResponse field numbers of the body phases (external_processor.proto)
_PHASE_FIELD: Final = {"request_body": 3, "response_body": 4}


def _wire_chunk(part: bytes | memoryview, field: int, eos: bool) -> list[bytes | memoryview]:
    size = len(part)
    head = (b"\x0a" + _varint(size)) if size else b""  # proto3: an empty body is not written
    tail = b"\x10\x01" if eos else b""
    sbr = len(head) + size + len(tail)
    mutation = b"\x1a" + _varint(sbr)
    common = b"\x1a" + _varint(len(mutation) + sbr)
    response = b"\x0a" + _varint(len(common) + len(mutation) + sbr)
    outer = bytes(((field << 3) | 2,)) + _varint(len(response) + len(common) + len(mutation) + sbr)
    return [b"".join((outer, response, common, mutation, head)), part, tail]


def body_chunks_wire(
    body: bytes | memoryview,
    phase: str = "request_body",
    *,
    end_of_stream: bool = True,
    chunk_size: int = BODY_CHUNK_SIZE,
) -> list[list[bytes | memoryview]]:
    """:func:`body_chunks` already serialized, each as ``[prefix, body slice, suffix]`` with the slice a view
    of ``body`` (no copy): the same bytes as ``SerializeToString()`` of the messages ``body_chunks`` yields.

    ProcessingResponse{<phase> 3|4: BodyResponse{response 1: CommonResponse{body_mutation 3:
    BodyMutation{streamed_response 3: StreamedBodyResponse{body 1, end_of_stream 2}}}}}.
    """
    n = len(body)
    field = _PHASE_FIELD[phase]
    if n <= chunk_size:  # the usual case: one chunk, the body itself
        return [_wire_chunk(body, field, end_of_stream)]
    view = memoryview(body)
    return [
        _wire_chunk(view[start : start + chunk_size], field, end_of_stream and start + chunk_size >= n)
        for start in range(0, n, chunk_size)
    ]


def _chunk(data: bytes | memoryview, phase: str, eos: bool) -> pb.ProcessingResponse:
    resp = pb.ProcessingResponse()
    sr = getattr(resp, phase).response.body_mutation.streamed_response
    sr.body = bytes(data)
    sr.end_of_stream = eos
    return resp


def trailers_response(phase: str = "request_trailers") -> pb.ProcessingResponse:
    resp = pb.ProcessingResponse()
    getattr(resp, phase).SetInParent()
    return resp


def immediate_response(
    status: int, body: bytes, headers: Mapping[str, str] | None = None, *, details: str = ""
) -> pb.ProcessingResponse:
    """Answer the client directly: HTTP ``status`` with ``body`` (an OpenAI JSON error), JSON content type."""
    resp = pb.ProcessingResponse()
    ir = resp.immediate_response
    ir.status.code = status
    ir.body = body
    if details:
        ir.details = details
    hdrs = {"content-type": "application/json"}
    if headers:
        hdrs.update({k.lower(): v for k, v in headers.items()})
    for k, v in hdrs.items():
        _set_header(ir.headers.set_headers, k, v)
    return resp


# -------------------------------------------------------------------------------------------- data plane


def protocol_config(
    request_body_mode: int = FULL_DUPLEX_STREAMED, response_body_mode: int = FULL_DUPLEX_STREAMED
) -> pb.ProtocolConfiguration:
    return pb.ProtocolConfiguration(
        request_body_mode=request_body_mode,
        response_body_mode=response_body_mode,
    )


def _header_map(headers: Iterable[tuple[str, str]]) -> list[base_pb2.HeaderValue]:
    return [base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers]


def headers_request(
    headers: Iterable[tuple[str, str]],
    *,
    end_of_stream: bool,
    phase: str = "request_headers",
    config: pb.ProtocolConfiguration | None = None,
    subset: Sequence[str] | None = None,
    served: str | None = None,
    failed: Sequence[str] | None = None,
) -> pb.ProcessingRequest:
    """A headers message (pseudo headers included by the caller), optional subset hint / served endpoint /
    endpoints that refused the connection (passive health, ``FAILED_ENDPOINTS_KEY``)."""
    req = pb.ProcessingRequest()
    h = getattr(req, phase)
    h.headers.headers.extend(_header_map(headers))
    h.end_of_stream = end_of_stream
    if config is not None:
        req.protocol_config.CopyFrom(config)
    if subset is not None:
        hint = req.metadata_context.filter_metadata[SUBSET_NAMESPACE].fields[SUBSET_KEY].list_value
        hint.SetInParent()  # an empty list is meaningful (the EPP must answer 503)
        hint.extend(list(subset))
    if served is not None:
        _set_served(req, served)
    if failed:
        fields = req.metadata_context.filter_metadata[LB_NAMESPACE].fields
        fields[FAILED_ENDPOINTS_KEY].string_value = ",".join(failed)
    return req


def failed_endpoints(request: pb.ProcessingRequest) -> list[str]:
    """The endpoints a data plane could not connect to (``envoy.lb`` metadata ``FAILED_ENDPOINTS_KEY``,
    inferoute's extension), in the response-headers message; at most 16 are read."""
    fm = request.metadata_context.filter_metadata
    if LB_NAMESPACE not in fm:
        return []
    fields = fm[LB_NAMESPACE].fields
    if FAILED_ENDPOINTS_KEY not in fields:
        return []
    v = fields[FAILED_ENDPOINTS_KEY]
    if v.WhichOneof("kind") != "string_value":
        return []
    return [t.strip() for t in v.string_value.split(",")[:16] if t.strip()]


def body_chunk_request(
    chunk: bytes, *, end_of_stream: bool, phase: str = "request_body", served: str | None = None
) -> pb.ProcessingRequest:
    req = pb.ProcessingRequest()
    b = getattr(req, phase)
    b.body = chunk
    b.end_of_stream = end_of_stream
    if served is not None:
        _set_served(req, served)
    return req


def body_chunk_requests(body: bytes, step: int) -> list[pb.ProcessingRequest]:
    """``body`` as request-body messages of at most ``step`` bytes, the last with ``end_of_stream``."""
    view = memoryview(body)
    n = len(view)
    return [
        body_chunk_request(bytes(view[i : i + step]), end_of_stream=i + step >= n) for i in range(0, n, step)
    ]


NOT_SENT_TO_PROCESSOR = frozenset({"connection", "keep-alive", "transfer-encoding", "upgrade", "te", "host"})
"""Request headers a data plane does not pass to an ext_proc server: hop-by-hop ones (Envoy drops them too)
and ``host``, which travels as ``:authority``."""


def _set_served(req: pb.ProcessingRequest, served: str) -> None:
    req.metadata_context.filter_metadata[LB_NAMESPACE].fields[DESTINATION_SERVED_KEY].string_value = served


def trailers_request(phase: str = "request_trailers") -> pb.ProcessingRequest:
    req = pb.ProcessingRequest()
    getattr(req, phase).SetInParent()
    return req


def destination_from_response(
    resp: pb.ProcessingResponse, header_name: str = DESTINATION_HEADER
) -> tuple[tuple[str, ...] | None, tuple[str, ...] | None, dict[str, str]]:
    """Read a headers reply: ``(metadata endpoints, header endpoints, other set headers)``.

    Either endpoint tuple is None when absent. Header names in the returned dict are lower-case; the
    destination header and ``content-length`` are not included.
    """
    phase = resp.WhichOneof("response")
    common = getattr(resp, phase).response if phase else None
    from_meta: tuple[str, ...] | None = None
    lb = resp.dynamic_metadata.fields
    if LB_NAMESPACE in lb:
        inner = lb[LB_NAMESPACE].struct_value.fields
        if DESTINATION_HEADER in inner:
            from_meta = split_endpoints(inner[DESTINATION_HEADER].string_value)
    from_header: tuple[str, ...] | None = None
    others: dict[str, str] = {}
    wanted = header_name.lower()
    if common is not None:
        for opt in common.header_mutation.set_headers:
            h = opt.header
            key = h.key.lower()
            value = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
            if key == wanted:
                from_header = split_endpoints(value)
            elif key != "content-length":
                others[key] = value
    return from_meta, from_header, others
