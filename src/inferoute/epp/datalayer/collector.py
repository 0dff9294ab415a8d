"""The metrics collector: scrape every endpoint's Prometheus page on a short tick.

Each endpoint has its own loop (scrape, then sleep until its next tick), so a slow or dead pod only delays
itself; each scrape has its own timeout. Loops are started and stopped as the endpoint set changes. One shared
aiohttp session keeps a keep-alive connection per endpoint.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from inferoute.epp.datalayer.datastore import Datastore, EndpointState
from inferoute.epp.datalayer.metrics import MetricsParseError, parse_metrics
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
        self._session: aiohttp.ClientSession | None = None
        self._first_round: asyncio.Event = asyncio.Event()

    async def start(self) -> None:
        """Open the HTTP session and start one loop per known endpoint."""
        connector = aiohttp.TCPConnector(limit=0, ssl=False, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )
        self.sync()

    def sync(self) -> None:
        """Start loops for new endpoints and cancel loops of removed ones (call after the set changes)."""
        states = self.datastore.states
        for key in list(self._loops):
            if key not in states:
                self._loops.pop(key).cancel()
        for key, state in states.items():
            if key not in self._loops:
                self._loops[key] = self._tasks.spawn(self._loop(state), name=key)

    async def _loop(self, state: EndpointState) -> None:
        url = f"{self.scheme}://{state.key}{self.path}"
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            await self.scrape_once(state, url)
            next_at += self.interval
            now = loop.time()
            if next_at < now:  # overran (slow pod): skip missed ticks instead of bursting
                next_at = now
            await asyncio.sleep(next_at - now)

    async def scrape_once(self, state: EndpointState, url: str | None = None) -> bool:
        """Scrape one endpoint now and record the result; True on success."""
        assert self._session is not None, "start() first"
        url = url or f"{self.scheme}://{state.key}{self.path}"
        t0 = time.perf_counter()
        ok = False
        try:
            async with self._session.get(url) as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise MetricsParseError(f"HTTP {resp.status}")
            metrics = parse_metrics(body, state.engine, self.datastore.clock.now())
        except (aiohttp.ClientError, TimeoutError, MetricsParseError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
            if state.failures == 0:  # log transitions, not every tick
                log.warning("scrape %s failed: %s", url, error)
            self.datastore.record_scrape(state.key, None, error)
        else:
            if state.failures:
                log.info("scrape %s recovered", url)
            self.datastore.record_scrape(state.key, metrics)
            ok = True
        if self._on_scrape is not None:
            self._on_scrape(state.key, ok, time.perf_counter() - t0)
        return ok

    async def aclose(self) -> None:
        await self._tasks.aclose()
        self._loops.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None
