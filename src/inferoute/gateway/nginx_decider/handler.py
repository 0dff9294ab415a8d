"""The decider's request handling: decide and answer with a redirect, relay what NGINX cannot carry, take
completion reports; an aiohttp low-level handler (see the package docstring for the protocol).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from inferoute.clock import Clock, SystemClock
from inferoute.errors import InferouteError
from inferoute.gateway.config import GatewayConfig
from inferoute.gateway.nginx_decider.metrics import DeciderMetrics
from inferoute.gateway.nginx_decider.protocol import (
    DEFAULT_MAX_FALLBACKS,
    DONE_PATH,
    HEALTH_PATH,
    INTERNAL_PREFIX,
    METRICS_PATH,
    TOKEN_HEADER,
    is_internal_header,
    nginx_retries,
    redirect_headers,
    request_headers_for_decision,
)
from inferoute.gateway.nginx_decider.reports import (
    DEFAULT_COMPLETION_TIMEOUT,
    CompletionReport,
    PendingSessions,
    echo_status,
    end_session,
    parse_report,
    parse_syslog_report,
)
from inferoute.gateway.proxy import Forwarder, end_to_end_headers
from inferoute.gateway.relay import Relay, RequestRecord, read_body, request_id_from
from inferoute.gateway.routing import PickerRejected, RoutedRequest
from inferoute.gateway.weighted import Router

log = logging.getLogger(__name__)


RouteLookup = Callable[[str], Router | None]
"""path -> the route's decider (longest-prefix match), None when no route matches."""


