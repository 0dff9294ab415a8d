"""The metrics collector: scrape every endpoint's Prometheus page on a short tick.

Every endpoint has its own :class:`_Scraper`, a small state machine driven by event-loop callbacks — a timer
fires, the pre-built GET goes out on the endpoint's keep-alive connection, ``data_received`` frames the
response, parses it and records the snapshot, and the next tick is scheduled. No task, coroutine or future
exists per scrape (only connecting runs as a task), which is what makes 100 endpoints x 20 Hz affordable in
Python (see docs/benchmarks/scheduler.md). A slow or dead pod only delays itself; a reaper callback enforces
each scrape's timeout. Ticks are spread over the interval by a per-endpoint phase so the pool's scrapes do
not arrive as one burst on the event loop the picks share.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import Callable

from inferoute.epp.datalayer.datastore import Datastore, EndpointState
from inferoute.epp.datalayer.httpget import HttpGetError, ResponseReader, client_ssl_context
from inferoute.epp.datalayer.metrics import MetricsParseError, ParseCache, parse_metrics
from inferoute.tasks import TaskSet

log = logging.getLogger(__name__)

ScrapeHook = Callable[[str, bool, float], None]
"""Called after every scrape with (endpoint key, ok, seconds)."""


class _Conn(asyncio.Protocol):
    """One TCP connection of a scraper; events from a replaced connection are ignored."""

    __slots__ = ("scraper", "transport")

    def __init__(self, scraper: _Scraper) -> None:
        self.scraper = scraper
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.scraper.conn is self:
            self.scraper.on_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.scraper.conn is self:
            self.scraper.on_lost(exc)


class _Scraper:
    """Scrape state of one endpoint: connection, pending request, next tick, parse cache."""

    __slots__ = (
        "closed",
        "collector",
        "conn",
        "connecting",
        "handle",
        "key",
        "next_at",
        "parse_cache",
        "reader",
        "request",
        "sent_at",
        "waiters",
    )

    def __init__(self, collector: MetricsCollector, key: str) -> None:
        self.collector = collector
        self.key = key
        self.conn: _Conn | None = None
        self.connecting = False
        self.reader = ResponseReader()
        self.sent_at: float | None = None
        """Loop time the pending scrape started (None: idle)."""
        self.handle: asyncio.TimerHandle | None = None
        self.next_at = 0.0
        self.parse_cache = ParseCache()
        self.waiters: list[asyncio.Future[bool]] = []
        self.closed = False
        host, port = self._address()
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.request = (
            f"GET {collector.path} HTTP/1.1\r\nHost: {authority}\r\nAccept: text/plain\r\n"
            "User-Agent: inferoute-epp\r\n\r\n"
        ).encode("latin-1")

    def _address(self) -> tuple[str, int]:
        state = self.collector.datastore.get(self.key)
        assert state is not None
        return state.endpoint.address.strip("[]"), state.endpoint.port

    # -- scheduling ---------------------------------------------------------------------------------------
    def start(self) -> None:
        """First scrape now, then every interval at this endpoint's phase."""
        loop = asyncio.get_running_loop()
        interval = self.collector.interval
        self.next_at = loop.time() + (zlib.crc32(self.key.encode()) % 1000) / 1000 * interval
        self.send()

    def tick(self) -> None:
        self.handle = None
        if not self.closed and self.sent_at is None:
            self.send()

    def schedule_next(self) -> None:
        if self.closed:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        interval = self.collector.interval
        while self.next_at <= now:  # overran (slow pod): skip missed ticks instead of bursting
            self.next_at += interval
        if self.handle is not None:
            self.handle.cancel()
        self.handle = loop.call_at(self.next_at, self.tick)

    # -- one scrape ---------------------------------------------------------------------------------------
    def send(self) -> None:
        now = asyncio.get_running_loop().time()
        self.sent_at = now
        # This scrape uses the current slot. Timers may fire up to a clock tick early and a loopback response
        # can arrive within that tick, so advance here rather than trusting "now" when the response lands.
        half = self.collector.interval / 2
        while self.next_at <= now + half:
            self.next_at += self.collector.interval
        conn = self.conn
        if conn is None or conn.transport is None:
            if not self.connecting:
                self.connecting = True
                self.collector.tasks.spawn(self._connect(), name=f"connect:{self.key}")
            return
        self.reader.reset()
        conn.transport.write(self.request)

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = self._address()
        ssl = self.collector.ssl_context
        conn = _Conn(self)
        try:
            async with asyncio.timeout(self.collector.timeout):
                await loop.create_connection(
                    lambda: conn, host, port, ssl=ssl, server_hostname=host if ssl is not None else None
                )
        except (OSError, TimeoutError) as exc:
            self.connecting = False
            if self.sent_at is not None:
                self.finish(None, f"HttpGetError: {type(exc).__name__}: {exc}")
            return
        self.connecting = False
        if self.closed:
            assert conn.transport is not None
            conn.transport.abort()
            return
        self.conn = conn
        if self.sent_at is not None and conn.transport is not None:
            self.reader.reset()
            conn.transport.write(self.request)

    def on_data(self, data: bytes) -> None:
        if self.sent_at is None:
            return  # unsolicited bytes
        try:
            result = self.reader.feed(data)
        except HttpGetError as exc:
            self.drop_connection()
            self.finish(None, f"HttpGetError: {exc}")
            return
        if result is not None:
            self.finish(result, "")

    def on_lost(self, exc: Exception | None) -> None:
        self.conn = None
        if self.sent_at is not None:
            self.finish(None, f"HttpGetError: connection closed: {exc or 'by peer'}")

    def check_deadline(self, now: float) -> None:
        if self.sent_at is not None and now - self.sent_at > self.collector.timeout:
            self.drop_connection()
            self.finish(None, f"HttpGetError: timed out after {self.collector.timeout:g}s")

    def drop_connection(self) -> None:
        conn = self.conn
        self.conn = None
        if conn is not None and conn.transport is not None:
            conn.transport.abort()

    def finish(self, result: tuple[int, bytes] | None, error: str) -> None:
        started = self.sent_at
        self.sent_at = None
        seconds = asyncio.get_running_loop().time() - started if started is not None else 0.0
        ok = self.collector.record(self, result, error, seconds)
        waiters, self.waiters = self.waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(ok)
        self.schedule_next()

    def close(self) -> None:
        self.closed = True
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        self.drop_connection()
        for w in self.waiters:
            if not w.done():
                w.cancel()
        self.waiters.clear()


