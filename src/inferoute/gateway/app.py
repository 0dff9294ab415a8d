"""The gateway's HTTP server: one handler, limits, errors, access log, health and metrics.

:func:`start_gateway` assembles one process: metrics on an injected registry, the route deciders (and
their pickers), the upstream :class:`~inferoute.gateway.proxy.Forwarder`, and an aiohttp low-level server (no
router or middleware on the hot path) listening on a socket it binds itself (``SO_REUSEPORT`` when several
workers share the port). :class:`GatewayHandler` handles one request:

1. ``/healthz`` (alive), ``/readyz`` (the embedded picker is ready), ``metrics_path`` (Prometheus text).
2. Limits: concurrent requests (503 ``overloaded``), header count/bytes (431), route match (404 ``no-route``),
   body size from ``Content-Length`` up front and while reading chunked uploads (413). The body is read whole
   when BBR or a full-duplex picker needs it, else passed through as it arrives.
3. :meth:`RouteDecider.decide` (BBR + picker), then :meth:`Forwarder.open` (fallback walking), then the
   response is streamed to the client and reported to the picker session; a small answer of known length
   (:func:`buffered_answer`) is read whole and sent in one write instead.
4. Whatever happens: one access-log line, the request/latency/TTFB metrics, and for every error an
   OpenAI-style JSON body and ``errors_total{cause}``. A client that goes away cancels the handler (aiohttp
   ``handler_cancellation``): the upstream request is closed and the picker session ``aborted``.

Every request pays for this path, so it is kept lean and measured (docs/benchmarks/gateway.md): metric series
bound once per route, no lock per metric update, header rules in one pass, one write for small answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from inferoute.clock import Clock, SystemClock
from inferoute.errors import InferouteError, error_body
from inferoute.gateway.bbr import BodyLimit, check_declared_length
from inferoute.gateway.config import GatewayConfig, parse_listen
from inferoute.gateway.metrics import GatewayMetrics
from inferoute.gateway.picker_setup import Deciders, EmbeddedFactory, start_embedded_picker
from inferoute.gateway.proxy import (
    Forwarder,
    StreamedBody,
    client_response_headers,
    lower_headers,
    upstream_request_headers,
)
from inferoute.gateway.routing import Decided, PickerRejected
from inferoute.picking import NullSession, PickSession

log = logging.getLogger(__name__)
access_log = logging.getLogger("inferoute.gateway.access")

_JSON = "application/json"
_MAX_REQUEST_ID = 128


@dataclass(slots=True)
class _Record:
    """What the access log line and the metrics need about one request."""

    method: str
    path: str
    request_id: str
    start: float
    route: str = "-"
    model: str | None = None
    upstream: str | None = None
    status: int = 0
    ttfb: float | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    cause: str | None = None
    attempts: int = 0
    source: str = "-"
    extra_causes: list[str] = field(default_factory=list)


def _request_id(value: str | None) -> str:
    """The client's ``X-Request-Id`` when it is short printable ASCII, else 32 random hex digits."""
    if value and len(value) <= _MAX_REQUEST_ID and value.isprintable() and value.isascii():
        return value
    return os.urandom(16).hex()  # as unique as a uuid4, a quarter of its cost


BUFFERED_ANSWER_MAX = 64 * 1024
"""Answers up to this size with a known ``Content-Length`` are read whole and sent in one write."""


def buffered_answer(method: str, status: int, length: int | None, content_type: str | None) -> bool:
    """True when an upstream answer can be relayed as one plain response: a known length of at most
    :data:`BUFFERED_ANSWER_MAX` bytes, a body to send (not HEAD, 1xx, 204 or 304) and not an event stream.
    Anything else is streamed chunk by chunk."""
    if length is None or length > BUFFERED_ANSWER_MAX or method == "HEAD":
        return False
    if status < 200 or status in (204, 304):
        return False
    return not (content_type and content_type.lstrip().lower().startswith("text/event-stream"))


def error_response(exc: InferouteError, request_id: str) -> web.Response:
    """The OpenAI-style JSON error answer for ``exc``."""
    headers: CIMultiDict[str] = CIMultiDict({"X-Request-Id": request_id})
    if isinstance(exc, PickerRejected):
        headers.update({k: v for k, v in exc.headers.items() if k.lower() not in ("content-length",)})
    if exc.status in (429, 503) and "Retry-After" not in headers:
        headers["Retry-After"] = "1"
    headers.setdefault("Content-Type", _JSON)
    return web.Response(status=exc.status, body=exc.body(), headers=headers)


