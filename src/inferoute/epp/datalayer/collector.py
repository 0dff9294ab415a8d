"""The metrics collector: scrape every endpoint's Prometheus page on a short tick.

Every endpoint has its own :class:`_Scraper`, a small state machine driven by event-loop callbacks on one
keep-alive connection: the pre-built GET goes out with one ``transport.write``, ``data_received`` frames the
response (:mod:`.httpget`), parses it and records the snapshot. No task, coroutine, future or timer handle
exists per scrape (only connecting runs as a task), which is what makes 100 endpoints x 20 Hz affordable in
Python (see docs/benchmarks/scheduler.md).

Timing is one **wheel** for the whole pool: the interval is cut into ``slots`` ticks (see
:func:`wheel_slots`) and each endpoint owns one slot (a hash of its key), so the pool's scrapes are spread
over the interval and one timer callback sends the requests of several endpoints. An endpoint whose previous
scrape is still in flight when its slot comes round is skipped: a slow or dead pod only delays itself. Every
tick also enforces the timeout of the scrapes in flight, connecting included (at most one tick late). The
ticks run on an injected :class:`~inferoute.clock.Timer` (the event loop in production), so tests move time
by hand.

A page whose bytes did not change since the endpoint's last successful scrape (an idle server, or a
filtered ``/metrics?name[]=...`` page) is not parsed again: the previous values are re-stamped.
"""

from __future__ import annotations

import asyncio
import logging
import math
import zlib
from collections.abc import Callable

import xxhash

from inferoute.clock import Cancellable, Timer
from inferoute.epp.datalayer.datastore import Datastore, EndpointState
from inferoute.epp.datalayer.httpget import HttpGetError, ResponseReader, client_ssl_context
from inferoute.epp.datalayer.metrics import (
    EndpointMetrics,
    EngineMapping,
    MetricsParseError,
    ParseCache,
    parse_metrics,
    restamp,
)
from inferoute.tasks import TaskSet

log = logging.getLogger(__name__)

ScrapeHook = Callable[[str, bool, float], None]
"""Called after every scrape with (endpoint key, ok, seconds)."""

MIN_TICK = 0.002
"""Shortest wheel tick (seconds): the event loop's timers have millisecond resolution."""


TICK_BATCH = 10
"""Endpoints per wheel tick the wheel aims for. Requests sent together are answered together, and the event
loop then takes several responses per wake-up: at 100 endpoints x 20 Hz, 10 per tick cost ~55 µs per scrape,
2 ms ticks of ~4 cost ~90 µs, 20 per tick ~48 µs (docs/benchmarks/scheduler.md). Larger batches are cheaper
but each is a longer burst of callbacks on the loop the picks share (~0.5 ms for 10)."""


