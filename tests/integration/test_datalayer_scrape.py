"""The metrics collector over real HTTP: concurrency, per-endpoint timeouts, failures, engines.

The scrapes go over real sockets, but the wheel's ticks and timeouts run on a :class:`ManualTimer`: a test
moves time one tick at a time and waits (:class:`Scrapes`) until every scrape in flight has answered, so
rates are exact counts, whatever the machine's load.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from inferoute.clock import ManualTimer, SystemClock
from inferoute.endpoints import Endpoint
from inferoute.epp.datalayer.collector import MetricsCollector
from inferoute.epp.datalayer.datastore import Datastore

VLLM = b"vllm:num_requests_waiting 2\nvllm:num_requests_running 5\nvllm:kv_cache_usage_perc 0.25\n"
SGLANG = b"sglang:num_queue_reqs 1\nsglang:num_running_reqs 3\nsglang:token_usage 0.5\n"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Servers:
    def __init__(self) -> None:
        self.runners: list[web.AppRunner] = []
        self.hits: dict[str, int] = {}

    async def add(self, name: str, handler: Handler, labels: dict[str, str] | None = None) -> Endpoint:
        async def counted(request: web.Request) -> web.StreamResponse:
            self.hits[name] = self.hits.get(name, 0) + 1
            return await handler(request)

        app = web.Application()
        app.router.add_get("/metrics", counted)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.runners.append(runner)
        port = runner.addresses[0][1]
        return Endpoint(name, "127.0.0.1", port, labels or {})


class Scrapes:
    """The ``on_scrape`` hook of a collector on a manual timer: records (key, ok) and lets a test wait until
    no scrape is in flight, then move time by whole ticks."""

    def __init__(self, timer: ManualTimer) -> None:
        self.timer = timer
        self.results: list[tuple[str, bool]] = []
        self.collector: MetricsCollector | None = None
        self._idle = asyncio.Event()

    def hook(self, key: str, ok: bool, seconds: float) -> None:
        self.results.append((key, ok))
        self._idle.set()

    def ok(self, key: str) -> int:
        return sum(1 for k, ok in self.results if k == key and ok)

    def failed(self, key: str) -> int:
        return sum(1 for k, ok in self.results if k == key and not ok)

    async def settle(self, key: str | None = None) -> None:
        """Wait (on real I/O; the bound is only a guard) until no scrape is in flight (of ``key``, or any)."""
        inflight = self.collector.inflight if self.collector is not None else {}
        while (key in inflight) if key is not None else inflight:
            self._idle.clear()
            await asyncio.wait_for(self._idle.wait(), 20)

    async def ticks(self, n: int, *, settle: bool = True) -> None:
        """``n`` wheel ticks, each followed (by default) by waiting for its scrapes."""
        assert self.collector is not None
        for _ in range(n):
            self.timer.advance(self.collector.tick_seconds)
            if settle:
                await self.settle()


def manual_collector(endpoints: list[Endpoint], **kw: float) -> tuple[Datastore, MetricsCollector, Scrapes]:
    """A datastore and a collector whose snapshots, ticks and timeouts all run on one manual timer."""
    timer = ManualTimer(1000.0, early=0.0005)  # timers fire up to a clock tick early: so does this one
    ds = Datastore(timer)
    ds.set_endpoints(endpoints)
    scrapes = Scrapes(timer)
    collector = MetricsCollector(ds, on_scrape=scrapes.hook, timer=timer, **kw)
    scrapes.collector = collector
    return ds, collector, scrapes


@pytest.fixture
async def servers() -> AsyncIterator[Servers]:
    s = Servers()
    try:
        yield s
    finally:
        for r in s.runners:
            await r.cleanup()


def page(body: bytes) -> Handler:
    async def h(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="text/plain")

    return h


async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(5)
    return web.Response(body=VLLM)


async def broken(request: web.Request) -> web.Response:
    return web.Response(status=500, text="boom")


async def chunked_and_close(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Connection": "close"})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    for part in (VLLM[:20], VLLM[20:50], VLLM[50:]):
        await resp.write(part)
    await resp.write_eof()
    return resp


async def test_slow_pod_delays_no_one(servers: Servers) -> None:
    fast = await servers.add("fast", page(VLLM))
    lazy = await servers.add("slow", slow)  # answers after 5 s of real time: never within the timeout
    ds, collector, scrapes = manual_collector([fast, lazy], interval=0.05, timeout=0.28)
    await collector.start()
    try:
        assert collector.slots == 1
        await scrapes.settle(fast.key)
        for _ in range(20):  # one second: the slow scrape stays in flight until its timeout
            scrapes.timer.advance(collector.tick_seconds)
            await scrapes.settle(fast.key)
    finally:
        await collector.aclose()
    assert scrapes.ok(fast.key) == 21, "the fast endpoint missed its slot beside a slow one"
    # sent at 0; timed out (and sent again) on the ticks at 0.3, 0.6 and 0.9 s
    assert scrapes.failed(lazy.key) == 3 and scrapes.ok(lazy.key) == 0
    fast_state, slow_state = ds.get(fast.key), ds.get(lazy.key)
    assert fast_state is not None and slow_state is not None
    assert fast_state.metrics.running == 5 and slow_state.last_ok is None
    assert "timed out" in slow_state.last_error
    assert ds.ready()  # the slow one was tried


async def test_http_errors_and_engine_labels(servers: Servers) -> None:
    err = await servers.add("err", broken)
    sg = await servers.add("sg", page(SGLANG), {"inference.networking.k8s.io/engine-type": "sglang"})
    garbage = await servers.add("garbage", page(b"hello world\n"))
    ds = Datastore(SystemClock())
    ds.set_endpoints([err, sg, garbage])
    collector = MetricsCollector(ds, interval=0.05, timeout=0.5)
    await collector.start()
    try:
        for key in (err.key, sg.key, garbage.key):
            state = ds.get(key)
            assert state is not None
            ok = await collector.scrape_once(state)
            assert ok is (key == sg.key)
    finally:
        await collector.aclose()
    assert "HTTP 500" in ds.get(err.key).last_error  # type: ignore[union-attr]
    assert "missing metric" in ds.get(garbage.key).last_error  # type: ignore[union-attr]
    m = ds.get(sg.key).metrics  # type: ignore[union-attr]
    assert (m.waiting, m.running, m.kv_usage) == (1, 3, 0.5)


async def test_sync_follows_the_endpoint_set(servers: Servers) -> None:
    a = await servers.add("a", page(VLLM))
    b = await servers.add("b", page(VLLM))
    ds, collector, scrapes = manual_collector([a], interval=0.02, timeout=0.5)
    await collector.start()
    try:
        await scrapes.settle()
        await scrapes.ticks(5)
        assert servers.hits == {"a": 6}
        ds.set_endpoints([b])
        collector.sync()  # b is scraped at once, a no more
        await scrapes.settle()
        await scrapes.ticks(5)
        assert servers.hits == {"a": 6, "b": 6}
    finally:
        await collector.aclose()


async def test_chunked_responses_and_server_side_close(servers: Servers) -> None:
    ep = await servers.add("chunky", chunked_and_close)
    ds = Datastore(SystemClock())
    ds.set_endpoints([ep])
    collector = MetricsCollector(ds, interval=0.05, timeout=1.0)
    await collector.start()
    try:
        state = ds.get(ep.key)
        assert state is not None
        for _ in range(3):  # the server closes after each response: every scrape reconnects
            assert await collector.scrape_once(state), state.last_error
        assert state.metrics.running == 5 and state.metrics.kv_usage == 0.25
    finally:
        await collector.aclose()


async def test_connection_refused_is_a_failed_scrape(refused_port: Callable[[], int]) -> None:
    ds = Datastore(SystemClock())
    ep = Endpoint("gone", "127.0.0.1", refused_port())
    ds.set_endpoints([ep])
    collector = MetricsCollector(ds, interval=0.05, timeout=1.0)
    await collector.start()
    try:
        state = ds.get(ep.key)
        assert state is not None
        assert not await collector.scrape_once(state)
        assert state.failures >= 1 and "HttpGetError" in state.last_error
    finally:
        await collector.aclose()


async def test_a_connect_that_hangs_times_out_on_the_wheel() -> None:
    """A listener whose accept queue is full drops SYNs: connecting hangs, and the scrape's deadline (on the
    collector's timer, like any other) ends it."""
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(4):  # fill the accept queue (never accepted)
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        ep = Endpoint("hung", "127.0.0.1", port)
        ds, collector, scrapes = manual_collector([ep], interval=0.05, timeout=0.28)
        await collector.start()
        try:
            await scrapes.ticks(5, settle=False)
            assert scrapes.results == []  # still connecting at 0.25 s
            await scrapes.ticks(1, settle=False)  # the deadline is enforced in the tick itself
            state = ds.get(ep.key)
            assert state is not None
            assert scrapes.results == [(ep.key, False)] and "timed out" in state.last_error
        finally:
            await collector.aclose()
    finally:
        for s in (*fillers, listener):
            s.close()


