"""The metrics collector: scrape every endpoint's Prometheus page on a short tick.

Each endpoint has its own loop (scrape, then sleep until its next tick), so a slow or dead pod only delays
itself; each scrape has its own timeout. Loops are started and stopped as the endpoint set changes. Each loop
keeps one keep-alive connection (:class:`~.httpget.HttpGetter`) and a :class:`~.metrics.ParseCache`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import Callable
from typing import Any

from inferoute.epp.datalayer.datastore import Datastore, EndpointState
from inferoute.epp.datalayer.httpget import HttpGetError, HttpGetter, client_ssl_context
from inferoute.epp.datalayer.metrics import MetricsParseError, ParseCache, parse_metrics
from inferoute.tasks import TaskSet

log = logging.getLogger(__name__)

ScrapeHook = Callable[[str, bool, float], None]
"""Called after every scrape with (endpoint key, ok, seconds)."""


class MetricsCollector:
    """Owns one scrape loop per endpoint of a :class:`Datastore`."""

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
        self._on_scrape = on_scrape
        self._tasks = TaskSet("scrape")
        self._loops: dict[str, asyncio.Task[Any]] = {}
        self._getters: dict[str, HttpGetter] = {}
        self._caches: dict[str, ParseCache] = {}
        self._ssl = client_ssl_context(insecure_skip_verify) if scheme == "https" else None
        self._started = False

    async def start(self) -> None:
        """Start one loop per known endpoint."""
        self._started = True
        self.sync()

    def sync(self) -> None:
        """Start loops for new endpoints and cancel loops of removed ones (call after the set changes)."""
        states = self.datastore.states
        for key in list(self._loops):
            if key not in states:
                self._loops.pop(key).cancel()
                getter = self._getters.pop(key, None)
                if getter is not None:
                    getter.close()
                self._caches.pop(key, None)
        for key in states:
            if key not in self._loops:
                self._loops[key] = self._tasks.spawn(self._loop(key), name=key)

    async def _loop(self, key: str) -> None:
        """Scrape ``key`` now, then every ``interval`` at a per-endpoint phase, so the pool's scrapes spread
        over the interval instead of arriving as one burst (the event loop is shared with picks)."""
        loop = asyncio.get_running_loop()
        next_at = loop.time() + (zlib.crc32(key.encode()) % 1000) / 1000 * self.interval
        while True:
            state = self.datastore.get(key)
            if state is None:
                return
            await self.scrape_once(state)
            now = loop.time()
            while next_at <= now:  # overran (slow pod): skip missed ticks instead of bursting
                next_at += self.interval
            await asyncio.sleep(next_at - now)

    def _getter(self, state: EndpointState) -> HttpGetter:
        getter = self._getters.get(state.key)
        if getter is None:
            ep = state.endpoint
            getter = self._getters[state.key] = HttpGetter(
                ep.address, ep.port, self.path, timeout=self.timeout, ssl_context=self._ssl
            )
        return getter

    async def scrape_once(self, state: EndpointState) -> bool:
        """Scrape one endpoint now and record the result; True on success."""
        assert self._started, "start() first"
        t0 = time.perf_counter()
        ok = False
        cache = self._caches.get(state.key)
        if cache is None:
            cache = self._caches[state.key] = ParseCache()
        try:
            status, body = await self._getter(state).get()
            if status != 200:
                raise MetricsParseError(f"HTTP {status}")
            metrics = parse_metrics(body, state.engine, self.datastore.clock.now(), cache)
        except (HttpGetError, MetricsParseError) as exc:
            error = f"{type(exc).__name__}: {exc}"
            if state.failures == 0:  # log transitions, not every tick
                log.warning("scrape %s%s failed: %s", state.key, self.path, error)
            self.datastore.record_scrape(state.key, None, error)
        else:
            if state.failures:
                log.info("scrape %s%s recovered", state.key, self.path)
            self.datastore.record_scrape(state.key, metrics)
            ok = True
        if self._on_scrape is not None:
            self._on_scrape(state.key, ok, time.perf_counter() - t0)
        return ok

    async def aclose(self) -> None:
        await self._tasks.aclose()
        self._loops.clear()
        for getter in self._getters.values():
            getter.close()
        self._getters.clear()
