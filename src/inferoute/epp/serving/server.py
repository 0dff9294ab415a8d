"""The picker's ext_proc gRPC server: one ext_proc stream per HTTP request, adapted onto any Picker.

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
  body chunks are echoed in full duplex and acknowledged otherwise. The session ends on the response's
  end of stream, on the stream's end (finished if a response was seen) or on cancellation (aborted).

Health (``grpc.health.v1``) is served on the health port and the ext_proc port: ``liveness`` is always
SERVING; ``readiness``, ``envoy.service.ext_proc.v3.ExternalProcessor`` and ``""`` follow
``picker.ready()`` when the picker has one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from inferoute.epp.serving import h2server as h2s
from inferoute.epp.serving.h2server import GrpcAbort
from inferoute.errors import ConfigError, InferouteError, describe_os_error, error_body
from inferoute.extproc import messages as m
from inferoute.picking import (
    DESTINATION_HEADER,
    DESTINATION_SERVED_KEY,
    Destination,
    NullSession,
    Picker,
    PickerError,
    PickRequest,
    PickSession,
    Reject,
)

log = logging.getLogger(__name__)

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
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
_ACK_RESPONSE_BODY = m.body_response("response_body")
_ACK_RESPONSE_TRAILERS = m.trailers_response("response_trailers")
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class ExtProcMetrics:
    """Counters of the ext_proc server, registered on the registry passed in (never the default one)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.streams = Counter(
            "inferoute_extproc_streams_total", "ext_proc streams opened.", registry=registry
        )
        self.active = Gauge(
            "inferoute_extproc_active_streams", "ext_proc streams open now.", registry=registry
        )
        decisions = Counter(
            "inferoute_extproc_decisions_total",
            "Picker decisions sent back, by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.destination = decisions.labels("destination")
        self.reject = decisions.labels("reject")
        self.errors = Counter(
            "inferoute_extproc_errors_total", "ext_proc failures, by cause.", ["cause"], registry=registry
        )
        self.decision_seconds = Histogram(
            "inferoute_extproc_decision_duration_seconds",
            "Time from the end of the request (headers or body) to the picker's decision.",
            buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=registry,
        )


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

    __slots__ = ("_chunk_bytes", "_chunks", "_core", "_echo", "_ex", "_pending", "_tail")

    def __init__(self, core: ExtProcServicer, *, encoded: bool = False) -> None:
        self._core = core
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
            self._core.metrics.errors.labels("protocol").inc()
            log.warning("ext_proc protocol error: %s", exc)
            if self._ex is not None:
                self._ex.end(False, "protocol-error")
            raise GrpcAbort(h2s.INVALID_ARGUMENT, str(exc)) from exc

    def _feed(self, req: m.ProcessingRequest) -> Sequence[m.ProcessingResponse] | None:
        phase = req.WhichOneof("request")
        ex = self._ex
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
            self._pending = (body, "request_headers" if ex.full_duplex_request else "request_body", True)
            return None
        if phase == "request_headers":
            if ex is not None:
                raise _ProtocolError("a second request_headers message on one stream")
            ex = self._ex = self._core.start(req)
            if req.request_headers.end_of_stream:
                self._pending = (None, "request_headers", True)
                return None
            return () if ex.full_duplex_request else (_ACK_REQUEST_HEADERS,)
        if phase == "response_body":
            rb = req.response_body
            if rb.body and ex is not None and ex.session is not None and not ex.ended:
                ex.session.response_chunk(rb.body)
            if rb.end_of_stream and ex is not None:
                # Before the last reply: Envoy may reset the stream as soon as it has it.
                ex.end(True)
            if ex is not None and ex.full_duplex_response:
                return self._echo(rb.body, "response_body", rb.end_of_stream)
            return (_ACK_RESPONSE_BODY,)
        if phase == "response_headers":
            if ex is not None:
                self._core.response_started(ex, req)
                if req.response_headers.end_of_stream:
                    ex.end(True)
            return (_ACK_RESPONSE_HEADERS,)
        if phase == "request_trailers":
            if ex is not None and not ex.decided:
                body = b"".join(self._chunks)
                self._chunks.clear()
                self._pending = (body, "request_headers" if ex.full_duplex_request else "request_body", False)
                self._tail = (_ACK_REQUEST_TRAILERS,)
                return None
            return (_ACK_REQUEST_TRAILERS,)
        if phase == "response_trailers":
            if ex is not None:
                ex.end(True)
            return (_ACK_RESPONSE_TRAILERS,)
        raise _ProtocolError(f"unsupported ext_proc message {phase!r}")

    async def resume(self) -> Sequence[m.ProcessingResponse]:
        assert self._ex is not None and self._pending is not None
        body, phase, eos = self._pending
        self._pending = None
        replies = await self._core.decide(self._ex, body, phase, eos=eos, echo=self._echo)
        if self._tail:
            replies = [*replies, *self._tail]
            self._tail = ()
        return replies

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

    def open(self, _writer: object = None) -> ExtProcStream:
        """A new stream's state (grpc.aio)."""
        return ExtProcStream(self)

    def open_encoded(self, _writer: object = None) -> ExtProcStream:
        """A new stream's state for the h2 server (its body echoes are not copied into messages)."""
        return ExtProcStream(self, encoded=True)

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
        metrics = self.metrics
        start = self._clock()
        try:
            decision, session = await self._picker.pick(self._pick_request(ex, body or b""))
        except InferouteError as exc:
            decision, session = Reject(exc.status, exc.body(), cause=exc.cause), NullSession()
        except Exception as exc:
            cause = exc.cause if isinstance(exc, PickerError) else "picker-exception"
            metrics.errors.labels(cause).inc()
            log.error("picker failed: %r", exc, exc_info=not isinstance(exc, PickerError))
            ex.ended = True
            code = h2s.UNAVAILABLE if isinstance(exc, PickerError) else h2s.INTERNAL
            raise GrpcAbort(code, f"picker failed: {exc}") from exc
        metrics.decision_seconds.observe(self._clock() - start)
        ex.session = session
        if isinstance(decision, Reject):
            metrics.reject.inc()
            ex.end(False, "rejected")
            return [
                m.immediate_response(decision.status, decision.body, decision.headers, details=decision.cause)
            ]
        return self._destination_replies(ex, decision, body, phase, eos, echo or _echo_messages)

    def _destination_replies(
        self, ex: _Exchange, decision: Destination, body: bytes | None, phase: str, eos: bool, echo: _Echo
    ) -> list[Any]:
        if not decision.endpoints:
            # A picker bug, not a client error: never send an empty destination.
            self.metrics.errors.labels("empty-destination").inc()
            ex.end(False, "empty-destination")
            return [m.immediate_response(503, error_body(503, "the picker returned no endpoint"))]
        self.metrics.destination.inc()
        if phase == "request_body":  # BUFFERED / STREAMED: the decision rides on the body reply
            return [
                m.headers_response(
                    "request_body",
                    destination=decision.endpoints,
                    set_headers=decision.set_headers,
                    content_length=None if decision.body is None else len(decision.body),
                    replace_body=decision.body,
                    destination_header=self._header,
                )
            ]
        if body is None:  # no body: the mutation alone (a body cannot be added to a bodyless request)
            return [
                m.headers_response(
                    "request_headers",
                    destination=decision.endpoints,
                    set_headers=decision.set_headers,
                    destination_header=self._header,
                )
            ]
        out_body = body if decision.body is None else decision.body
        replies = [
            m.headers_response(
                "request_headers",
                destination=decision.endpoints,
                set_headers=decision.set_headers,
                content_length=len(out_body),
                destination_header=self._header,
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
        ex.session.response_started(served, m.status_of(headers), headers)


class _ProtocolError(Exception):
    pass


class HealthServicer(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """gRPC health: ``liveness`` always SERVING; readiness names follow ``ready()``; others unknown."""

    READINESS = frozenset({"", "readiness", EXT_PROC_SERVICE})

    def __init__(self, ready: Callable[[], bool], *, watch_interval: float = 1.0) -> None:
        self._ready = ready
        self.interval = watch_interval

    def status(self, service: str) -> int:
        if service == "liveness":
            return int(_SERVING)
        if service in self.READINESS:
            try:
                return int(_SERVING if self._ready() else _NOT_SERVING)
            except Exception:
                log.exception("readiness check failed")
                return int(_NOT_SERVING)
        return int(_UNKNOWN)

    def check(self, service: str) -> health_pb2.HealthCheckResponse:
        """``Check``: the status, or NOT_FOUND for an unknown service (the gRPC health protocol; ``Watch``
        answers SERVICE_UNKNOWN instead and keeps watching)."""
        status = self.status(service)
        if status == _UNKNOWN:
            raise GrpcAbort(h2s.NOT_FOUND, "unknown service")
        return health_pb2.HealthCheckResponse(status=status)

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        try:
            return self.check(request.service)
        except GrpcAbort as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, exc.details)
            raise

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        async for reply in self.changes(request.service):
            yield reply

    async def changes(self, service: str) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """The status now, then each change (polled every ``interval``): ``Watch`` on either transport."""
        last = -1
        while True:
            now = self.status(service)
            if now != last:
                last = now
                yield health_pb2.HealthCheckResponse(status=now)
            await asyncio.sleep(self.interval)


def picker_readiness(picker: Picker) -> Callable[[], bool]:
    """``picker.ready`` when the picker has one (the EmbeddedPicker does), else always ready."""
    ready = getattr(picker, "ready", None)
    if callable(ready):
        return lambda: bool(ready())
    return lambda: True


@dataclass(frozen=True, slots=True)
class ServerOptions:
    """Where and how ``inferoute epp`` listens."""

    host: str = "0.0.0.0"
    grpc_port: int = 9002
    health_port: int | None = 9003
    """Plain-text gRPC health port (None: health only on the ext_proc port). 0 picks a free port."""
    insecure: bool = False
    cert_path: str | None = None
    """Directory with tls.crt / tls.key (reloaded on change); None with TLS: a generated self-signed pair."""
    client_ca: str | None = None
    """PEM bundle: require and verify client certificates signed by it (mTLS). Reloaded on change."""
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    destination_header: str = DESTINATION_HEADER
    transport: str = "h2"
    """``h2``: inferoute's own gRPC-over-HTTP/2 server (epp/serving/h2server.py, the fast one); ``grpcio``:
    ``grpc.aio``."""
    h2_limits: h2s.Limits = field(default_factory=h2s.Limits)
    """The ``h2`` transport's limits (docs/security.md)."""


TRANSPORTS = ("h2", "grpcio")


def _grpc_options(max_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.so_reuseport", 0),  # never share a port silently with another process
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
        ("grpc.http2.max_ping_strikes", 0),
    ]


def _h2_methods(servicer: ExtProcServicer | None, health: HealthServicer) -> dict[str, h2s.Method]:
    async def watch(req: health_pb2.HealthCheckRequest, writer: h2s.StreamWriter) -> None:
        async for reply in health.changes(req.service):
            writer.send((reply,))

    methods = {
        "/grpc.health.v1.Health/Check": h2s.unary(
            health_pb2.HealthCheckRequest,
            lambda req: health.check(req.service),
        ),
        "/grpc.health.v1.Health/Watch": h2s.server_streaming(health_pb2.HealthCheckRequest, watch),
    }
    if servicer is not None:
        methods[f"/{EXT_PROC_SERVICE}/Process"] = h2s.Method(m.ProcessingRequest, servicer.open_encoded)
    return methods


class EppServer:
    """The running gRPC servers (ext_proc + health on one port, health alone on another)."""

    def __init__(
        self,
        servers: list[grpc.aio.Server | h2s.GrpcServer],
        grpc_port: int,
        health_port: int | None,
        metrics: ExtProcMetrics,
    ) -> None:
        self._servers = servers
        self.grpc_port = grpc_port
        self.health_port = health_port
        self.transport = "h2" if isinstance(servers[0], h2s.GrpcServer) else "grpcio"
        self.metrics = metrics

    @classmethod
    async def start(cls, picker: Picker, opts: ServerOptions, registry: CollectorRegistry) -> EppServer:
        """Bind and start; raises InferouteError(500, cause="bind") when a port is taken."""
        if opts.transport not in TRANSPORTS:
            raise ConfigError(f"transport {opts.transport!r}: choose one of {', '.join(TRANSPORTS)}")
        metrics = ExtProcMetrics(registry)
        health = HealthServicer(picker_readiness(picker))
        servicer = ExtProcServicer(picker, metrics, destination_header=opts.destination_header)
        if opts.transport == "h2":
            return await cls._start_h2(servicer, health, opts, metrics)
        if opts.client_ca is not None:
            raise ConfigError("client certificates (mTLS) need the h2 transport")
        main = grpc.aio.server(options=_grpc_options(opts.max_message_bytes))
        ext_grpc.add_ExternalProcessorServicer_to_server(servicer, main)
        health_pb2_grpc.add_HealthServicer_to_server(health, main)
        servers: list[grpc.aio.Server | h2s.GrpcServer] = [main]
        addr = f"{opts.host}:{opts.grpc_port}"
        try:
            if opts.insecure:
                port = main.add_insecure_port(addr)
            else:
                from inferoute.epp.serving.tls import server_credentials

                port = main.add_secure_port(addr, server_credentials(opts.cert_path))
            health_port: int | None = None
            if opts.health_port is not None:
                hs = grpc.aio.server(options=_grpc_options(4 * 1024 * 1024))
                health_pb2_grpc.add_HealthServicer_to_server(health, hs)
                health_port = hs.add_insecure_port(f"{opts.host}:{opts.health_port}")
                servers.append(hs)
        except RuntimeError as exc:  # grpc.aio says only "Failed to bind"
            ports = f"{opts.grpc_port} (ext_proc) or {opts.health_port} (health)"
            raise InferouteError(
                500, f"cannot listen on {opts.host} port {ports}: in use or not available", cause="bind"
            ) from exc
        for s in servers:
            await s.start()  # type: ignore[call-arg]
        cls._log_listening(opts, port, health_port)
        return cls(servers, port, health_port, metrics)

    @classmethod
    async def _start_h2(
        cls, servicer: ExtProcServicer, health: HealthServicer, opts: ServerOptions, metrics: ExtProcMetrics
    ) -> EppServer:
        ctx = None
        if not opts.insecure:
            from inferoute.epp.serving.tls import server_ssl_context

            ctx = server_ssl_context(opts.cert_path, opts.client_ca)
        main = h2s.GrpcServer(
            _h2_methods(servicer, health), max_message_bytes=opts.max_message_bytes, limits=opts.h2_limits
        )
        servers: list[grpc.aio.Server | h2s.GrpcServer] = [main]
        where = f"{opts.host}:{opts.grpc_port} (ext_proc)"
        try:
            port = await main.start(opts.host, opts.grpc_port, ctx)
            health_port: int | None = None
            if opts.health_port is not None:
                where = f"{opts.host}:{opts.health_port} (health)"
                hs = h2s.GrpcServer(_h2_methods(None, health), limits=opts.h2_limits)
                health_port = await hs.start(opts.host, opts.health_port)
                servers.append(hs)
        except OSError as exc:
            for s in servers:
                await s.stop(0)
            msg = f"cannot listen on {where}: {describe_os_error(exc)}"
            raise InferouteError(500, msg, cause="bind") from exc
        cls._log_listening(opts, port, health_port)
        return cls(servers, port, health_port, metrics)

    @staticmethod
    def _log_listening(opts: ServerOptions, port: int, health_port: int | None) -> None:
        log.info(
            "ext_proc listening on %s:%d (%s, %s%s), health on %s",
            opts.host,
            port,
            opts.transport,
            "plaintext" if opts.insecure else "TLS",
            ", client certificates required" if opts.client_ca else "",
            health_port,
        )

    async def aclose(self, grace: float = 1.0) -> None:
        """Stop accepting, let open streams finish for ``grace`` seconds, then cancel them."""
        for s in self._servers:
            with contextlib.suppress(Exception):
                await s.stop(grace)

    async def wait(self) -> None:
        main = self._servers[0]
        if isinstance(main, h2s.GrpcServer):
            await main.wait()
        else:
            await main.wait_for_termination()