class _SessionEnd:
    """Ends a picker session exactly once."""

    __slots__ = ("done", "session")

    def __init__(self, session: PickSession) -> None:
        self.session = session
        self.done = False

    def finished(self) -> None:
        if not self.done:
            self.done = True
            self.session.response_finished()

    def aborted(self, reason: str) -> None:
        if not self.done:
            self.done = True
            self.session.aborted(reason)


class _LimitedStream:
    """The client's body as it arrives, counted against the route's limit (413 once it is passed)."""

    __slots__ = ("_limit", "_metrics", "_rec", "_request", "declared", "too_large")

    def __init__(
        self,
        request: web.BaseRequest,
        limit: int,
        declared: int | None,
        rec: _Record,
        metrics: GatewayMetrics,
    ) -> None:
        self._request = request
        self._limit = limit
        self.declared = declared
        self._rec = rec
        self._metrics = metrics
        self.too_large: InferouteError | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        counter = BodyLimit(self._limit)
        async for chunk in self._request.content.iter_any():
            try:
                counter.feed(len(chunk))
            except InferouteError as exc:
                self.too_large = exc  # remembered: the upload to the upstream fails, the client gets 413
                raise
            self._rec.bytes_in += len(chunk)
            self._metrics.totals.bytes_in += len(chunk)
            yield chunk


