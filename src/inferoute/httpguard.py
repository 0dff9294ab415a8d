"""Connection limits for inferoute's HTTP/1.1 servers (the gateway's port, the picker's ``/metrics`` port).

aiohttp's low-level server times out nothing but idle keep-alive connections, and accepts connections until
the process runs out of descriptors. :class:`GuardedServer` is that server with the limits of
:class:`ConnectionLimits`:

* **header timeout**: from the connection's start, or the first byte of a later request on it, to the end of
  the request's header block. A slow-header client (slowloris) is closed (``408`` first when it had sent
  part of a request line).
* **idle timeout**: keep-alive connections with no request for this long are closed (aiohttp's own
  keep-alive timer).
* **requests per connection**: the last one is answered with ``Connection: close``.
* **maximum connections**, capped so that ``RLIMIT_NOFILE`` keeps descriptors free (see
  :func:`connection_cap`): at the cap, a new connection takes the place of the connection idle the longest
  (no request in progress: waiting for the next request, or trickling its headers); when every connection
  has a request in progress, the new one is closed at once. Either way the descriptor is freed immediately,
  so a flood of idle TCP connections cannot lock out ``/readyz``, ``/metrics`` or well-behaved clients.

Each event is counted in :attr:`GuardedServer.events` and reported to ``on_event(kind)``; the log gets at
most one line per kind every :data:`LOG_EVERY` seconds, with the count since the last one.

The limits live on a subclass of aiohttp's ``RequestHandler`` and read a few of its private fields
(``_request_count``, ``_messages``, ``_request_in_progress``); tests/integration/test_gw_connections.py
exercises each one against the pinned aiohttp.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger(__name__)

RESERVED_DESCRIPTORS = 256
"""Descriptors kept free of client connections (upstream and picker connections, probes, logs)."""
LOG_EVERY = 10.0
"""Seconds between two log lines about the same kind of limit being hit."""

HEADER_TIMEOUT = "header-timeout"
EVICTED_IDLE = "connection-evicted"
REFUSED_FULL = "connection-refused"

_REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    header_timeout: float = 10.0
    idle_timeout: float = 75.0
    max_requests_per_connection: int = 1000
    max_connections: int = 8192
    descriptors_per_connection: int = 1
    """Descriptors one client connection may hold (the gateway: 2, its own and one to an upstream)."""


def connection_cap(wanted: int, per_connection: int = 1) -> int:
    """``wanted``, lowered so that ``per_connection`` descriptors per connection fit in ``RLIMIT_NOFILE``
    with :data:`RESERVED_DESCRIPTORS` to spare."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, (soft - RESERVED_DESCRIPTORS) // max(1, per_connection)))


class GuardedServer(web.Server):
    """aiohttp's low-level ``web.Server`` within :class:`ConnectionLimits` (see module docstring)."""

    def __init__(
        self,
        handler: Any,
        *,
        limits: ConnectionLimits,
        on_event: Callable[[str], None] | None = None,
        name: str = "http",
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, keepalive_timeout=limits.idle_timeout, **kwargs)
        self.limits = limits
        self.max_connections = connection_cap(limits.max_connections, limits.descriptors_per_connection)
        if self.max_connections < limits.max_connections:
            log.warning("%s: connections capped at %d by RLIMIT_NOFILE", name, self.max_connections)
        self.name = name
        self.events: dict[str, int] = {HEADER_TIMEOUT: 0, EVICTED_IDLE: 0, REFUSED_FULL: 0}
        self._on_event = on_event
        self._open: OrderedDict[_GuardedHandler, None] = OrderedDict()
        """Open connections, the least recently active first."""
        self._logged: dict[str, tuple[float, int]] = {}

    def __call__(self) -> RequestHandler:
        return _GuardedHandler(self, loop=self._loop, **self._kwargs)

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def event(self, kind: str) -> None:
        self.events[kind] += 1
        if self._on_event is not None:
            self._on_event(kind)
        now = self._loop.time()
        last, count_then = self._logged.get(kind, (-LOG_EVERY, 0))
        if now - last >= LOG_EVERY:
            since = self.events[kind] - count_then
            log.warning("%s: %s (%d since the last report)", self.name, _DESCRIBE[kind], since)
            self._logged[kind] = (now, self.events[kind])

    def admit(self, conn: _GuardedHandler) -> bool:
        """Make room for ``conn`` (see module docstring); False when it was refused."""
        if len(self._open) >= self.max_connections:
            victim = next((c for c in self._open if c.idle), None)
            if victim is None:
                self.event(REFUSED_FULL)
                return False
            self.event(EVICTED_IDLE)
            victim.force_close()
            self._open.pop(victim, None)
        self._open[conn] = None
        return True

    def touch(self, conn: _GuardedHandler) -> None:
        if conn in self._open:
            self._open.move_to_end(conn)

    def forget(self, conn: _GuardedHandler) -> None:
        self._open.pop(conn, None)