def test_collector_under_uvloop() -> None:
    """Production runs on uvloop, whose transports are not asyncio.Transport subclasses."""
    import uvloop

    async def scenario() -> tuple[bool, float]:
        servers = Servers()
        try:
            ep = await servers.add("uv", page(VLLM))
            ds = Datastore(SystemClock())
            ds.set_endpoints([ep])
            collector = MetricsCollector(ds, interval=0.05, timeout=1.0)
            await collector.start()
            try:
                state = ds.get(ep.key)
                assert state is not None
                ok = await collector.scrape_once(state) and await collector.scrape_once(state)
                return ok, state.metrics.running
            finally:
                await collector.aclose()
        finally:
            for r in servers.runners:
                await r.cleanup()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(scenario()) == (True, 5.0)


async def test_scrape_rate_matches_the_interval(servers: Servers) -> None:
    """Fast responses must not make a tick fire twice (timers may run up to a clock tick early)."""
    eps = [await servers.add(f"r{i}", page(VLLM)) for i in range(5)]
    _, collector, scrapes = manual_collector(eps, interval=0.05, timeout=1.0)
    await collector.start()
    try:
        await scrapes.settle()
        assert len(scrapes.results) == 5  # each endpoint at once on start
        await scrapes.ticks(20)  # one second, every tick fired early (the manual timer's ``early``)
        assert collector.slots == 1 and all(scrapes.ok(ep.key) == 21 for ep in eps), scrapes.results
        await scrapes.ticks(20, settle=False)  # no answer comes in between: no tick sends a second request
        await scrapes.settle()
    finally:
        await collector.aclose()
    assert sum(servers.hits.values()) == len(scrapes.results) == 5 * 22


