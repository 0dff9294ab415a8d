"""The ext_proc stream logic: one ext_proc stream per HTTP request, adapted onto any Picker.

Theory of operation
-------------------
:class:`ExtProcServicer` turns the messages of one stream into a
:class:`~inferoute.picking.PickRequest`, asks the picker, and answers the proxy (GIE's handler sequence,
reference/gateway-api-inference-extension.md section 1):

* request headers -- remembered. With ``end_of_stream`` (no body) the decision is made at once. In
  BUFFERED / STREAMED modes (announced in ``protocol_config``) an empty headers reply lets the body come.
* request body -- FULL_DUPLEX_STREAMED: chunks are accumulated; at ``end_of_stream`` the picker decides,
  then the stream gets (a) the held headers reply: destination header + ``Content-Length`` + picker
  headers, ``clear_route_cache`` and the same destination in ``envoy.lb`` dynamic metadata, and (b) the
  (possibly rewritten) body as ``streamed_response`` chunks of 62,000 bytes. BUFFERED: one body message,
  one body reply carrying the mutation. A body ended by trailers is decided at the trailers.
* a :class:`~inferoute.picking.Reject` (or an :class:`~inferoute.errors.InferouteError` raised by the
  picker) becomes an ImmediateResponse with its status and OpenAI JSON body; any other picker exception
  ends the stream with a gRPC error so the proxy applies its failure mode (``failure_mode_allow``).
* response headers / body / trailers -- fed to the :class:`~inferoute.picking.PickSession` (served
  endpoint from ``envoy.lb`` metadata or the ``upstream.address`` attribute, status from ``:status``);
  body chunks are echoed in full duplex (after a model rewrite with the asked name restored and
  ``Content-Length`` removed from the response headers) and acknowledged otherwise. The session ends on the
  response's end of stream, on the stream's end (finished if a response was seen) or on cancellation
  (aborted).
* flow control evicting the request (:class:`~inferoute.picking.EvictableSession`): a 429 ImmediateResponse
  with ``x-llm-d-request-dropped-reason: evicted`` is sent at once and the stream ends (h2 transport), or
  it replaces the reply to the stream's next message (grpc.aio).

:class:`ExtProcStream` holds that protocol state without any gRPC library; ``ExtProcServicer.Process`` is
its grpc.aio adapter and :mod:`inferoute.epp.serving.server` mounts it on inferoute's own h2 transport.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc
from prometheus_client import CollectorRegistry

from inferoute.epp.requestcontrol.headers import DROPPED_REASON
from inferoute.epp.requestcontrol.restore import ModelRestorer
from inferoute.epp.serving import h2server as h2s
from inferoute.epp.serving.h2server import GrpcAbort
from inferoute.errors import InferouteError, error_body
from inferoute.extproc import messages as m
from inferoute.fastmetrics import DescribedFastCollector, FastFamily
from inferoute.picking import (
    DESTINATION_HEADER,
    DESTINATION_SERVED_KEY,
    EVICTED_MESSAGE,
    EVICTED_REASON,
    Decision,
    Destination,
    ImmediatePicker,
    NullSession,
    Picker,
    PickerError,
    PickRequest,
    PickSession,
    Reject,
    evictable,
    report_endpoint_failed,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 128 * 1024 * 1024
"""Largest gRPC message accepted: BUFFERED mode carries the whole body in one message."""
MAX_BODY_BYTES = DEFAULT_MAX_MESSAGE_BYTES
"""Largest request body a stream accumulates in FULL_DUPLEX_STREAMED mode (as large as a BUFFERED one)."""

# Headers a client must not be able to pass to the picker as if the proxy had set them.
_STRIPPED = frozenset({DESTINATION_HEADER, DESTINATION_SERVED_KEY, "content-length"})
# Constant replies, built once and never mutated (gRPC only serialises them).
_ACK_REQUEST_HEADERS = m.headers_response("request_headers")
_ACK_REQUEST_BODY = m.body_response("request_body")
_ACK_REQUEST_TRAILERS = m.trailers_response("request_trailers")
_ACK_RESPONSE_HEADERS = m.headers_response("response_headers")
_RESPONSE_HEADERS_NO_LENGTH = m.headers_response("response_headers", remove_headers=("content-length",))
_ACK_RESPONSE_BODY = m.body_response("response_body")
_ACK_RESPONSE_TRAILERS = m.trailers_response("response_trailers")


class ExtProcMetrics:
    """Counters of the ext_proc server, registered on the registry passed in (never the default one).

    Plain numbers (:mod:`inferoute.fastmetrics`): every stream updates four of them, and prometheus_client's
    locked updates cost several microseconds per decision."""

    def __init__(self, registry: CollectorRegistry) -> None:
        streams = FastFamily("counter", "inferoute_extproc_streams_total", "ext_proc streams opened.")
        active = FastFamily("gauge", "inferoute_extproc_active_streams", "ext_proc streams open now.")
        decisions = FastFamily(
            "counter",
            "inferoute_extproc_decisions_total",
            "Picker decisions sent back, by outcome.",
            ["outcome"],
        )
        self.errors = FastFamily(
            "counter", "inferoute_extproc_errors_total", "ext_proc failures, by cause.", ["cause"]
        )
        seconds = FastFamily(
            "histogram",
            "inferoute_extproc_decision_duration_seconds",
            "Time from the end of the request (headers or body) to the picker's decision.",
            buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        )
        self.streams = streams.value()
        self.active = active.value()
        self.destination = decisions.value("destination")
        self.reject = decisions.value("reject")
        self.decision_seconds = seconds.histogram()
        registry.register(DescribedFastCollector([streams, active, decisions, self.errors, seconds]))


@dataclass(slots=True)
class _Exchange:
    """Per-stream state (one HTTP request)."""

    headers: dict[str, str]
    subset: tuple[str, ...] | None
    full_duplex_request: bool
    full_duplex_response: bool
    response_body_expected: bool
    session: PickSession | None = None
    decided: bool = False
    response_seen: bool = False
    ended: bool = False
    restorer: ModelRestorer | None = None
    """Puts the asked model name back in the echoed response body (a model rewrite, full duplex)."""
    evicted: bool = False
    """Flow control revoked the request: the next reply is the 429 ImmediateResponse."""
    destination: tuple[str, ...] = ()
    """The endpoints sent as the destination (what Envoy's ``override_host`` may try in turn)."""

    def stream_closed(self, reason: str) -> None:
        """The proxy closed or reset the stream. Envoy resets it once the response is done when it was told
        not to send the response body, so then a seen response counts as finished; otherwise the request or
        the response was cut short."""
        self.end(self.response_seen and not self.response_body_expected, reason)

    def end(self, finished: bool, reason: str = "") -> None:
        if self.ended or self.session is None:
            self.ended = True
            return
        self.ended = True
        if finished:
            self.session.response_finished()
        else:
            self.session.aborted(reason)


class ExtProcStream:
    """The protocol state of one ext_proc stream, independent of the gRPC library that carries it.

    :meth:`feed` answers each message at once, or returns None when the picker must be asked: the transport
    then awaits :meth:`resume` before feeding the next message. Failures raise
    :class:`~inferoute.epp.serving.h2server.GrpcAbort` (the stream ends with that gRPC status).
    """

    __slots__ = ("_chunk_bytes", "_chunks", "_core", "_echo", "_ex", "_pending", "_tail", "_writer")

    def __init__(
        self, core: ExtProcServicer, *, encoded: bool = False, writer: h2s.StreamWriter | None = None
    ) -> None:
        self._core = core
        self._writer = writer
        """Sends replies outside feed/resume (h2 transport): an eviction answers at once."""
        # body echoes as pre-encoded views of the body (h2 transport) or as protobuf messages (grpc.aio)
        self._echo = _echo_encoded if encoded else _echo_messages
        self._ex: _Exchange | None = None
        self._chunks: list[bytes] = []
        self._chunk_bytes = 0
        self._pending: tuple[bytes | None, str, bool] | None = None
        self._tail: tuple[m.ProcessingResponse, ...] = ()
        core.metrics.streams.inc()
        core.metrics.active.inc()

    def feed(self, req: m.ProcessingRequest) -> Sequence[m.ProcessingResponse] | None:
        try:
            return self._feed(req)
        except _ProtocolError as exc:
            self._core.metrics.errors.value("protocol").inc()
            log.warning("ext_proc protocol error: %s", exc)
            if self._ex is not None:
                self._ex.end(False, "protocol-error")
            raise GrpcAbort(h2s.INVALID_ARGUMENT, str(exc)) from exc

    def _feed(self, req: m.ProcessingRequest) -> Sequence[m.ProcessingResponse] | None:
        phase = req.WhichOneof("request")
        ex = self._ex
        if ex is not None and ex.evicted and not ex.ended:  # grpc.aio: the eviction rides on the next reply
            ex.end(False, "evicted")
            return (_evicted_response(),)
        if phase == "request_body":
            if ex is None or ex.decided:
                raise _ProtocolError("request body before headers or after the decision")
            rb = req.request_body
            if not rb.end_of_stream:
                self._chunk_bytes += len(rb.body)
                if self._chunk_bytes > MAX_BODY_BYTES:  # a body flood: memory is bounded per stream
                    raise GrpcAbort(h2s.RESOURCE_EXHAUSTED, f"request body over {MAX_BODY_BYTES} bytes")
                self._chunks.append(rb.body)
                return () if ex.full_duplex_request else (_ACK_REQUEST_BODY,)  # STREAMED: ack each chunk
            if self._chunks:
                self._chunks.append(rb.body)
                body = b"".join(self._chunks)
                self._chunks.clear()
            else:
                body = rb.body
            return self._decide(body, "request_headers" if ex.full_duplex_request else "request_body", True)
        if phase == "request_headers":
            if ex is not None:
                raise _ProtocolError("a second request_headers message on one stream")
            ex = self._ex = self._core.start(req)
            if req.request_headers.end_of_stream:
                return self._decide(None, "request_headers", True)
            return () if ex.full_duplex_request else (_ACK_REQUEST_HEADERS,)
        if phase == "response_body":
            rb = req.response_body
            if rb.body and ex is not None and ex.session is not None and not ex.ended:
                ex.session.response_chunk(rb.body)
            if rb.end_of_stream and ex is not None:
                # Before the last reply: Envoy may reset the stream as soon as it has it.
                ex.end(True)
            if ex is not None and ex.full_duplex_response:
                body = rb.body
                if ex.restorer is not None:
                    body = ex.restorer.feed(body)
                    if rb.end_of_stream:
                        body += ex.restorer.finish()
                return self._echo(body, "response_body", rb.end_of_stream)
            return (_ACK_RESPONSE_BODY,)
        if phase == "response_headers":
            if ex is not None:
                self._core.response_started(ex, req)
                if req.response_headers.end_of_stream:
                    ex.end(True)
                if ex.restorer is not None:  # the restored body may differ in length
                    return (_RESPONSE_HEADERS_NO_LENGTH,)
            return (_ACK_RESPONSE_HEADERS,)
        if phase == "request_trailers":
            if ex is not None and not ex.decided:
                body = b"".join(self._chunks)
                self._chunks.clear()
                self._tail = (_ACK_REQUEST_TRAILERS,)
                return self._decide(
                    body, "request_headers" if ex.full_duplex_request else "request_body", False
                )
            return (_ACK_REQUEST_TRAILERS,)
        if phase == "response_trailers":
            if ex is not None:
                ex.end(True)
            return (_ACK_RESPONSE_TRAILERS,)
        raise _ProtocolError(f"unsupported ext_proc message {phase!r}")

    def _decide(self, body: bytes | None, phase: str, eos: bool) -> Sequence[m.ProcessingResponse] | None:
        """The replies to a decision the picker makes at once, or None: the transport awaits
        :meth:`resume`."""
        assert self._ex is not None
        replies = self._core.decide_now(self._ex, body, phase, eos=eos, echo=self._echo)
        if replies is None:
            self._pending = (body, phase, eos)
            return None
        return self._decided(replies)

    async def resume(self) -> Sequence[m.ProcessingResponse]:
        assert self._ex is not None and self._pending is not None
        body, phase, eos = self._pending
        self._pending = None
        return self._decided(await self._core.decide(self._ex, body, phase, eos=eos, echo=self._echo))

    def _decided(self, replies: list[Any]) -> Sequence[m.ProcessingResponse]:
        ex = self._ex
        assert ex is not None
        target = evictable(ex.session) if ex.session is not None and not ex.ended else None
        if target is not None:
            target.on_evict(self._on_evict)
        if self._tail:
            replies = [*replies, *self._tail]
            self._tail = ()
        return replies

    def _on_evict(self) -> None:
        """Flow control revoked the request: a 429 ImmediateResponse (Envoy answers the client with it, or
        resets the stream when the answer has started) and the end of the stream; without a writer (grpc.aio)
        the next message gets it."""
        ex = self._ex
        if ex is None or ex.ended:
            return
        if self._writer is None:
            ex.evicted = True
            return
        ex.end(False, "evicted")
        self._writer.send([_evicted_response()])
        self._writer.finish()

    def end_of_input(self) -> Sequence[m.ProcessingResponse]:
        """The proxy half-closed the stream."""
        if self._ex is not None:
            # grpc.aio cannot tell a half-close from a cancellation, so a response counts as finished only
            # when no body was announced (see _Exchange.stream_closed).
            self._ex.stream_closed("stream-ended-early")
        return ()

    def close(self, cancelled: bool) -> None:
        self._core.metrics.active.dec()
        ex = self._ex
        if ex is not None and not ex.ended:
            ex.stream_closed("stream-cancelled" if cancelled else "stream-closed")


_GRPC_CODES = {c.value[0]: c for c in grpc.StatusCode}

_Echo = Callable[[bytes, str, bool], Sequence[Any]]


def _evicted_response() -> m.ProcessingResponse:
    headers = {"content-type": "application/json", DROPPED_REASON: EVICTED_REASON}
    return m.immediate_response(429, error_body(429, EVICTED_MESSAGE), headers, details="evicted")


def _echo_messages(body: bytes, phase: str, eos: bool) -> Sequence[m.ProcessingResponse]:
    return tuple(m.body_chunks(body, phase, end_of_stream=eos))


def _echo_encoded(body: bytes, phase: str, eos: bool) -> Sequence[h2s.Encoded]:
    return [h2s.Encoded(pieces) for pieces in m.body_chunks_wire(body, phase, end_of_stream=eos)]


class ExtProcServicer(ext_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """``envoy.service.ext_proc.v3.ExternalProcessor`` over any :class:`~inferoute.picking.Picker`: the
    shared per-stream logic (:class:`ExtProcStream`) and the ``grpc.aio`` adapter of it."""

    def __init__(
        self,
        picker: Picker,
        metrics: ExtProcMetrics,
        *,
        destination_header: str = DESTINATION_HEADER,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._picker = picker
        self.metrics = metrics
        self._header = destination_header
        self._clock = clock
        self._immediate = picker if isinstance(picker, ImmediatePicker) else None

    def open(self, _writer: object = None) -> ExtProcStream:
        """A new stream's state (grpc.aio)."""
        return ExtProcStream(self)

    def open_encoded(self, writer: h2s.StreamWriter | None = None) -> ExtProcStream:
        """A new stream's state for the h2 server (its body echoes are not copied into messages; ``writer``
        sends an eviction at once)."""
        return ExtProcStream(self, encoded=True, writer=writer)

    async def Process(
        self, request_iterator: AsyncIterator[m.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[m.ProcessingResponse]:
        stream = self.open()
        closed = False
        try:
            async for req in request_iterator:
                out = stream.feed(req)
                if out is None:
                    out = await stream.resume()
                for resp in out:
                    yield resp
            stream.end_of_input()
            closed = True
            stream.close(False)
        except GrpcAbort as exc:
            closed = True
            stream.close(False)
            await context.abort(_GRPC_CODES.get(exc.code, grpc.StatusCode.UNKNOWN), exc.details)
        finally:
            if not closed:  # cancelled, or closed by gRPC at a yield (the proxy reset the stream)
                stream.close(True)

    # ------------------------------------------------------------------------------------------------ helpers

    def start(self, req: m.ProcessingRequest) -> _Exchange:
        headers = m.parse_headers(req.request_headers.headers)
        full_duplex_req = full_duplex_resp = body_expected = True
        if req.HasField("protocol_config"):
            pc = req.protocol_config
            full_duplex_req = pc.request_body_mode == m.FULL_DUPLEX_STREAMED
            full_duplex_resp = pc.response_body_mode == m.FULL_DUPLEX_STREAMED
            body_expected = pc.response_body_mode != m.NONE
        return _Exchange(headers, m.subset_hint(req), full_duplex_req, full_duplex_resp, body_expected)

    def _pick_request(self, ex: _Exchange, body: bytes) -> PickRequest:
        h = ex.headers
        clean = {k: v for k, v in h.items() if not k.startswith(":") and k not in _STRIPPED}
        if "host" not in clean and ":authority" in h:
            clean["host"] = h[":authority"]
        return PickRequest(
            method=h.get(":method", ""),
            path=h.get(":path", ""),
            headers=clean,
            body=body,
            request_id=h.get("x-request-id", ""),
            subset=ex.subset,
        )

    async def decide(
        self, ex: _Exchange, body: bytes | None, phase: str, *, eos: bool, echo: _Echo | None = None
    ) -> list[Any]:
        """Ask the picker and build the replies: headers (or body) mutation, then the body echo.

        ``body`` is None for a request without a body (decided on its headers).
        """
        ex.decided = True
        start = self._clock()
        try:
            got = await self._picker.pick(self._pick_request(ex, body or b""))
        except Exception as exc:
            got = self._pick_failed(ex, exc)
        return self._replies(ex, got, start, body, phase, eos, echo or _echo_messages)

    def decide_now(
        self, ex: _Exchange, body: bytes | None, phase: str, *, eos: bool, echo: _Echo | None = None
    ) -> list[Any] | None:
        """:meth:`decide` without a task when the picker can decide at once (an in-process picker without
        flow control: :class:`~inferoute.picking.ImmediatePicker`); None: await :meth:`decide`."""
        immediate = self._immediate
        if immediate is None or not immediate.decides_now:
            return None
        start = self._clock()
        try:
            got = immediate.pick_now(self._pick_request(ex, body or b""))
        except Exception as exc:
            got = self._pick_failed(ex, exc)
        if got is None:
            return None
        ex.decided = True
        return self._replies(ex, got, start, body, phase, eos, echo or _echo_messages)

    def _pick_failed(self, ex: _Exchange, exc: Exception) -> tuple[Decision, PickSession]:
        """A picker's InferouteError is answered (ImmediateResponse); any other failure ends the stream with
        a gRPC error, so the proxy applies its failure mode."""
        if isinstance(exc, InferouteError):
            return Reject(exc.status, exc.body(), cause=exc.cause), NullSession()
        cause = exc.cause if isinstance(exc, PickerError) else "picker-exception"
        self.metrics.errors.value(cause).inc()
        log.error("picker failed: %r", exc, exc_info=not isinstance(exc, PickerError))
        ex.decided = ex.ended = True
        code = h2s.UNAVAILABLE if isinstance(exc, PickerError) else h2s.INTERNAL
        raise GrpcAbort(code, f"picker failed: {exc}") from exc

    def _replies(
        self,
        ex: _Exchange,
        got: tuple[Decision, PickSession],
        start: float,
        body: bytes | None,
        phase: str,
        eos: bool,
        echo: _Echo,
    ) -> list[Any]:
        decision, session = got
        metrics = self.metrics
        metrics.decision_seconds.observe(self._clock() - start)
        ex.session = session
        if isinstance(decision, Reject):
            metrics.reject.inc()
            ex.end(False, "rejected")
            return [
                m.immediate_response(decision.status, decision.body, decision.headers, details=decision.cause)
            ]
        return self._destination_replies(ex, decision, body, phase, eos, echo)

    def _destination_replies(
        self, ex: _Exchange, decision: Destination, body: bytes | None, phase: str, eos: bool, echo: _Echo
    ) -> list[Any]:
        if not decision.endpoints:
            # A picker bug, not a client error: never send an empty destination.
            self.metrics.errors.value("empty-destination").inc()
            ex.end(False, "empty-destination")
            return [m.immediate_response(503, error_body(503, "the picker returned no endpoint"))]
        self.metrics.destination.inc()
        ex.destination = decision.endpoints
        restore = decision.restore_model
        if restore is not None and ex.full_duplex_response and ex.response_body_expected:
            ex.restorer = ModelRestorer(*restore)  # else the data plane restores (inferoute.model metadata)
        if phase == "request_body":  # BUFFERED / STREAMED: the decision rides on the body reply
            return [
                m.headers_response(
                    "request_body",
                    destination=decision.endpoints,
                    fallbacks=decision.fallbacks,
                    set_headers=decision.set_headers,
                    content_length=None if decision.body is None else len(decision.body),
                    replace_body=decision.body,
                    destination_header=self._header,
                    restore_model=restore,
                )
            ]
        if body is None:  # no body: the mutation alone (a body cannot be added to a bodyless request)
            return [
                m.headers_response(
                    "request_headers",
                    destination=decision.endpoints,
                    fallbacks=decision.fallbacks,
                    set_headers=decision.set_headers,
                    destination_header=self._header,
                    restore_model=restore,
                )
            ]
        out_body = body if decision.body is None else decision.body
        replies = [
            m.headers_response(
                "request_headers",
                destination=decision.endpoints,
                fallbacks=decision.fallbacks,
                set_headers=decision.set_headers,
                content_length=len(out_body),
                destination_header=self._header,
                restore_model=restore,
            )
        ]
        replies.extend(echo(out_body, "request_body", eos))
        return replies

    @staticmethod
    def response_started(ex: _Exchange, req: m.ProcessingRequest) -> None:
        ex.response_seen = True
        if ex.session is None or ex.ended:
            return
        headers = m.parse_headers(req.response_headers.headers)
        served = m.served_endpoint(req) or ""
        for failed in m.failed_endpoints(req):  # passive health: refused the data plane's connection
            report_endpoint_failed(ex.session, failed, "connect failed (reported by the data plane)")
        if served and m.code_details_of(req) is not None:  # behind Envoy (inferoute envoy-config)
            _envoy_passive_health(ex.session, ex.destination, req, served)
        ex.session.response_started(served, m.status_of(headers), headers)


def _envoy_passive_health(
    session: PickSession, listed: tuple[str, ...], req: m.ProcessingRequest, served: str
) -> None:
    """What Envoy's response phase tells about endpoints it could not use. Its own 503 for a connection it
    could not open names that endpoint (``upstream.address``). A model server's answer (``via_upstream``)
    from another endpoint than the first of the destination means Envoy's retries (``override_host``, with
    ``--endpoints``) skipped the ones before it (or all, when ``served`` is not among them): refused, or a
    retriable 503 -- either way marked down only until the endpoint's next good scrape."""
    failure = m.connect_failure_of(req)
    if failure is not None:
        report_endpoint_failed(session, served, f"connect failed (Envoy: {failure})")
        return
    if not listed or listed[0] == served:
        return
    skipped = listed[: listed.index(served)] if served in listed else listed
    for endpoint in skipped:
        report_endpoint_failed(session, endpoint, f"skipped by Envoy's retries (served by {served})")


class _ProtocolError(Exception):
    pass