_DESCRIBE = {
    HEADER_TIMEOUT: "request headers not received in time, connection closed",
    EVICTED_IDLE: "connection limit reached, the longest-idle connection closed for a new one",
    REFUSED_FULL: "connection limit reached with every connection busy, new connection closed",
}


class _GuardedHandler(RequestHandler):
    """One connection: aiohttp's handler plus the header timer and the connection bookkeeping."""

    def __init__(self, manager: GuardedServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = manager
        self._header_timer: asyncio.TimerHandle | None = None
        self._partial = False
        """Bytes of a request arrived whose header block is not complete yet."""

    @property
    def idle(self) -> bool:
        """No request being handled or queued (waiting for one, or for the rest of its headers)."""
        return not self._request_in_progress and not self._messages

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not self._guard.admit(self):
            cast(asyncio.Transport, transport).abort()  # the descriptor is freed at once
            return
        self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        self._guard.forget(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        before = self._request_count
        super().data_received(data)
        guard = self._guard
        guard.touch(self)
        if self._request_count != before:  # a header block completed
            self._partial = False
            self._disarm()
            limit = guard.limits.max_requests_per_connection
            if self._request_count >= limit:
                self._last_request_closes(limit)
        elif data and self.idle:
            self._partial = True
            if self._header_timer is None:
                self._arm()

    def _last_request_closes(self, limit: int) -> None:
        """Requests from the ``limit``-th on are answered with ``Connection: close``."""
        first = self._request_count - len(self._messages)  # requests parsed before the queued ones
        for i, (msg, payload) in enumerate(self._messages):
            parsed: Any = msg  # a RawRequestMessage (an _ErrInfo has no should_close)
            if first + i + 1 >= limit and not getattr(parsed, "should_close", True):
                self._messages[i] = (parsed._replace(should_close=True), payload)

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self._loop.call_later(self._guard.limits.header_timeout, self._header_timeout)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        transport = self.transport
        if transport is None or not self.idle:
            return
        if self._request_count and not self._partial:
            return  # between requests: the idle (keep-alive) timeout's business
        self._guard.event(HEADER_TIMEOUT)
        if self._partial:
            transport.write(_REQUEST_TIMEOUT)
        self.force_close()


class GuardedSite:
    """A :class:`GuardedServer` listening on one port (:func:`serve`)."""

    def __init__(self, server: asyncio.Server, web_server: GuardedServer) -> None:
        self._server = server
        self.web_server = web_server
        self.port: int = server.sockets[0].getsockname()[1]

    async def aclose(self, grace: float = 1.0) -> None:
        self._server.close()
        await self.web_server.shutdown(grace)
        await self._server.wait_closed()


async def serve(
    handler: Any, host: str, port: int, limits: ConnectionLimits | None = None, *, name: str = "http"
) -> GuardedSite:
    """Serve ``handler`` (``BaseRequest -> StreamResponse``) on ``host:port`` within ``limits``. Raises
    ``OSError`` when the port cannot be bound."""
    web_server = GuardedServer(handler, limits=limits or ConnectionLimits(), name=name, access_log=None)
    server = await asyncio.get_running_loop().create_server(web_server, host, port, backlog=1024)
    return GuardedSite(server, web_server)


__all__ = ["ConnectionLimits", "GuardedServer", "GuardedSite", "connection_cap", "serve"]