class MetricsCollector:
    """Scrapes every endpoint of a :class:`Datastore` (see module docstring)."""

    def __init__(
        self,
        datastore: Datastore,
        *,
        interval: float = 0.05,
        timeout: float = 1.0,
        scheme: str = "http",
        path: str = "/metrics",
        insecure_skip_verify: bool = True,
        on_scrape: ScrapeHook | None = None,
    ) -> None:
        self.datastore = datastore
        self.interval = interval
        self.timeout = timeout
        self.scheme = scheme
        self.path = path if path.startswith("/") else "/" + path
        self.ssl_context = client_ssl_context(insecure_skip_verify) if scheme == "https" else None
        self._on_scrape = on_scrape
        self.tasks = TaskSet("scrape")
        self._scrapers: dict[str, _Scraper] = {}
        self._reaper: asyncio.TimerHandle | None = None
        self._started = False

    async def start(self) -> None:
        """Start scraping every known endpoint (and the timeout reaper)."""
        self._started = True
        self.sync()
        self._reap()

    def _reap(self) -> None:
        now = asyncio.get_running_loop().time()
        for s in list(self._scrapers.values()):
            s.check_deadline(now)
        self._reaper = asyncio.get_running_loop().call_later(min(self.interval, self.timeout / 4), self._reap)

    def sync(self) -> None:
        """Start scrapers for new endpoints and stop those of removed ones (call after the set changes)."""
        states = self.datastore.states
        for key in list(self._scrapers):
            if key not in states:
                self._scrapers.pop(key).close()
        if not self._started:
            return
        for key in states:
            if key not in self._scrapers:
                scraper = self._scrapers[key] = _Scraper(self, key)
                scraper.start()

    async def scrape_once(self, state: EndpointState) -> bool:
        """Scrape one endpoint now (or join its scrape in flight) and return whether it succeeded."""
        assert self._started, "start() first"
        scraper = self._scrapers.get(state.key)
        if scraper is None:
            scraper = self._scrapers[state.key] = _Scraper(self, state.key)
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        scraper.waiters.append(fut)
        if scraper.sent_at is None:
            if scraper.handle is not None:
                scraper.handle.cancel()
                scraper.handle = None
            scraper.send()
        return await fut

    def record(self, scraper: _Scraper, result: tuple[int, bytes] | None, error: str, seconds: float) -> bool:
        """Parse a response (or take the failure) and store it in the datastore; True on success."""
        state = self.datastore.get(scraper.key)
        if state is None:
            return False
        ok = False
        if result is not None:
            status, body = result
            try:
                if status != 200:
                    raise MetricsParseError(f"HTTP {status}")
                metrics = parse_metrics(body, state.engine, self.datastore.clock.now(), scraper.parse_cache)
            except MetricsParseError as exc:
                error = f"MetricsParseError: {exc}"
            else:
                if state.failures:
                    log.info("scrape %s%s recovered", state.key, self.path)
                self.datastore.record_scrape(state.key, metrics)
                ok = True
        if not ok:
            if state.failures == 0:  # log transitions, not every tick
                log.warning("scrape %s%s failed: %s", state.key, self.path, error)
            self.datastore.record_scrape(state.key, None, error)
        if self._on_scrape is not None:
            self._on_scrape(state.key, ok, seconds)
        return ok

    async def aclose(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        for s in self._scrapers.values():
            s.close()
        self._scrapers.clear()
        await self.tasks.aclose()
        self._started = False
