"""The NGINX decider: inferoute decides, stock NGINX carries the bytes (``inferoute gateway --mode nginx``).

Theory of operation
-------------------
NGINX buffers the client's request body and proxies the request once to this decider (the ``location``
that ``inferoute nginx-config`` generates). The decider runs exactly what the gateway runs -- BBR, then the
picker, then destination validation, through :class:`inferoute.gateway.routing.RouteDecider` -- and answers
with *no body*:

* success: ``200`` with ``X-Accel-Redirect: @inference`` plus the decision in headers (table below). NGINX
  internally redirects to its ``@inference`` named location, copies those headers into variables
  (``$inference_upstream``, ``$inference_model``, ...) with ``set`` and proxies the *same buffered body* to
  ``http://$inference_upstream``. NGINX streams the answer (SSE token by token) itself: no response byte
  goes through Python.
* failure: the status the gateway would answer (400, 413, 429, 502, 503, 504, ...) with an OpenAI-style
  JSON body and no ``X-Accel-Redirect``; NGINX passes it to the client as is.

Headers of a redirect answer (the decider -> NGINX protocol; NGINX never forwards them to the client, and
the decider sends nothing else worth leaking):

=============================  =============================================================================
``X-Accel-Redirect``           ``@inference`` (no fallback) or ``@inference_retry`` (fallbacks follow)
``X-Inference-Upstream``       the picked ``ip:port``
``X-Inference-Fallback-<n>``   the n-th fallback ``ip:port`` (n = 1 .. NGINX's ``X-Inference-Retries``),
                               tried by NGINX after a 500/502/503 before the first byte (the gateway's rule)
``X-Inference-Fallbacks``      all fallbacks, comma separated (for logs)
``X-Inference-Model``          the model found by BBR (empty: body-less request, header not set)
``X-Inference-Request-Id``     token naming the picker session; echoed back by the completion report
``X-Inference-Hdr-<name>``     a request header the picker set (header mutation); NGINX forwards the names
                               it was generated with (``nginx-config --pass-header``)
=============================  =============================================================================

Response-phase accounting: the picker's in-flight counts must be released when the response ends. After
the response has been sent (or the client went away) NGINX reports the token, ``$upstream_addr``,
``$upstream_status``, ``$upstream_header_time`` and ``$request_completion`` -- either with ``post_action
@inference_done`` (one body-less HTTP request to ``/_inferoute/done``; reliable) or from its access log as a
syslog UDP datagram to the decider's port number (``nginx-config --report syslog``; far cheaper, lost only
under overload). The decider then calls ``response_started`` and ``response_finished`` (or ``aborted``) on
the session. A session whose report never arrives (NGINX killed, a lost datagram, a config without reports)
is aborted after ``completion_timeout`` seconds. Lost compared with the gateway: per-chunk reporting
(``response_chunk``) and response headers, so the picker sees neither token usage nor time-to-first-token.

A request whose decision NGINX cannot express -- the picker replaced the body (model rewrite) -- is
*relayed*: the decider forwards that request itself through the gateway's own forwarding path
(:class:`inferoute.gateway.relay.Relay`: the same fallback walk on connect errors and on a 5xx before the
first byte, the same hop-by-hop rules, the answer streamed back with ``X-Accel-Buffering: no``) and the
relay ends the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from inferoute.clock import Clock, SystemClock
from inferoute.errors import InferouteError, error_body
from inferoute.gateway.config import GatewayConfig, parse_listen
from inferoute.gateway.picker_setup import Deciders, EmbeddedFactory, start_embedded_picker
from inferoute.gateway.proxy import Forwarder, end_to_end_headers
from inferoute.gateway.relay import Relay, RequestRecord, read_body, request_id_from
from inferoute.gateway.routing import Decided, PickerRejected, RouteDecider
from inferoute.picking import PickSession
from inferoute.tasks import TaskSet

log = logging.getLogger(__name__)

ACCEL_LOCATION = "@inference"
ACCEL_RETRY_LOCATION = "@inference_retry"
RETRIES_HEADER = "X-Inference-Retries"
"""Request header NGINX sends the decider: how many fallbacks its configuration can walk (0 if absent)."""
UPSTREAM_HEADER = "X-Inference-Upstream"
FALLBACK_HEADER = "X-Inference-Fallback-"
FALLBACKS_HEADER = "X-Inference-Fallbacks"
MODEL_HEADER = "X-Inference-Model"
TOKEN_HEADER = "X-Inference-Request-Id"
PASS_HEADER_PREFIX = "X-Inference-Hdr-"

INTERNAL_PREFIX = "/_inferoute/"
DONE_PATH = "/_inferoute/done"
HEALTH_PATH = "/_inferoute/healthz"
METRICS_PATH = "/_inferoute/metrics"

# The completion report's headers (sent by NGINX's post_action location).
REPORT_SERVED = "x-inference-served"
REPORT_STATUS = "x-inference-upstream-status"
REPORT_COMPLETION = "x-inference-completion"
REPORT_CLIENT_STATUS = "x-inference-client-status"
REPORT_HEADER_TIME = "x-inference-header-time"

SYSLOG_MARKER = b"inferoute-report|"
"""Start of a completion report sent by NGINX's access log over syslog (UDP); fields are ``|``-separated:
token, ``$upstream_addr``, ``$upstream_status``, ``$upstream_header_time``, ``$request_completion``,
``$status`` (see :func:`parse_syslog_report`)."""

DEFAULT_MAX_FALLBACKS = 8
"""Upper bound of fallback endpoints announced per decision; NGINX's ``X-Inference-Retries`` lowers it."""
UDP_RECEIVE_BUFFER = 4 * 1024 * 1024
DEFAULT_COMPLETION_TIMEOUT = 900.0
"""Seconds after which a session without completion report is aborted (longer than any sane generation)."""


