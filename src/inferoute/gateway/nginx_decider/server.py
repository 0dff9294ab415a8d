"""The decider as a process: the HTTP and UDP listeners, the session sweeper, start-up and signals.

:func:`start_decider` builds every route's router exactly as the gateway does and serves them;
:func:`run_decider` is the blocking entry point of ``inferoute gateway --mode nginx``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from prometheus_client import CollectorRegistry

from inferoute.clock import Clock
from inferoute.errors import error_body
from inferoute.gateway.app import CUT_TIMEOUT, DRAIN_POLL
from inferoute.gateway.config import GatewayConfig, check_nginx_mode, parse_listen
from inferoute.gateway.nginx_decider.handler import NginxDecider
from inferoute.gateway.nginx_decider.protocol import DEFAULT_MAX_FALLBACKS
from inferoute.gateway.nginx_decider.reports import DEFAULT_COMPLETION_TIMEOUT
from inferoute.gateway.picker_setup import EmbeddedFactory, RouteTable, start_embedded_picker
from inferoute.gateway.proxy import Forwarder
from inferoute.gateway.serve import DEFAULT_GRACE, STOP_SIGNALS, run_async, wait_for_signal
from inferoute.tasks import TaskSet

log = logging.getLogger(__name__)


UDP_RECEIVE_BUFFER = 4 * 1024 * 1024
"""Bursts of syslog reports arrive while the event loop is busy: a deep socket buffer keeps them."""


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

    def __init__(self, decider: NginxDecider, host: str = "127.0.0.1", port: int = 0) -> None:
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
        # aiohttp waits shutdown_timeout twice per busy connection; the grace is waited in :meth:`drain`.
        self._runner = web.ServerRunner(server, shutdown_timeout=CUT_TIMEOUT)
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

    async def drain(self, grace: float) -> None:
        """Answer new decisions with 503 and give those in flight up to ``grace`` seconds."""
        self.decider.stopping = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        # polls a counter the request path keeps (no event on its hot path), only while stopping
        while self.decider.in_flight and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(min(DRAIN_POLL, max(0.0, deadline - loop.time())))

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

    def __init__(self, server: DeciderServer, route_table: RouteTable, registry: CollectorRegistry) -> None:
        self.server = server
        self.route_table = route_table
        self.registry = registry

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def decider(self) -> NginxDecider:
        return self.server.decider

    async def aclose(self) -> None:
        try:
            await self.server.aclose()
        finally:
            await self.route_table.aclose()


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
    """Build every route's :class:`RequestRouter` exactly as the gateway does (:class:`RouteTable`) and serve
    them as the NGINX decider on ``listen`` (default ``cfg.listen``; port 0 picks a free one)."""
    check_nginx_mode(cfg)
    registry = registry if registry is not None else CollectorRegistry()
    host, port = parse_listen(listen or cfg.listen)
    route_table = await RouteTable.build(cfg, registry, embedded_factory=embedded_factory, clock=clock)
    decider = NginxDecider(
        route_table.for_path,
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
        await route_table.aclose()
        raise
    return RunningDecider(server, route_table, registry)


async def serve(cfg: GatewayConfig, listen: str | None = None, grace: float = DEFAULT_GRACE) -> int:
    """Run the decider until SIGINT/SIGTERM, then stop as the gateway does: the first signal says what it
    waits for and for how long (decisions in flight, up to ``grace`` s); a second one stops at once (exit
    status 130, no traceback). Returns the exit status."""
    running = await start_decider(cfg, listen)
    stopped = False
    try:
        name = await wait_for_signal()
        log.info("%s received", name)
        stopped = True
        await _stop(running, grace)
    finally:
        if not stopped:
            await running.aclose()
    return 0


async def _stop(running: RunningDecider, grace: float) -> None:
    decider = running.decider
    busy, streams = decider.in_flight, len(decider.pending)
    if busy:
        log.warning(
            "stopping: waiting up to %.0f s for %d decision(s) in flight (again to stop now); "
            "new ones get 503",
            grace,
            busy,
        )
    else:
        log.info("stopping (no decisions in flight)")
    if streams:
        log.info(
            "%d response(s) NGINX is still serving go on; their picker sessions end now (cause shutdown)",
            streams,
        )

    def at_once(sig: signal.Signals) -> None:
        log.warning("%s again: stopping now, cutting %d decision(s)", sig.name, decider.in_flight)
        logging.shutdown()
        os._exit(130)

    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, at_once, sig)
    try:
        await running.server.drain(grace)
        await running.aclose()
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)


def run_decider(config: GatewayConfig, listen: str | None = None) -> int:
    """Blocking entry point of ``inferoute gateway --mode nginx``: serve until SIGINT/SIGTERM; returns the
    exit status."""
    if config.workers > 1:
        log.warning(
            "workers: %d ignored in nginx mode: the decider is one process (completion reports must "
            "reach the process that holds the picker session)",
            config.workers,
        )
    return run_async(lambda: serve(config, listen))