class NginxDecider:
    """The decider's request handling; :meth:`handler` is an aiohttp low-level handler.

    ``routes`` maps a request path to its :class:`RequestRouter`; ``forwarder`` carries the rare relayed
    requests (the gateway's :class:`~inferoute.gateway.relay.Relay` over it; its timeouts and pool settings
    come from the gateway configuration). Every session handed out is ended exactly once: by a
    completion report, the completion timeout, the relay, or :meth:`aclose`.
    """

    def __init__(
        self,
        routes: RouteLookup,
        *,
        registry: CollectorRegistry,
        clock: Clock | None = None,
        max_fallbacks: int = DEFAULT_MAX_FALLBACKS,
        completion_timeout: float = DEFAULT_COMPLETION_TIMEOUT,
        forwarder: Forwarder | None = None,
    ) -> None:
        self.routes = routes
        self.registry = registry
        self.clock = clock or SystemClock()
        self.max_fallbacks = max_fallbacks
        self.pending = PendingSessions(self.clock, completion_timeout)
        self.in_flight = 0
        """Decisions (and relayed requests) being answered."""
        self.stopping = False
        """Set by a shutdown: new decisions get a JSON 503, completion reports are still taken."""
        self.metrics = DeciderMetrics(registry)
        self.forwarder = forwarder or Forwarder(GatewayConfig())
        self.relay = Relay(
            self.forwarder,
            self.clock,
            max_upstreams=1 + max_fallbacks,
            answer_headers={"X-Accel-Buffering": "no"},  # NGINX passes a relayed stream on as it arrives
        )

    async def start(self) -> None:
        """Open the relay's upstream connection pool."""
        await self.forwarder.start()

    async def handler(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        if path.startswith(INTERNAL_PREFIX):
            return await self._internal(request)  # completion reports keep arriving while stopping
        if self.stopping:
            return self._error(InferouteError(503, "the gateway is shutting down", cause="shutdown"))
        self.in_flight += 1
        try:
            return await self._decide(request)
        finally:
            self.in_flight -= 1

    # --- decisions

    async def _decide(self, request: web.BaseRequest) -> web.StreamResponse:
        t0 = time.perf_counter()
        decider = self.routes(request.path)
        if decider is None:
            return self._error(InferouteError(404, f"no route for {request.path}", cause="no-route"))
        route = decider.route
        try:
            body = await read_body(request, route.bbr.max_body_size)
            headers = request_headers_for_decision(request.headers.items())
            request_id = request.headers.get("X-Request-Id", "")
            routed = await decider.decide(request.method, request.path_qs, headers, body, request_id)
        except InferouteError as exc:
            return self._error(exc)
        for cause in (routed.picker_error, routed.bbr_error):
            if cause:
                self.metrics.swallowed.labels(cause).inc()
        if routed.body is not body:
            return await self._relay(request, routed)
        transport = request.transport
        if transport is None or transport.is_closing():
            # NGINX gave up on this request (the client went away while the picker routed): nobody will
            # report its completion, so end the session now instead of at the completion timeout.
            routed.session.aborted("client-disconnect")
            self.metrics.completions.labels("client-disconnect").inc()
            return web.Response(status=499)
        token = self.pending.open(routed.session)
        self.metrics.pending.set(len(self.pending))
        self.metrics.decisions.labels(routed.source).inc()
        self.metrics.latency.observe(time.perf_counter() - t0)
        return web.Response(
            status=200,
            headers=redirect_headers(
                routed, token, max_fallbacks=nginx_retries(request.headers, self.max_fallbacks)
            ),
        )

    def _error(self, exc: InferouteError) -> web.Response:
        self.metrics.errors.labels(str(exc.status), exc.cause).inc()
        self.metrics.decisions.labels("error").inc()
        level = logging.WARNING if exc.status >= 500 else logging.INFO
        log.log(level, "decider: %s", exc)
        headers: dict[str, str] = {}
        if isinstance(exc, PickerRejected):
            headers = {
                k: v
                for k, v in end_to_end_headers(exc.headers.items())
                if not is_internal_header(k.lower()) and k.lower() not in ("content-length", "content-type")
            }
        return web.Response(
            status=exc.status, body=exc.body(), content_type="application/json", headers=headers
        )

    # --- completion reports, health, metrics

    async def _internal(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path == DONE_PATH:
            report = parse_report({k.lower(): v for k, v in request.headers.items()})
            self.complete(request.headers.get(TOKEN_HEADER, ""), report)
            # NGINX logs the post_action's status as the request's $status: echo the client's status back.
            return web.Response(status=echo_status(report.client_status))
        if request.path == HEALTH_PATH:
            return web.Response(text="ok\n")
        if request.path == METRICS_PATH:
            return web.Response(
                body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
            )
        return self._error(InferouteError(404, f"no such internal path {request.path}", cause="no-route"))

    def complete(self, token: str, report: CompletionReport) -> str:
        """End the session of ``token`` with ``report`` (from post_action or syslog). Returns the outcome."""
        session = self.pending.pop(token) if token else None
        self.metrics.pending.set(len(self.pending))
        outcome = "unknown-token" if session is None else end_session(session, report)
        self.metrics.completions.labels(outcome).inc()
        return outcome

    def datagram(self, data: bytes) -> None:
        """One syslog datagram from NGINX's access log (``nginx-config --report syslog``)."""
        parsed = parse_syslog_report(data)
        if parsed is None:
            self.metrics.completions.labels("unparsable").inc()
            return
        self.complete(*parsed)

    def expire_sessions(self) -> int:
        """Abort sessions whose completion report is overdue. Returns how many."""
        expired = self.pending.expire()
        for session in expired:
            session.aborted("completion-timeout")
            self.metrics.completions.labels("completion-timeout").inc()
        if expired:
            self.metrics.pending.set(len(self.pending))
        return len(expired)

    async def sweep(self, interval: float = 1.0) -> None:
        """Run :meth:`expire_sessions` every ``interval`` seconds (an owned task)."""
        while True:
            await asyncio.sleep(interval)
            self.expire_sessions()

    async def aclose(self) -> None:
        for session in self.pending.drain():
            session.aborted("shutdown")
        self.metrics.pending.set(0)
        await self.forwarder.aclose()

    # --- relay (decisions NGINX cannot express)

    async def _relay(self, request: web.BaseRequest, routed: RoutedRequest) -> web.StreamResponse:
        """Forward ``request`` with the replacement body ourselves, through the gateway's forwarding path
        (fallback walk, header rules, streamed answer); the relay ends the session."""
        self.metrics.decisions.labels("relay").inc()
        rec = RequestRecord(
            request.method,
            request.path,
            request_id_from(request.headers.get("x-request-id")),
            self.clock.now(),
            route=routed.route.path,
        )
        try:
            return await self.relay.forward(request, routed, rec)
        except InferouteError as exc:
            return self._error(exc)