def is_internal_header(name_lower: str) -> bool:
    """True for names of the decider <-> NGINX protocol (``x-inference-*``, ``x-accel-*``)."""
    return name_lower.startswith(("x-inference-", "x-accel-"))


def request_headers_for_decision(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Client headers as the decision core should see them: hop-by-hop (and those named in ``Connection``)
    and the decider protocol's own names removed (a client could send them through NGINX)."""
    return [(k, v) for k, v in end_to_end_headers(headers) if not is_internal_header(k.lower())]


def redirect_headers(
    decided: Decided, token: str, *, max_fallbacks: int = DEFAULT_MAX_FALLBACKS
) -> dict[str, str]:
    """The headers of a redirect answer for ``decided`` (see the module table). Pure."""
    first, *rest = decided.upstreams
    fallbacks = rest[:max_fallbacks]
    model_header = decided.route.bbr.header_name.lower()
    model = decided.model or ""
    passed: dict[str, str] = {}
    for name, value in decided.set_headers.items():
        if name.lower() == model_header:
            model = value  # BBR's value, or the picker's rewrite of it
        else:
            passed[PASS_HEADER_PREFIX + name.lower()] = value
    out = {
        "X-Accel-Redirect": ACCEL_RETRY_LOCATION if fallbacks else ACCEL_LOCATION,
        UPSTREAM_HEADER: first,
        MODEL_HEADER: model,
        TOKEN_HEADER: token,
    }
    if fallbacks:
        out[FALLBACKS_HEADER] = ",".join(fallbacks)
    for i, value in enumerate(fallbacks, start=1):
        out[f"{FALLBACK_HEADER}{i}"] = value
    out.update(passed)
    return out


def nginx_retries(headers: Mapping[str, str], cap: int) -> int:
    """Fallbacks to announce: NGINX's ``X-Inference-Retries`` (0 when absent or invalid), at most ``cap``."""
    value = headers.get(RETRIES_HEADER, "").strip()
    return min(int(value), cap) if value.isdigit() else 0


def header_variable(name: str) -> str:
    """NGINX's ``$upstream_http_*`` suffix for a response header name (lower case, ``-`` -> ``_``)."""
    return name.lower().replace("-", "_")


# --- completion reports -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CompletionReport:
    """What NGINX's post_action tells the decider about one finished request."""

    served: str | None
    """The ``ip:port`` that answered (last of ``$upstream_addr``), None when no upstream was reached."""
    upstream_status: int | None
    """Status from that upstream (last of ``$upstream_status``), None when it gave none (connect error)."""
    completed: bool
    """``$request_completion == "OK"``: the whole response reached the client."""
    client_status: int | None = None
    answered: bool = True
    """The served upstream sent a response header (last ``$upstream_header_time`` is not ``-``)."""

    @property
    def outcome(self) -> str:
        """``ok`` | ``incomplete`` (client went away or the stream broke) | ``upstream-error`` (no answer)."""
        if self.upstream_status is None or self.served is None or not self.answered:
            return "upstream-error"
        if not self.completed:
            return "incomplete"
        return "ok"


def _last_token(value: str | None) -> str | None:
    """Last entry of an NGINX upstream list (``a, b : c`` -> ``c``); None for empty or ``-``."""
    if not value:
        return None
    token = value.replace(" : ", ",").split(",")[-1].strip()
    return token if token and token != "-" else None


def _int_or_none(value: str | None) -> int | None:
    if value is None or not value.strip().isdigit():
        return None
    return int(value.strip())


def parse_report(headers: Mapping[str, str]) -> CompletionReport:
    """Parse the completion report's headers (names lower case). Pure; never raises."""
    served = _last_token(headers.get(REPORT_SERVED))
    status = _int_or_none(_last_token(headers.get(REPORT_STATUS)))
    if served is not None and served.startswith("unix:"):
        served = None
    return CompletionReport(
        served=served,
        upstream_status=status,
        completed=headers.get(REPORT_COMPLETION, "").strip() == "OK",
        client_status=_int_or_none(headers.get(REPORT_CLIENT_STATUS)),
        answered=_last_token(headers.get(REPORT_HEADER_TIME, "0")) is not None,
    )


def parse_syslog_report(datagram: bytes) -> tuple[str, CompletionReport] | None:
    """``(token, report)`` from one syslog datagram of NGINX's ``inference_report`` log format, None when the
    datagram is not one. Pure; never raises."""
    at = datagram.find(SYSLOG_MARKER)
    if at < 0:
        return None
    fields = datagram[at + len(SYSLOG_MARKER) :].decode("utf-8", "replace").rstrip("\r\n").split("|")
    if len(fields) != 6 or not fields[0]:
        return None
    token, served, status, header_time, completion, client_status = fields
    report = parse_report(
        {
            REPORT_SERVED: served,
            REPORT_STATUS: status,
            REPORT_HEADER_TIME: header_time,
            REPORT_COMPLETION: completion,
            REPORT_CLIENT_STATUS: client_status,
        }
    )
    return token, report


def echo_status(status: int | None) -> int:
    """The status a completion report is answered with: the client's own (NGINX logs it as ``$status``)."""
    return status if status is not None and 200 <= status <= 599 and status not in (304,) else 204


def end_session(session: PickSession, report: CompletionReport) -> str:
    """Report ``report`` to the picker session (always ends it). Returns the outcome label."""
    outcome = report.outcome
    if outcome != "upstream-error":
        assert report.served is not None and report.upstream_status is not None
        session.response_started(report.served, report.upstream_status, {})
    if outcome == "ok":
        session.response_finished()
    else:
        session.aborted(outcome)
    return outcome


class PendingSessions:
    """Picker sessions waiting for NGINX's completion report, each with a deadline. Pure; clock injected.

    Deadlines are ``now + timeout`` with a constant timeout, so insertion order is deadline order and
    expiry only looks at the oldest entries.
    """

    def __init__(self, clock: Clock, timeout: float = DEFAULT_COMPLETION_TIMEOUT) -> None:
        self.clock = clock
        self.timeout = timeout
        self._open: OrderedDict[str, tuple[float, PickSession]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._open)

    def open(self, session: PickSession) -> str:
        """Keep ``session`` until its report; returns the token NGINX echoes back."""
        token = secrets.token_hex(12)
        self._open[token] = (self.clock.now() + self.timeout, session)
        return token

    def pop(self, token: str) -> PickSession | None:
        """The session for ``token`` (removed), None if unknown or already ended."""
        entry = self._open.pop(token, None)
        return entry[1] if entry is not None else None

    def expire(self) -> list[PickSession]:
        """Remove and return the sessions whose deadline passed (the caller aborts them)."""
        now = self.clock.now()
        out = []
        while self._open:
            token, (deadline, session) = next(iter(self._open.items()))
            if deadline > now:
                break
            del self._open[token]
            out.append(session)
        return out

    def drain(self) -> list[PickSession]:
        """Remove and return every open session (shutdown)."""
        out = [s for _, s in self._open.values()]
        self._open.clear()
        return out


# --- metrics ------------------------------------------------------------------------------------------------


class DeciderMetrics:
    """Prometheus metrics of the decider, registered on the registry passed in."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.decisions = Counter(
            "inferoute_nginx_decisions_total",
            "Requests answered by the NGINX decider, by result.",
            ["result"],
            registry=registry,
        )
        self.errors = Counter(
            "inferoute_nginx_decider_errors_total",
            "Error answers of the NGINX decider, by status and cause.",
            ["status", "cause"],
            registry=registry,
        )
        self.completions = Counter(
            "inferoute_nginx_completions_total",
            "Picker sessions ended, by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.pending = Gauge(
            "inferoute_nginx_pending_sessions",
            "Picker sessions waiting for NGINX's completion report.",
            registry=registry,
        )
        self.swallowed = Counter(
            "inferoute_nginx_fail_open_total",
            "Picker or BBR failures swallowed by fail-open, by cause.",
            ["cause"],
            registry=registry,
        )
        self.latency = Histogram(
            "inferoute_nginx_decision_seconds",
            "Time from request received to decision answered.",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=registry,
        )


# --- the HTTP app -------------------------------------------------------------------------------------------

RouteLookup = Callable[[str], RouteDecider | None]
"""path -> the route's decider (longest-prefix match), None when no route matches."""


class Decider:
    """The decider's request handling; :meth:`handler` is an aiohttp low-level handler.

    ``routes`` maps a request path to its :class:`RouteDecider`; ``forwarder`` carries the rare relayed
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
            return await self._internal(request)
        return await self._decide(request)

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
            decided = await decider.decide(request.method, request.path_qs, headers, body, request_id)
        except InferouteError as exc:
            return self._error(exc)
        for cause in (decided.picker_error, decided.bbr_error):
            if cause:
                self.metrics.swallowed.labels(cause).inc()
        if decided.body is not body:
            return await self._relay(request, decided)
        transport = request.transport
        if transport is None or transport.is_closing():
            # NGINX gave up on this request (the client went away while the picker decided): nobody will
            # report its completion, so end the session now instead of at the completion timeout.
            decided.session.aborted("client-disconnect")
            self.metrics.completions.labels("client-disconnect").inc()
            return web.Response(status=499)
        token = self.pending.open(decided.session)
        self.metrics.pending.set(len(self.pending))
        self.metrics.decisions.labels(decided.source).inc()
        self.metrics.latency.observe(time.perf_counter() - t0)
        return web.Response(
            status=200,
            headers=redirect_headers(
                decided, token, max_fallbacks=nginx_retries(request.headers, self.max_fallbacks)
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

    async def _relay(self, request: web.BaseRequest, decided: Decided) -> web.StreamResponse:
        """Forward ``request`` with the replacement body ourselves, through the gateway's forwarding path
        (fallback walk, header rules, streamed answer); the relay ends the session."""
        self.metrics.decisions.labels("relay").inc()
        rec = RequestRecord(
            request.method,
            request.path,
            request_id_from(request.headers.get("x-request-id")),
            self.clock.now(),
            route=decided.route.path,
        )
        try:
            return await self.relay.forward(request, decided, rec)
        except InferouteError as exc:
            return self._error(exc)


class JsonErrorServer(web.Server):
    """aiohttp's low-level server whose protocol-level errors (a request its parser refuses, such as a
    duplicate ``Content-Type``; an exception escaping the handler) are OpenAI-style JSON instead of aiohttp's
    text/plain. ``on_error(status)`` counts them.

    aiohttp's ``RequestHandler`` has ``__slots__``, so its ``handle_error`` cannot be replaced per instance;
    each new connection's handler gets a slot-less subclass (same layout) that overrides it.
    """

    def __init__(self, handler: Any, *, on_error: Callable[[int], None], **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)

        def handle_error(
            protocol: RequestHandler,
            request: web.BaseRequest,
            status: int = 500,
            exc: BaseException | None = None,
            message: str | None = None,
        ) -> web.StreamResponse:
            RequestHandler.handle_error(protocol, request, status, exc, message)  # logs; raises if started
            on_error(status)
            text = "internal error in the inference decider" if status >= 500 else (message or "bad request")
            response = web.Response(
                status=status, body=error_body(status, text), content_type="application/json"
            )
            response.force_close()
            return response

        self._json_protocol = type(
            "JsonErrorRequestHandler", (RequestHandler,), {"__slots__": (), "handle_error": handle_error}
        )

    def __call__(self) -> RequestHandler:
        protocol = super().__call__()
        protocol.__class__ = self._json_protocol
        return protocol


class DeciderServer:
    """The decider on a TCP socket: :meth:`start` (returns the port), :meth:`aclose`.

    Owns the session sweeper task."""

    def __init__(self, decider: Decider, host: str = "127.0.0.1", port: int = 0) -> None:
        self.decider = decider
        self.host = host
        self.port = port
        self._runner: web.ServerRunner | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._tasks = TaskSet("nginx-decider")

    async def start(self) -> int:
        """Listen (port 0 picks a free one) and return the port."""
        metrics = self.decider.metrics
        server = JsonErrorServer(
            self.decider.handler,
            on_error=lambda status: metrics.errors.labels(str(status), "protocol").inc(),
            access_log=None,
        )
        self._runner = web.ServerRunner(server)
        await self._runner.setup()
        await self.decider.start()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        await self._listen_udp()
        self._tasks.spawn(self.decider.sweep(), name="sweep")
        log.info("NGINX decider listening on %s:%d", self.host, self.port)
        return self.port

    async def _listen_udp(self) -> None:
        """Completion reports over syslog arrive on UDP, same address and port number as the HTTP listener."""
        decider = self.decider

        class Reports(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                decider.datagram(data)

        loop = asyncio.get_running_loop()
        try:
            self._udp, _ = await loop.create_datagram_endpoint(Reports, local_addr=(self.host, self.port))
        except OSError as exc:
            log.warning(
                "syslog completion reports disabled: cannot bind UDP %s:%d: %s", self.host, self.port, exc
            )
            return
        sock = self._udp.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # bursts of reports while the loop is busy: a deep buffer
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)

    async def aclose(self) -> None:
        """Stop listening and abort every session still waiting for its report."""
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        await self._tasks.aclose()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.decider.aclose()


class RunningDecider:
    """A started decider with its pickers (:func:`start_decider`); :meth:`aclose` stops everything."""

    def __init__(self, server: DeciderServer, deciders: Deciders, registry: CollectorRegistry) -> None:
        self.server = server
        self.deciders = deciders
        self.registry = registry

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def decider(self) -> Decider:
        return self.server.decider

    async def aclose(self) -> None:
        try:
            await self.server.aclose()
        finally:
            await self.deciders.aclose()


async def start_decider(
    cfg: GatewayConfig,
    listen: str | None = None,
    *,
    registry: CollectorRegistry | None = None,
    embedded_factory: EmbeddedFactory = start_embedded_picker,
    clock: Clock | None = None,
    max_fallbacks: int = DEFAULT_MAX_FALLBACKS,
    completion_timeout: float = DEFAULT_COMPLETION_TIMEOUT,
) -> RunningDecider:
    """Build every route's :class:`RouteDecider` exactly as the gateway does (:class:`Deciders`) and serve
    them as the NGINX decider on ``listen`` (default ``cfg.listen``; port 0 picks a free one)."""
    registry = registry if registry is not None else CollectorRegistry()
    host, port = parse_listen(listen or cfg.listen)
    deciders = await Deciders.build(cfg, registry, embedded_factory=embedded_factory, clock=clock)
    decider = Decider(
        deciders.for_path,
        registry=registry,
        clock=clock,
        max_fallbacks=max_fallbacks,
        completion_timeout=completion_timeout,
        forwarder=Forwarder(cfg),
    )
    server = DeciderServer(decider, host, port)
    try:
        await server.start()
    except BaseException:
        await deciders.aclose()
        raise
    return RunningDecider(server, deciders, registry)


async def serve(cfg: GatewayConfig, listen: str | None = None) -> None:
    """Run the decider until cancelled (SIGINT/SIGTERM end :func:`run_decider`)."""
    running = await start_decider(cfg, listen)
    try:
        await asyncio.Event().wait()
    finally:
        await running.aclose()


def run_decider(config: GatewayConfig, listen: str | None = None) -> None:
    """Blocking entry point of ``inferoute gateway --mode nginx``: serve until SIGINT/SIGTERM."""
    if config.workers > 1:
        log.warning(
            "workers: %d ignored in nginx mode: the decider is one process (completion reports must "
            "reach the process that holds the picker session)",
            config.workers,
        )
    try:
        import uvloop

        runner: Callable[[Any], Any] = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency
        runner = asyncio.run

    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await serve(config, listen)

    runner(main())
