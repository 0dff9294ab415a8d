"""The gateway's HTTP server: one handler, limits, errors, access log, health and metrics.

:func:`start_gateway` assembles one process: metrics on an injected registry, the route route_table (and
their pickers), the upstream :class:`~inferoute.gateway.proxy.Forwarder`, and an aiohttp low-level server (no
router or middleware on the hot path) listening on a socket it binds itself (``SO_REUSEPORT`` when several
workers share the port). :class:`GatewayHandler` handles one request:

1. ``/healthz`` (alive), ``/readyz`` (the embedded picker is ready), ``metrics_path`` (Prometheus text).
2. Limits: concurrent requests (503 ``overloaded``), header count/bytes (431), route match (404 ``no-route``),
   body size from ``Content-Length`` up front and while reading chunked uploads (413). The body is read whole
   when BBR or a full-duplex picker needs it, else passed through as it arrives.
3. :meth:`RequestRouter.decide` (BBR + picker), then :meth:`Relay.forward
   <inferoute.gateway.relay.Relay.forward>`: the forwarding path the NGINX decider shares (fallback walk,
   header rules, the answer streamed to the client and reported to the picker session; a small answer of
   known length is read whole and sent in one write instead).
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
import re
import socket

from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from inferoute.clock import Clock, SystemClock
from inferoute.errors import InferouteError, error_body
from inferoute.gateway.config import GatewayConfig, parse_listen
from inferoute.gateway.metrics import GatewayMetrics
from inferoute.gateway.picker_setup import EmbeddedFactory, RouteTable, start_embedded_picker
from inferoute.gateway.proxy import Forwarder
from inferoute.gateway.relay import (
    LimitedStream,
    Relay,
    RequestRecord,
    body_timeout,
    cut_client,
    read_body,
    request_id_from,
)
from inferoute.gateway.reload import Reloader
from inferoute.gateway.routing import PickerRejected, RoutedRequest
from inferoute.gateway.target import request_target
from inferoute.httpguard import ConnectionLimits, GuardedServer

log = logging.getLogger(__name__)
access_log = logging.getLogger("inferoute.gateway.access")

_JSON = "application/json"


def error_response(exc: InferouteError, request_id: str) -> web.Response:
    """The OpenAI-style JSON error answer for ``exc``."""
    headers: CIMultiDict[str] = CIMultiDict({"X-Request-Id": request_id})
    if isinstance(exc, PickerRejected):
        headers.update({k: v for k, v in exc.headers.items() if k.lower() not in ("content-length",)})
    if exc.status in (429, 503) and "Retry-After" not in headers:
        headers["Retry-After"] = "1"
    headers.setdefault("Content-Type", _JSON)
    return web.Response(status=exc.status, body=exc.body(), headers=headers)


class GatewayHandler:
    """The request handler of one process (see module docstring)."""

    def __init__(
        self,
        cfg: GatewayConfig,
        route_table: RouteTable,
        forwarder: Forwarder,
        metrics: GatewayMetrics,
        registry: CollectorRegistry,
        clock: Clock | None = None,
    ) -> None:
        self.cfg = cfg
        self.route_table = route_table
        self.forwarder = forwarder
        self.metrics = metrics
        self.registry = registry
        self.clock = clock or SystemClock()
        self.relay = Relay(forwarder, self.clock)
        self._totals = metrics.totals
        self._limits = cfg.limits
        self.stopping = False
        """Set when the gateway stops: requests cancelled from then on were cut by the shutdown."""

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
        rec = RequestRecord(
            request.method, path, request_id_from(request.headers.get("x-request-id")), self.clock.now()
        )
        totals = self._totals
        route_table = self.route_table  # this request keeps its routes even if a reload swaps them meanwhile
        route_table.active += 1
        totals.in_flight += 1
        try:
            return await self._handle(request, rec, route_table)
        except asyncio.CancelledError:
            if self.stopping:  # cut by the end of the shutdown grace period, not by the client
                rec.cause = "shutdown"
            elif rec.cause != "evicted":  # flow control cut the answer off
                rec.status = 499  # NGINX's code for "the client closed the connection"
                rec.cause = "client-disconnect"
            raise
        finally:
            totals.in_flight -= 1
            route_table.active -= 1
            if route_table.retired and not route_table.active:
                route_table.drained.set()
            self._finish(rec)

    async def _readyz(self) -> web.Response:
        if await self.route_table.ready():
            return web.Response(body=b'{"status":"ready"}', content_type=_JSON)
        exc = InferouteError(503, "the endpoint picker is not ready yet", cause="not-ready")
        return web.Response(status=503, body=exc.body(), content_type=_JSON)

    async def _handle(
        self, request: web.BaseRequest, rec: RequestRecord, route_table: RouteTable
    ) -> web.StreamResponse:
        try:
            return await self._route(request, rec, route_table)
        except InferouteError as exc:
            return self._error(exc, rec)
        except Exception as exc:
            if rec.ttfb is not None:  # the answer has started: only closing the connection is left
                rec.cause = rec.cause or "internal"
                log.exception(
                    "%s %s: unexpected error after the answer started [request_id=%s]",
                    rec.method,
                    rec.path,
                    rec.request_id,
                )
                cut_client(request)
                return web.Response()  # never sent: the connection is closing (aiohttp logs nothing)
            log.exception("%s %s: unexpected error [request_id=%s]", rec.method, rec.path, rec.request_id)
            return self._error(
                InferouteError(500, f"internal gateway error ({type(exc).__name__})", cause="internal"), rec
            )

    def _error(self, exc: InferouteError, rec: RequestRecord) -> web.Response:
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

    async def _route(
        self, request: web.BaseRequest, rec: RequestRecord, route_table: RouteTable
    ) -> web.StreamResponse:
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
        target = rec.target = request_target(request.raw_path)  # normalised once: matched and forwarded
        rec.path = target.partition("?")[0]
        decider = route_table.for_path(rec.path)
        if decider is None:
            raise InferouteError(404, f"no route for {rec.path}", cause="no-route")
        route = decider.route
        rec.route = route.path
        epp = route.epp
        if not route.bbr.enabled and not (epp.enabled and epp.body == "full_duplex") and request.body_exists:
            # nothing needs the body before the upstream does: pass it through as it arrives
            streamed = await LimitedStream.accept(
                request, route.bbr.max_body_size, rec, self._totals, lim.body_read_timeout
            )
            routed = await decider.decide(
                request.method, target, request.headers.items(), b"", rec.request_id
            )
            self._note_decision(routed, rec)
            return await self.relay.forward(request, routed, rec, streamed)
        try:
            async with asyncio.timeout(lim.body_read_timeout):
                body = await read_body(request, route.bbr.max_body_size)
        except TimeoutError:
            raise body_timeout(lim.body_read_timeout) from None
        rec.bytes_in = len(body)
        self._totals.bytes_in += len(body)
        # the picker sees the path as forwarded (with its query string), like Envoy's :path
        routed = await decider.decide(request.method, target, request.headers.items(), body, rec.request_id)
        self._note_decision(routed, rec)
        return await self.relay.forward(request, routed, rec)

    def _note_decision(self, d: RoutedRequest, rec: RequestRecord) -> None:
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

    def _finish(self, rec: RequestRecord) -> None:
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


DRAIN_POLL = 0.02
"""Seconds between two looks at the requests in flight while a stopping gateway drains."""
CUT_TIMEOUT = 0.1
"""Seconds aiohttp gets to cancel the handlers left when the grace period ends (must be > 0: 0 means none)."""


class RunningGateway:
    """A started gateway (one process); :meth:`aclose` stops it, draining connections up to ``grace`` s."""

    def __init__(
        self,
        server: asyncio.Server,
        web_server: GuardedServer,
        handler: GatewayHandler,
        forwarder: Forwarder,
        route_table: RouteTable,
        registry: CollectorRegistry,
        embedded_factory: EmbeddedFactory = start_embedded_picker,
        clock: Clock | None = None,
    ) -> None:
        self._server = server
        self._web_server = web_server
        self.handler = handler
        self._forwarder = forwarder
        self.route_table = route_table
        self.registry = registry
        self._reloader = Reloader(registry, embedded_factory, clock)
        sockname = server.sockets[0].getsockname()
        self.host: str = sockname[0]
        self.port: int = sockname[1]

    @property
    def open_connections(self) -> int:
        """Client connections open now (at most ``limits.max_connections``)."""
        return self._web_server.open_connections

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def reload(self, cfg: GatewayConfig) -> None:
        """Serve ``cfg``'s routes, pools and pickers from now on (see :mod:`inferoute.gateway.reload`): new
        requests take the new routes, in-flight ones finish on the old. Raises :class:`InferouteError` and
        keeps serving the current routes when ``cfg`` cannot be applied."""
        new = await self._reloader.build(self.route_table, cfg)
        old, self.route_table = self.route_table, new
        self.handler.route_table = new
        self._reloader.retire(old)

    async def aclose(self, grace: float = 5.0) -> None:
        """Stop accepting, give requests in flight up to ``grace`` seconds, then cut what is left. aiohttp's
        own ``shutdown(timeout)`` waits ``timeout`` for handlers, then ``timeout`` again per connection (a
        streaming or idle keep-alive connection uses both): twice the grace. So the wait is done here, and
        aiohttp only gets :data:`CUT_TIMEOUT` to cancel the rest."""
        self.handler.stopping = True
        self._server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        # polls a counter the request path keeps (no event on its hot path), only while stopping
        while self.handler.in_flight and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(min(DRAIN_POLL, max(0.0, deadline - loop.time())))
        with contextlib.suppress(Exception):
            await self._web_server.shutdown(CUT_TIMEOUT)
        with contextlib.suppress(Exception):
            await self._server.wait_closed()
        await self._forwarder.aclose()
        await self._reloader.aclose()
        await self.route_table.aclose()


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
    route_table = await RouteTable.build(cfg, registry, embedded_factory=embedded_factory, clock=clock)
    forwarder = Forwarder(cfg, metrics)
    try:
        await forwarder.start()
        handler = GatewayHandler(cfg, route_table, forwarder, metrics, registry, clock)
        lim = cfg.limits
        web_server = GuardedServer(
            handler,
            limits=ConnectionLimits(
                header_timeout=lim.header_read_timeout,
                idle_timeout=lim.idle_timeout,
                max_requests_per_connection=lim.max_requests_per_connection,
                max_connections=lim.max_connections,
                descriptors_per_connection=2,  # the client's and one to an upstream
            ),
            on_event=lambda kind: metrics.error(kind).inc(),
            name="gateway",
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
        await route_table.aclose()
        raise
    return RunningGateway(
        server, web_server, handler, forwarder, route_table, registry, embedded_factory, clock
    )


__all__ = ["GatewayHandler", "RunningGateway", "bind_socket", "error_body", "error_response", "start_gateway"]