class GatewayHandler:
    """The request handler of one process (see module docstring)."""

    def __init__(
        self,
        cfg: GatewayConfig,
        deciders: Deciders,
        forwarder: Forwarder,
        metrics: GatewayMetrics,
        registry: CollectorRegistry,
        clock: Clock | None = None,
    ) -> None:
        self.cfg = cfg
        self.deciders = deciders
        self.forwarder = forwarder
        self.metrics = metrics
        self.registry = registry
        self.clock = clock or SystemClock()
        self._totals = metrics.totals
        self._limits = cfg.limits

    @property
    def in_flight(self) -> int:
        """Requests being handled by this process."""
        return self._totals.in_flight

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        if path == "/healthz":
            return web.Response(body=b'{"status":"ok"}', content_type=_JSON)
        if path == "/readyz":
            return await self._readyz()
        if path == self.cfg.metrics_path:
            return web.Response(
                body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
            )
        rec = _Record(
            request.method, path, _request_id(request.headers.get("x-request-id")), self.clock.now()
        )
        totals = self._totals
        totals.in_flight += 1
        try:
            return await self._handle(request, rec)
        except asyncio.CancelledError:
            rec.status = 499  # NGINX's code for "the client closed the connection"
            rec.cause = "client-disconnect"
            raise
        finally:
            totals.in_flight -= 1
            self._finish(rec)

    async def _readyz(self) -> web.Response:
        if await self.deciders.ready():
            return web.Response(body=b'{"status":"ready"}', content_type=_JSON)
        exc = InferouteError(503, "the endpoint picker is not ready yet", cause="not-ready")
        return web.Response(status=503, body=exc.body(), content_type=_JSON)

    async def _handle(self, request: web.BaseRequest, rec: _Record) -> web.StreamResponse:
        try:
            return await self._route(request, rec)
        except InferouteError as exc:
            return self._error(exc, rec)
        except Exception as exc:
            if rec.ttfb is not None:  # the answer has started: only closing the connection is left
                rec.cause = rec.cause or "internal"
                raise
            log.exception("%s %s: unexpected error [request_id=%s]", rec.method, rec.path, rec.request_id)
            return self._error(
                InferouteError(500, f"internal gateway error ({type(exc).__name__})", cause="internal"), rec
            )

    def _error(self, exc: InferouteError, rec: _Record) -> web.Response:
        rec.status = exc.status
        rec.cause = exc.cause
        if exc.status >= 500 or exc.status in (413, 431):
            log.warning(
                "%s %s -> %d %s: %s [request_id=%s]",
                rec.method,
                rec.path,
                exc.status,
                exc.cause,
                exc.message,
                rec.request_id,
            )
        resp = error_response(exc, rec.request_id)
        rec.bytes_out = len(resp.body) if isinstance(resp.body, bytes) else 0
        return resp

    async def _route(self, request: web.BaseRequest, rec: _Record) -> web.StreamResponse:
        lim = self._limits
        if self._totals.in_flight > lim.max_concurrent_requests:
            raise InferouteError(
                503, f"too many concurrent requests (limit {lim.max_concurrent_requests})", cause="overloaded"
            )
        raw = request.raw_headers
        if len(raw) > lim.max_headers:
            raise InferouteError(
                431, f"too many request headers ({len(raw)} > {lim.max_headers})", cause="headers-too-large"
            )
        size = sum(len(k) + len(v) + 4 for k, v in raw)
        if size > lim.max_header_bytes:
            raise InferouteError(
                431,
                f"request headers too large ({size} > {lim.max_header_bytes} bytes)",
                cause="headers-too-large",
            )
        decider = self.deciders.for_path(rec.path)
        if decider is None:
            raise InferouteError(404, f"no route for {rec.path}", cause="no-route")
        route = decider.route
        rec.route = route.path
        epp = route.epp
        if not route.bbr.enabled and not (epp.enabled and epp.body == "full_duplex") and request.body_exists:
            # nothing needs the body before the upstream does: pass it through as it arrives
            streamed = await self._stream_body(request, route.bbr.max_body_size, rec)
            decided = await decider.decide(
                request.method, request.raw_path, request.headers.items(), b"", rec.request_id
            )
            self._note_decision(decided, rec)
            return await self._forward(request, decided, rec, streamed)
        body = await self._read_body(request, route.bbr.max_body_size)
        rec.bytes_in = len(body)
        self._totals.bytes_in += len(body)
        # the picker sees the path as sent (with its query string), like Envoy's :path
        decided = await decider.decide(
            request.method, request.raw_path, request.headers.items(), body, rec.request_id
        )
        self._note_decision(decided, rec)
        return await self._forward(request, decided, rec)

    async def _stream_body(self, request: web.BaseRequest, limit: int, rec: _Record) -> _LimitedStream:
        declared = check_declared_length(request.headers, limit)
        await self._continue(request)
        return _LimitedStream(request, limit, declared, rec, self.metrics)

    @staticmethod
    async def _continue(request: web.BaseRequest) -> None:
        """Answer ``Expect: 100-continue`` (the size was accepted): curl would otherwise wait a second."""
        expect = request.headers.get("expect", "")
        if expect.lower() == "100-continue" and request.version >= aiohttp.HttpVersion11:
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    async def _read_body(self, request: web.BaseRequest, limit: int) -> bytes:
        declared = check_declared_length(request.headers, limit)
        await self._continue(request)
        if declared is not None:
            if declared == 0:
                return b""
            try:
                return await request.content.readexactly(declared)
            except asyncio.IncompleteReadError as exc:
                raise InferouteError(
                    400, "request body shorter than its Content-Length", cause="bad-request"
                ) from exc
        if not request.body_exists:
            return b""
        counter = BodyLimit(limit)
        chunks: list[bytes] = []
        async for chunk in request.content.iter_any():
            counter.feed(len(chunk))
            chunks.append(chunk)
        return b"".join(chunks)

    def _note_decision(self, d: Decided, rec: _Record) -> None:
        rec.model = d.model
        rec.source = d.source
        series = self.metrics.for_route(rec.route)
        if d.route.bbr.enabled:
            series.bbr.observe(d.bbr_seconds)
        if d.route.epp.enabled:
            series.picker.observe(d.picker_seconds)
        if d.picker_error:
            rec.extra_causes.append(d.picker_error)
            series.fail_open.inc()
        if d.bbr_error:
            rec.extra_causes.append(d.bbr_error)

    async def _forward(
        self, request: web.BaseRequest, d: Decided, rec: _Record, streamed: _LimitedStream | None = None
    ) -> web.StreamResponse:
        end = _SessionEnd(d.session)
        try:
            return await self._relay(request, d, rec, end, streamed)
        except InferouteError:
            if streamed is not None and streamed.too_large is not None:
                end.aborted("body-too-large")
                raise streamed.too_large from None
            end.aborted("upstream-error")
            raise
        except asyncio.CancelledError:
            end.aborted("client-disconnect")
            raise
        except BaseException:
            end.aborted("error")
            raise
        finally:
            end.aborted("incomplete")  # no-op when already ended

    async def _relay(
        self,
        request: web.BaseRequest,
        d: Decided,
        rec: _Record,
        end: _SessionEnd,
        streamed: _LimitedStream | None,
    ) -> web.StreamResponse:
        client_ip = request.remote
        peer_headers = d.upstream_headers  # bound method: headers naming the endpoint being tried

        def headers_for(up: str) -> CIMultiDict[str]:
            return upstream_request_headers(peer_headers(up), rec.request_id, client_ip)

        body: bytes | StreamedBody = d.body
        if streamed is not None:
            body = StreamedBody(streamed.chunks(), streamed.declared)
        try:
            opened = await self.forwarder.open(
                request.method, request.raw_path, d.upstreams, headers_for, body, route=rec.route
            )
        except (aiohttp.ClientError, OSError) as exc:
            if streamed is not None and streamed.too_large is not None:
                raise streamed.too_large from exc
            raise
        if streamed is not None and streamed.too_large is not None:
            opened.response.close()
            raise streamed.too_large
        up = opened.response
        rec.upstream = opened.served
        rec.attempts = opened.attempts
        rec.status = up.status
        try:
            hdrs = client_response_headers(up.headers, rec.request_id)
            if type(d.session) is not NullSession:  # no picker (static / fail-open): nothing to report
                d.session.response_started(opened.served, up.status, lower_headers(up.headers))
            if buffered_answer(request.method, up.status, up.content_length, up.headers.get("content-type")):
                return await self._answer_whole(request, up, hdrs, opened.served, d.session, rec, end)
            return await self._answer_streamed(request, up, hdrs, opened.served, d.session, rec, end)
        finally:
            if not up.closed:
                if end.done and rec.cause is None:
                    up.release()
                else:
                    up.close()

    async def _answer_whole(
        self,
        request: web.BaseRequest,
        up: aiohttp.ClientResponse,
        hdrs: CIMultiDict[str],
        served: str,
        session: PickSession,
        rec: _Record,
        end: _SessionEnd,
    ) -> web.StreamResponse:
        """A small answer of known length: read it whole, then send status, headers and body in one write
        (nothing reached the client yet, so an upstream that breaks off gets a clean 502)."""
        try:
            data = await up.content.read()
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
            _upstream_broke_off(rec, end, served, exc)
            raise InferouteError(
                502, f"upstream {served} broke off its response", cause="upstream-aborted"
            ) from exc
        if data:
            session.response_chunk(data)
        resp = web.Response(status=up.status, reason=up.reason, headers=hdrs, body=data)
        await resp.prepare(request)  # headers wait for the body: one write in write_eof
        rec.ttfb = self.clock.now() - rec.start
        try:
            await resp.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            _client_gone(rec, end)
            raise
        rec.bytes_out = len(data)
        end.finished()
        return resp

    async def _answer_streamed(
        self,
        request: web.BaseRequest,
        up: aiohttp.ClientResponse,
        hdrs: CIMultiDict[str],
        served: str,
        session: PickSession,
        rec: _Record,
        end: _SessionEnd,
    ) -> web.StreamResponse:
        """Headers now, then every chunk as it arrives (SSE events are not held back)."""
        resp = web.StreamResponse(status=up.status, reason=up.reason, headers=hdrs)
        if up.content_length is not None:
            resp.content_length = up.content_length
        await resp.prepare(request)
        rec.ttfb = self.clock.now() - rec.start
        out = 0
        try:
            async for chunk in up.content.iter_any():
                session.response_chunk(chunk)
                await resp.write(chunk)
                out += len(chunk)
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
            rec.bytes_out = out
            _upstream_broke_off(rec, end, served, exc)
            raise
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            rec.bytes_out = out
            _client_gone(rec, end)
            raise
        rec.bytes_out = out
        await resp.write_eof()
        end.finished()
        return resp

    def _finish(self, rec: _Record) -> None:
        now = self.clock.now()
        duration = now - rec.start
        m = self.metrics
        route = rec.route
        series = m.for_route(route)
        series.requests(rec.status).inc()
        series.duration.observe(duration)
        if rec.ttfb is not None:
            series.ttfb.observe(rec.ttfb)
        if rec.cause:
            m.error(rec.cause).inc()
        for c in rec.extra_causes:
            m.error(c).inc()
        self._totals.bytes_out += rec.bytes_out
        if self.cfg.access_log and access_log.isEnabledFor(logging.INFO):
            ttfb = f"{rec.ttfb * 1000:.2f}" if rec.ttfb is not None else "-"
            access_log.info(
                "method=%s path=%s status=%d route=%s model=%s upstream=%s ttfb_ms=%s duration_ms=%.2f "
                "bytes_in=%d bytes_out=%d attempts=%d source=%s cause=%s request_id=%s",
                rec.method,
                _q(rec.path),
                rec.status,
                route,
                _q(rec.model),
                rec.upstream or "-",
                ttfb,
                duration * 1000,
                rec.bytes_in,
                rec.bytes_out,
                rec.attempts,
                rec.source,
                ",".join(filter(None, [rec.cause, *rec.extra_causes])) or "-",
                rec.request_id,
            )