async def test_unchanged_page_is_restamped_and_a_changed_one_parsed(servers: Servers) -> None:
    """An identical page skips the parser but still refreshes the snapshot's time; a new page is parsed."""
    body = {"page": VLLM}

    async def current(request: web.Request) -> web.Response:
        return web.Response(body=body["page"], content_type="text/plain")

    ep = await servers.add("idle", current)
    ds, collector, scrapes = manual_collector([ep], interval=10.0, timeout=1.0)  # only the scrapes we ask for
    await collector.start()
    try:
        state = ds.get(ep.key)
        assert state is not None
        await scrapes.settle()
        assert await collector.scrape_once(state)
        first = state.metrics
        scrapes.timer.advance(0.01)
        assert await collector.scrape_once(state)
        second = state.metrics
        assert second is not first and second.scraped_at > first.scraped_at
        assert (second.waiting, second.running, second.kv_usage) == (2, 5, 0.25)
        body["page"] = VLLM.replace(b"running 5", b"running 9")
        assert await collector.scrape_once(state)
        assert state.metrics.running == 9
        body["page"] = b"vllm:num_requests_waiting 2\n"  # broken page: failure, then the good page again
        assert not await collector.scrape_once(state)
        body["page"] = VLLM
        assert await collector.scrape_once(state)
        assert state.metrics.running == 5 and state.failures == 0
    finally:
        await collector.aclose()


async def test_request_asks_for_identity_encoding(servers: Servers) -> None:
    seen: list[str] = []

    async def h(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Accept-Encoding", ""))
        return web.Response(body=VLLM, content_type="text/plain")

    ep = await servers.add("enc", h)
    ds = Datastore(SystemClock())
    ds.set_endpoints([ep])
    collector = MetricsCollector(ds, interval=10.0, timeout=1.0)
    await collector.start()
    try:
        state = ds.get(ep.key)
        assert state is not None
        assert await collector.scrape_once(state)
    finally:
        await collector.aclose()
    assert seen and set(seen) == {"identity"}


async def test_server_restart_reconnects() -> None:
    """A model server that restarts on the same port: scrapes fail while it is down, then recover on a new
    connection."""

    async def serve(port: int) -> web.AppRunner:
        app = web.Application()
        app.router.add_get("/metrics", page(VLLM))
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return runner

    runner = await serve(0)
    port = runner.addresses[0][1]
    ep = Endpoint("phoenix", "127.0.0.1", port)
    ds, collector, scrapes = manual_collector([ep], interval=0.05, timeout=0.5)
    await collector.start()
    try:
        state = ds.get(ep.key)
        assert state is not None
        assert await collector.scrape_once(state)
        await runner.cleanup()
        assert not await collector.scrape_once(state)
        assert "HttpGetError" in state.last_error
        runner = await serve(port)  # the port was ours a moment ago (SO_REUSEADDR: no TIME_WAIT wait)
        await scrapes.ticks(1)  # the wheel's next scrape reconnects on its own
        assert state.failures == 0 and state.metrics.running == 5
    finally:
        await collector.aclose()
        await runner.cleanup()


async def test_wheel_grows_with_the_pool(servers: Servers) -> None:
    """The wheel is re-cut when the pool grows; every endpoint keeps being scraped at the interval."""
    eps = [await servers.add(f"w{i}", page(VLLM)) for i in range(25)]
    ds, collector, scrapes = manual_collector(eps[:1], interval=0.05, timeout=1.0)
    await collector.start()
    try:
        assert collector.slots == 1
        ds.set_endpoints(eps)
        collector.sync()
        assert collector.slots == 3
        await scrapes.ticks(3)  # the tick already scheduled comes at the old step: one interval to re-cut
        before = dict(servers.hits)
        await scrapes.ticks(3 * 10)  # ten intervals
        rates = [servers.hits.get(ep.name, 0) - before.get(ep.name, 0) for ep in eps]
    finally:
        await collector.aclose()
    assert rates == [10] * 25  # once per interval each, in its own slot