def wheel_slots(interval: float, timeout: float, endpoints: int) -> int:
    """Ticks per interval: about :data:`TICK_BATCH` endpoints per tick; more ticks when the timeout is short
    against the interval (timeouts are enforced on ticks, so a tick is at most a quarter of the timeout);
    never ticks shorter than :data:`MIN_TICK`."""
    wanted = max(1, math.ceil(endpoints / TICK_BATCH))
    if timeout > 0:
        wanted = max(wanted, math.ceil(4 * interval / timeout))
    return max(1, min(wanted, int(interval / MIN_TICK)))


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
    """Scrape state of one endpoint: connection, pending request, parse cache, last page digest."""

    __slots__ = (
        "closed",
        "collector",
        "conn",
        "connecting",
        "digest",
        "key",
        "last",
        "parse_cache",
        "reader",
        "request",
        "sent_at",
        "slot",
        "spread",
        "waiters",
    )

    def __init__(self, collector: MetricsCollector, key: str) -> None:
        self.collector = collector
        self.key = key
        self.spread = zlib.crc32(key.encode())
        """Stable hash of the key: the wheel slot is ``spread % slots``."""
        self.slot = self.spread % collector.slots
        self.conn: _Conn | None = None
        self.connecting: asyncio.Task[None] | None = None
        """The connect in progress (its deadline is the scrape's, enforced by the ticks like any other)."""
        self.reader = ResponseReader()
        self.sent_at: float | None = None
        """Loop time the pending scrape started (None: idle)."""
        self.parse_cache = ParseCache()
        self.digest = -1
        """xxh3 of the last page that parsed successfully (-1: none)."""
        self.last: tuple[EngineMapping, EndpointMetrics] | None = None
        """What that page parsed to, and with which engine mapping."""
        self.waiters: list[asyncio.Future[bool]] = []
        self.closed = False
        host, port = self._address()
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.request = (
            f"GET {collector.path} HTTP/1.1\r\nHost: {authority}\r\nAccept: text/plain\r\n"
            "Accept-Encoding: identity\r\nUser-Agent: inferoute-epp\r\n\r\n"
        ).encode("latin-1")

    def _address(self) -> tuple[str, int]:
        state = self.collector.datastore.get(self.key)
        assert state is not None
        return state.endpoint.address.strip("[]"), state.endpoint.port

    # -- one scrape ---------------------------------------------------------------------------------------
    def send(self, now: float) -> None:
        """Start a scrape (the caller checked that none is in flight)."""
        self.sent_at = now
        self.collector.inflight[self.key] = self
        conn = self.conn
        if conn is None or conn.transport is None:
            if self.connecting is None:
                self.connecting = self.collector.tasks.spawn(self._connect(), name=f"connect:{self.key}")
            return
        self.reader.reset()
        conn.transport.write(self.request)

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = self._address()
        ssl = self.collector.ssl_context
        conn = _Conn(self)
        try:
            await loop.create_connection(
                lambda: conn, host, port, ssl=ssl, server_hostname=host if ssl is not None else None
            )
        except asyncio.CancelledError:  # given up (cancel_connect): a connection made meanwhile is closed
            if conn.transport is not None:
                conn.transport.abort()
            raise
        except OSError as exc:
            self.connecting = None
            if self.sent_at is not None:
                self.finish(None, f"HttpGetError: {type(exc).__name__}: {exc}")
            return
        self.connecting = None
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
            self.cancel_connect()
            self.drop_connection()
            self.finish(None, f"HttpGetError: timed out after {self.collector.timeout:g}s")

    def cancel_connect(self) -> None:
        """Give up a connect in progress (a connection it made anyway is closed, its events ignored)."""
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None

    def drop_connection(self) -> None:
        conn = self.conn
        self.conn = None
        if conn is not None and conn.transport is not None:
            conn.transport.abort()

    def finish(self, result: tuple[int, bytes] | None, error: str) -> None:
        started = self.sent_at
        self.sent_at = None
        collector = self.collector
        collector.inflight.pop(self.key, None)
        seconds = collector.loop_time() - started if started is not None else 0.0
        ok = collector.record(self, result, error, seconds)
        if self.waiters:
            waiters, self.waiters = self.waiters, []
            for w in waiters:
                if not w.done():
                    w.set_result(ok)

    def close(self) -> None:
        self.closed = True
        self.collector.inflight.pop(self.key, None)
        self.cancel_connect()
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
        timer: Timer | None = None,
    ) -> None:
        """``timer``: the time ticks and timeouts run on (default: the running event loop; tests pass a
        :class:`~inferoute.clock.ManualTimer`). Connecting is bounded by the event loop's own time."""
        self.datastore = datastore
        self.interval = interval
        self.timeout = timeout
        self.scheme = scheme
        self.path = path if path.startswith("/") else "/" + path
        self.ssl_context = client_ssl_context(insecure_skip_verify) if scheme == "https" else None
        self._on_scrape = on_scrape
        self.tasks = TaskSet("scrape")
        self.slots = wheel_slots(interval, timeout, len(datastore.states))
        self.tick_seconds = interval / self.slots
        self._wheel: list[dict[str, _Scraper]] = [{} for _ in range(self.slots)]
        self._scrapers: dict[str, _Scraper] = {}
        self.inflight: dict[str, _Scraper] = {}
        """Scrapers with a request in flight (whose timeouts the ticks enforce)."""
        self._next: Cancellable | None = None
        self._given_timer = timer
        self._timer: Timer | None = None
        self._next_tick = 0.0
        self._slot = 0
        self._started = False

    def loop_time(self) -> float:
        assert self._timer is not None, "start() first"
        return self._timer.time()

    async def start(self) -> None:
        """Start scraping every known endpoint (each one at once, then in its slot of the wheel)."""
        self._timer = self._given_timer or asyncio.get_running_loop()
        self._started = True
        self._next_tick = self._timer.time()
        self.sync()
        self._tick()

    def _tick(self) -> None:
        """One wheel tick: time out overdue scrapes, start the idle ones of this slot, schedule the next."""
        timer = self._timer
        assert timer is not None
        now = timer.time()
        if self.inflight:
            timeout = self.timeout
            for scraper in [s for s in self.inflight.values() if now - (s.sent_at or now) > timeout]:
                scraper.check_deadline(now)
        for scraper in self._wheel[self._slot].values():
            if scraper.sent_at is None:
                scraper.send(now)
        self._slot = (self._slot + 1) % self.slots
        step = self.tick_seconds
        self._next_tick += step
        if self._next_tick <= now:  # the loop was blocked: skip the missed ticks instead of bursting
            missed = math.floor((now - self._next_tick) / step) + 1
            self._next_tick += missed * step
            self._slot = (self._slot + missed) % self.slots
        self._next = timer.call_at(self._next_tick, self._tick)

    def sync(self) -> None:
        """Start scrapers for new endpoints and stop those of removed ones (call after the set changes)."""
        states = self.datastore.states
        for key in list(self._scrapers):
            if key not in states:
                scraper = self._scrapers.pop(key)
                self._wheel[scraper.slot].pop(key, None)
                scraper.close()
        if not self._started:
            return
        slots = wheel_slots(self.interval, self.timeout, len(states))
        if slots != self.slots:
            self._resize(slots)
        now = self.loop_time()
        for key in states:
            if key not in self._scrapers:
                scraper = self._add(key)
                if scraper.sent_at is None:
                    scraper.send(now)  # first scrape now: readiness should not wait for the slot

    def _resize(self, slots: int) -> None:
        """Re-cut the wheel for a new pool size (scrapers keep their hash, so most move together)."""
        self.slots = slots
        self.tick_seconds = self.interval / slots
        self._wheel = [{} for _ in range(slots)]
        for key, scraper in self._scrapers.items():
            scraper.slot = scraper.spread % slots
            self._wheel[scraper.slot][key] = scraper
        self._slot %= slots

    def _add(self, key: str) -> _Scraper:
        scraper = self._scrapers[key] = _Scraper(self, key)
        self._wheel[scraper.slot][key] = scraper
        return scraper

    async def scrape_once(self, state: EndpointState) -> bool:
        """Scrape one endpoint now (or join its scrape in flight) and return whether it succeeded."""
        assert self._started, "start() first"
        scraper = self._scrapers.get(state.key)
        if scraper is None:
            scraper = self._add(state.key)
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        scraper.waiters.append(fut)
        if scraper.sent_at is None:
            scraper.send(self.loop_time())
        return await fut

    def record(self, scraper: _Scraper, result: tuple[int, bytes] | None, error: str, seconds: float) -> bool:
        """Parse a response (or take the failure) and store it in the datastore; True on success."""
        state = self.datastore.get(scraper.key)
        if state is None:
            return False
        ok = False
        if result is not None:
            status, body = result
            now = self.datastore.clock.now()
            try:
                if status != 200:
                    raise MetricsParseError(f"HTTP {status}")
                digest = xxhash.xxh3_64_intdigest(body)
                last = scraper.last
                if digest == scraper.digest and last is not None and last[0] is state.engine:
                    metrics = restamp(last[1], now)  # same page as last time: same values
                else:
                    metrics = parse_metrics(body, state.engine, now, scraper.parse_cache)
                    scraper.digest = digest
                    scraper.last = (state.engine, metrics)
            except MetricsParseError as exc:
                error = f"MetricsParseError: {exc}"
                scraper.digest = -1
            else:
                if state.failures:
                    log.info("scrape %s%s recovered", state.key, self.path)
                self.datastore.record_scrape(state.key, metrics, now=now)
                ok = True
        if not ok:
            if state.failures == 0:  # log transitions, not every tick
                log.warning("scrape %s%s failed: %s", state.key, self.path, error)
            self.datastore.record_scrape(state.key, None, error)
        if self._on_scrape is not None:
            self._on_scrape(state.key, ok, seconds)
        return ok

    async def aclose(self) -> None:
        if self._next is not None:
            self._next.cancel()
            self._next = None
        for s in self._scrapers.values():
            s.close()
        self._scrapers.clear()
        for slot in self._wheel:
            slot.clear()
        self.inflight.clear()
        await self.tasks.aclose()
        self._started = False