_SAFE_LOG_VALUE = re.compile(r"[A-Za-z0-9._~:/@+%=-]+\Z")


def _q(value: str | None) -> str:
    """A logfmt value: bare when harmless, else a JSON string (quotes, newlines and control characters
    escaped, so a client cannot forge log lines through its path or model)."""
    if value is None:
        return "-"
    if _SAFE_LOG_VALUE.match(value):
        return value
    return json.dumps(value)


def bind_socket(host: str, port: int, *, reuse_port: bool = False, backlog: int = 1024) -> socket.socket:
    """A listening TCP socket (IPv6 when ``host`` has a colon)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class RunningGateway:
    """A started gateway (one process); :meth:`aclose` stops it, draining connections up to ``grace`` s."""

    def __init__(
        self,
        server: asyncio.Server,
        web_server: web.Server,
        handler: GatewayHandler,
        forwarder: Forwarder,
        deciders: Deciders,
        registry: CollectorRegistry,
    ) -> None:
        self._server = server
        self._web_server = web_server
        self.handler = handler
        self._forwarder = forwarder
        self.deciders = deciders
        self.registry = registry
        sockname = server.sockets[0].getsockname()
        self.host: str = sockname[0]
        self.port: int = sockname[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def aclose(self, grace: float = 5.0) -> None:
        self._server.close()
        with contextlib.suppress(Exception):
            await self._web_server.shutdown(grace)
        with contextlib.suppress(Exception):
            await self._server.wait_closed()
        await self._forwarder.aclose()
        await self.deciders.aclose()


async def start_gateway(
    cfg: GatewayConfig,
    *,
    registry: CollectorRegistry | None = None,
    embedded_factory: EmbeddedFactory = start_embedded_picker,
    sock: socket.socket | None = None,
    reuse_port: bool = False,
    clock: Clock | None = None,
) -> RunningGateway:
    """Start one gateway process-part on ``cfg.listen`` (or the given listening ``sock``)."""
    registry = registry if registry is not None else CollectorRegistry()
    if not cfg.routes:
        log.warning("the configuration has no routes: every request will get 404")
    metrics = GatewayMetrics(registry)
    deciders = await Deciders.build(cfg, registry, embedded_factory=embedded_factory, clock=clock)
    forwarder = Forwarder(cfg, metrics)
    try:
        await forwarder.start()
        handler = GatewayHandler(cfg, deciders, forwarder, metrics, registry, clock)
        lim = cfg.limits
        web_server = web.Server(
            handler,
            handler_cancellation=True,
            access_log=None,
            max_line_size=lim.max_header_bytes + 1024,
            max_field_size=lim.max_header_bytes + 1024,
            max_headers=lim.max_headers * 2 + 32,
        )
        if sock is None:
            host, port = parse_listen(cfg.listen)
            sock = bind_socket(host, port, reuse_port=reuse_port)
        server = await asyncio.get_running_loop().create_server(web_server, sock=sock, backlog=1024)
    except BaseException:
        await forwarder.aclose()
        await deciders.aclose()
        raise
    return RunningGateway(server, web_server, handler, forwarder, deciders, registry)


__all__ = ["GatewayHandler", "RunningGateway", "bind_socket", "error_body", "error_response", "start_gateway"]


def _upstream_broke_off(rec: _Record, end: _SessionEnd, served: str, exc: BaseException) -> None:
    """The model server cut its answer short: cause, log line, picker session aborted."""
    rec.cause = "upstream-aborted"
    log.warning("upstream %s broke off the response: %r [request_id=%s]", served, exc, rec.request_id)
    end.aborted("upstream-aborted")


def _client_gone(rec: _Record, end: _SessionEnd) -> None:
    """The client disconnected while the answer was sent: 499 in the log, picker session aborted."""
    rec.cause = "client-disconnect"
    rec.status = 499
    end.aborted("client-disconnect")
