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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from inferoute.errors import InferouteError, error_body
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


class ExtProcServicer(ext_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """``envoy.service.ext_proc.v3.ExternalProcessor`` over any :class:`~inferoute.picking.Picker`."""

    def __init__(
        self,
        picker: Picker,
        metrics: ExtProcMetrics,
        *,
        destination_header: str = DESTINATION_HEADER,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._picker = picker
        self._metrics = metrics
        self._header = destination_header
        self._clock = clock

    async def Process(
        self, request_iterator: AsyncIterator[m.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[m.ProcessingResponse]:
        metrics = self._metrics
        metrics.streams.inc()
        metrics.active.inc()
        ex: _Exchange | None = None
        chunks: list[bytes] = []
        try:
            async for req in request_iterator:
                phase = req.WhichOneof("request")
                if phase == "request_body":
                    if ex is None or ex.decided:
                        raise _ProtocolError("request body before headers or after the decision")
                    chunks.append(req.request_body.body)
                    if not req.request_body.end_of_stream:
                        if not ex.full_duplex_request:
                            yield _ACK_REQUEST_BODY  # STREAMED: acknowledge each chunk
                        continue
                    body = b"".join(chunks)
                    chunks.clear()
                    if ex.full_duplex_request:
                        for resp in await self._decide(ex, body, context, "request_headers", eos=True):
                            yield resp
                    else:
                        for resp in await self._decide(ex, body, context, "request_body", eos=True):
                            yield resp
                elif phase == "request_headers":
                    if ex is not None:
                        raise _ProtocolError("a second request_headers message on one stream")
                    ex = self._start(req)
                    if req.request_headers.end_of_stream:
                        for resp in await self._decide(ex, None, context, "request_headers", eos=True):
                            yield resp
                    elif not ex.full_duplex_request:
                        yield _ACK_REQUEST_HEADERS
                elif phase == "response_body":
                    rb = req.response_body
                    if rb.body and ex is not None and ex.session is not None and not ex.ended:
                        ex.session.response_chunk(rb.body)
                    if rb.end_of_stream and ex is not None:
                        # Before the last reply: Envoy may reset the stream as soon as it has it, and the
                        # generator is then closed at that yield.
                        ex.end(True)
                    if ex is not None and ex.full_duplex_response:
                        for resp in m.body_chunks(rb.body, "response_body", end_of_stream=rb.end_of_stream):
                            yield resp
                    else:
                        yield _ACK_RESPONSE_BODY
                elif phase == "response_headers":
                    if ex is not None:
                        self._response_started(ex, req)
                        if req.response_headers.end_of_stream:
                            ex.end(True)
                    yield _ACK_RESPONSE_HEADERS
                elif phase == "request_trailers":
                    if ex is not None and not ex.decided:
                        body = b"".join(chunks)
                        chunks.clear()
                        phase_out = "request_headers" if ex.full_duplex_request else "request_body"
                        for resp in await self._decide(ex, body, context, phase_out, eos=False):
                            yield resp
                    yield _ACK_REQUEST_TRAILERS
                elif phase == "response_trailers":
                    if ex is not None:
                        ex.end(True)
                    yield _ACK_RESPONSE_TRAILERS
                else:
                    raise _ProtocolError(f"unsupported ext_proc message {phase!r}")
            # The request iterator ends on a half-close AND when the proxy cancels the call (grpc.aio does
            # not tell them apart), so a response counts as finished only when no body was announced.
            if ex is not None:
                ex.stream_closed("stream-ended-early")
        except _ProtocolError as exc:
            metrics.errors.labels("protocol").inc()
            log.warning("ext_proc protocol error: %s", exc)
            if ex is not None:
                ex.end(False, "protocol-error")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except asyncio.CancelledError:
            if ex is not None:
                ex.stream_closed("stream-cancelled")
            raise
        finally:
            metrics.active.dec()
            if ex is not None and not ex.ended:  # closed by gRPC at a yield (the proxy reset the stream)
                ex.stream_closed("stream-closed")

    # ------------------------------------------------------------------------------------------------ helpers

    def _start(self, req: m.ProcessingRequest) -> _Exchange:
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
        clean = {k: v for k, v in h.items() if k[0] != ":" and k not in _STRIPPED}
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

    async def _decide(
        self,
        ex: _Exchange,
        body: bytes | None,
        context: grpc.aio.ServicerContext,
        phase: str,
        *,
        eos: bool,
    ) -> list[m.ProcessingResponse]:
        """Ask the picker and build the replies: headers (or body) mutation, then the body echo.

        ``body`` is None for a request without a body (decided on its headers).
        """
        ex.decided = True
        metrics = self._metrics
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
            code = grpc.StatusCode.UNAVAILABLE if isinstance(exc, PickerError) else grpc.StatusCode.INTERNAL
            await context.abort(code, f"picker failed: {exc}")
            raise AssertionError("unreachable") from exc  # context.abort raises
        metrics.decision_seconds.observe(self._clock() - start)
        ex.session = session
        if isinstance(decision, Reject):
            metrics.reject.inc()
            ex.end(False, "rejected")
            return [
                m.immediate_response(decision.status, decision.body, decision.headers, details=decision.cause)
            ]
        return self._destination_replies(ex, decision, body, phase, eos)

    def _destination_replies(
        self, ex: _Exchange, decision: Destination, body: bytes | None, phase: str, eos: bool
    ) -> list[m.ProcessingResponse]:
        if not decision.endpoints:
            # A picker bug, not a client error: never send an empty destination.
            self._metrics.errors.labels("empty-destination").inc()
            ex.end(False, "empty-destination")
            return [m.immediate_response(503, error_body(503, "the picker returned no endpoint"))]
        self._metrics.destination.inc()
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
        replies.extend(m.body_chunks(out_body, "request_body", end_of_stream=eos))
        return replies

    @staticmethod
    def _response_started(ex: _Exchange, req: m.ProcessingRequest) -> None:
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
        self._interval = watch_interval

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

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        return health_pb2.HealthCheckResponse(status=self.status(request.service))

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last = -1
        while True:
            now = self.status(request.service)
            if now != last:
                last = now
                yield health_pb2.HealthCheckResponse(status=now)
            await asyncio.sleep(self._interval)


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
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    destination_header: str = DESTINATION_HEADER


def _grpc_options(max_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.so_reuseport", 0),  # never share a port silently with another process
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
        ("grpc.http2.max_ping_strikes", 0),
    ]


class EppServer:
    """The running gRPC servers (ext_proc + health on one port, health alone on another)."""

    def __init__(
        self, servers: list[grpc.aio.Server], grpc_port: int, health_port: int | None, metrics: ExtProcMetrics
    ) -> None:
        self._servers = servers
        self.grpc_port = grpc_port
        self.health_port = health_port
        self.metrics = metrics

    @classmethod
    async def start(cls, picker: Picker, opts: ServerOptions, registry: CollectorRegistry) -> EppServer:
        """Bind and start; raises InferouteError(500, cause="bind") when a port is taken."""
        metrics = ExtProcMetrics(registry)
        health = HealthServicer(picker_readiness(picker))
        main = grpc.aio.server(options=_grpc_options(opts.max_message_bytes))
        ext_grpc.add_ExternalProcessorServicer_to_server(
            ExtProcServicer(picker, metrics, destination_header=opts.destination_header), main
        )
        health_pb2_grpc.add_HealthServicer_to_server(health, main)
        servers = [main]
        addr = f"{opts.host}:{opts.grpc_port}"
        try:
            if opts.insecure:
                port = main.add_insecure_port(addr)
            else:
                from inferoute.epp.tls import server_credentials

                port = main.add_secure_port(addr, server_credentials(opts.cert_path))
            health_port: int | None = None
            if opts.health_port is not None:
                hs = grpc.aio.server(options=_grpc_options(4 * 1024 * 1024))
                health_pb2_grpc.add_HealthServicer_to_server(health, hs)
                health_port = hs.add_insecure_port(f"{opts.host}:{opts.health_port}")
                servers.append(hs)
        except RuntimeError as exc:
            raise InferouteError(500, f"cannot listen on {opts.host}: {exc}", cause="bind") from exc
        for s in servers:
            await s.start()
        log.info(
            "ext_proc listening on %s:%d (%s), health on %s",
            opts.host,
            port,
            "plaintext" if opts.insecure else "TLS",
            health_port,
        )
        return cls(servers, port, health_port, metrics)

    async def aclose(self, grace: float = 1.0) -> None:
        """Stop accepting, let open streams finish for ``grace`` seconds, then cancel them."""
        for s in self._servers:
            with contextlib.suppress(Exception):
                await s.stop(grace)

    async def wait(self) -> None:
        await self._servers[0].wait_for_termination()
