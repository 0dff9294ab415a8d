"""Connection-level attacks on the gateway's port and the picker's ``/metrics`` port, over real loopback
sockets: slow headers (slowloris), idle connections, descriptor exhaustion, a trickled streamed body.

Each test asserts that the offending connections are closed, that the process RSS grows by less than
``RSS_BOUND`` and that a well-behaved client alongside is answered within ``ANSWER_WITHIN`` seconds. The
limits are set small; the defaults are in docs/security.md.
"""

from __future__ import annotations

import asyncio
import resource
import time
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry
from test_gw_support import ScriptedPicker, backends, gateway_config, metric_value, running_gateway

from inferoute.epp.cli import _serve_metrics
from inferoute.httpguard import ConnectionLimits

RSS_BOUND = 64 * 1024 * 1024
ANSWER_WITHIN = 1.0
BODY = b'{"model": "llama-3", "prompt": "hi"}'
STREAMING_ROUTE: dict[str, Any] = {"bbr": {"enabled": False}, "epp": {"body": "headers_only"}}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _errors(registry: CollectorRegistry, cause: str) -> float:
    return metric_value(registry, "inferoute_gateway_errors_total", {"cause": cause})


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """Everything the server sent until it closed the connection (fails if it stays open)."""
    data = bytearray()
    deadline = time.monotonic() + seconds
    while True:
        try:
            chunk = await asyncio.wait_for(reader.read(65536), deadline - time.monotonic())
        except ConnectionResetError:
            return bytes(data)
        except TimeoutError:
            raise AssertionError(f"the connection was still open after {seconds} s") from None
        if not chunk:
            return bytes(data)
        data += chunk


async def _good_client(url: str, path: str = "/v1/completions") -> float:
    """One request on a new connection; how long it took (asserts 200)."""
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as s:
        if path == "/v1/completions":
            async with s.post(url + path, data=BODY, headers={"Content-Type": "application/json"}) as r:
                assert r.status == 200, await r.text()
                await r.read()
        else:
            async with s.get(url + path) as r:
                assert r.status == 200, await r.text()
                await r.read()
    return time.monotonic() - t0


async def test_slow_headers_are_cut_while_others_are_served() -> None:
    """Slowloris on the headers: connections that send nothing, or trickle a request line and headers,
    are closed after ``header_read_timeout`` (408 when part of a request had arrived), however much they
    trickle; a well-behaved client alongside is answered at once."""
    async with backends("a") as (a,):
        registry = CollectorRegistry()
        cfg = gateway_config([a], top={"limits": {"header_read_timeout": 0.4}})
        async with running_gateway(cfg, ScriptedPicker([a.key]), registry) as gw:
            port = _port(gw.url)
            rss0 = _rss()
            silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(20)]
            line = b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nX-Slow: "
            trickling = []
            for _ in range(20):
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(b"P")  # a request has begun: these get a 408
                trickling.append((r, w))
            t0 = time.monotonic()

            async def trickle(w: asyncio.StreamWriter) -> None:
                for i in range(1, 40):  # a byte every 50 ms: would take 2 s
                    if w.is_closing():
                        return
                    w.write(line[i : i + 1] if i < len(line) else b"a")
                    await asyncio.sleep(0.05)

            feeders = [asyncio.create_task(trickle(w)) for _, w in trickling]
            slowest = max([await _good_client(gw.url) for _ in range(5)])
            answers = [await _closed_within(r, 3.0) for r, _ in silent + trickling]
            elapsed = time.monotonic() - t0
            for f in feeders:
                f.cancel()
            for _, w in silent + trickling:
                w.close()
            assert slowest < ANSWER_WITHIN
            assert answers[:20] == [b""] * 20  # nothing sent, nothing answered
            assert all(x.startswith(b"HTTP/1.1 408 ") for x in answers[20:])
            assert 0.4 <= elapsed < 2.0
            assert _errors(registry, "header-timeout") == 40
            assert _rss() - rss0 < RSS_BOUND
            assert await _good_client(gw.url) < ANSWER_WITHIN
    assert len(a.requests) == 6


async def test_idle_keepalive_connections_are_closed_and_requests_per_connection_capped() -> None:
    async with backends("a") as (a,):
        cfg = gateway_config([a], top={"limits": {"idle_timeout": 0.3, "max_requests_per_connection": 3}})
        async with running_gateway(cfg, ScriptedPicker([a.key])) as gw:
            reader, writer = await asyncio.open_connection("127.0.0.1", _port(gw.url))
            one = b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n"
            writer.write(one * 4)  # pipelined: the third is answered with Connection: close, then EOF
            data = await _closed_within(reader, 3.0)
            writer.close()
            assert data.count(b"HTTP/1.1 200 ") == 3
            assert data.lower().count(b"connection: close") == 1
            reader, writer = await asyncio.open_connection("127.0.0.1", _port(gw.url))
            writer.write(one)
            t0 = time.monotonic()
            data = await _closed_within(reader, 3.0)  # answered, then idle: closed after idle_timeout
            writer.close()
            assert data.startswith(b"HTTP/1.1 200 ") and 0.2 < time.monotonic() - t0 < 2.0


async def test_descriptor_exhaustion_evicts_idle_connections() -> None:
    """Many more idle TCP connections than ``max_connections``: each new one replaces the longest-idle, so
    the count stays at the limit, descriptors stay free, and ``/readyz``, ``/metrics`` and requests are
    answered within a second throughout; connections all busy with requests → a new one is closed at once."""
    async with backends("a") as (a,):
        registry = CollectorRegistry()
        cfg = gateway_config([a], top={"limits": {"max_connections": 32}})
        async with running_gateway(cfg, ScriptedPicker([a.key]), registry) as gw:
            port = _port(gw.url)
            rss0 = _rss()
            fds0 = _open_descriptors()
            idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(400)]
            await asyncio.sleep(0.1)
            assert gw.open_connections <= 32
            assert _open_descriptors() - fds0 < 32 + 400 + 16  # ours (400) plus the gateway's (<= 32)
            for path in ("/readyz", "/metrics", "/v1/completions"):
                assert await _good_client(gw.url, path) < ANSWER_WITHIN
            closed = sum(await asyncio.gather(*(_eof_soon(r) for r, _ in idle)))
            for _, w in idle:
                w.close()
            assert closed >= 400 - 32
            assert _errors(registry, "connection-evicted") >= 400 - 32
            assert _rss() - rss0 < RSS_BOUND

            # every connection busy with a request: a new connection is closed at once
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
                busy = [asyncio.create_task(_slow(s, gw.url)) for _ in range(32)]
                while gw.open_connections < 32 or gw.handler.in_flight < 32:  # noqa: ASYNC110 - no event
                    await asyncio.sleep(0.01)
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
                assert await _closed_within(r, 1.0) == b""
                w.close()
                assert [await t for t in busy] == [200] * 32
            assert _errors(registry, "connection-refused") >= 1
            assert await _good_client(gw.url) < ANSWER_WITHIN


async def _slow(s: aiohttp.ClientSession, url: str) -> int:
    async with s.post(url + "/v1/slow?s=1", data=BODY) as r:
        await r.read()
        return r.status


async def _eof_soon(r: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(r.read(1), 0.5) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _open_descriptors() -> int:
    import os

    return len(os.listdir("/proc/self/fd"))


async def test_trickled_streamed_body_gets_408_and_frees_its_slot() -> None:
    """A chunked body streamed to the model server as it arrives (no BBR, picker without body) must arrive
    whole within ``body_read_timeout``: a client trickling it gets 408, the upstream request is cut."""
    async with backends("a") as (a,):
        registry = CollectorRegistry()
        cfg = gateway_config([a], top={"limits": {"body_read_timeout": 0.5}}, **STREAMING_ROUTE)
        async with running_gateway(cfg, ScriptedPicker([a.key]), registry) as gw:
            slow = []
            for _ in range(10):
                reader, writer = await asyncio.open_connection("127.0.0.1", _port(gw.url))
                writer.write(
                    b"POST /v1/upload HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"5\r\nhello\r\n"
                )
                slow.append((reader, writer))

            async def trickle() -> None:
                for _ in range(40):
                    for _, w in slow:
                        if not w.is_closing():
                            w.write(b"1\r\nx\r\n")
                    await asyncio.sleep(0.05)

            feeder = asyncio.create_task(trickle())
            t0 = time.monotonic()
            assert await _good_client(gw.url) < ANSWER_WITHIN
            heads = [await asyncio.wait_for(r.readline(), 3) for r, _ in slow]
            elapsed = time.monotonic() - t0
            feeder.cancel()
            for _, w in slow:
                w.close()
            assert all(b" 408 " in h for h in heads), heads
            assert elapsed < 2.0
            assert _errors(registry, "body-timeout") == 10
            assert gw.handler.in_flight == 0


async def test_picker_metrics_port_survives_descriptor_exhaustion() -> None:
    """The picker's ``/metrics`` port: idle connections beyond its limit evict each other; slow headers
    are cut; ``/metrics`` and ``/readyz`` keep answering."""
    registry = CollectorRegistry()
    limits = ConnectionLimits(header_timeout=0.3, idle_timeout=5.0, max_connections=16)
    site = await _serve_metrics(registry, "127.0.0.1", 0, lambda: True, limits)
    try:
        url = f"http://127.0.0.1:{site.port}"
        rss0 = _rss()
        idle = [await asyncio.open_connection("127.0.0.1", site.port) for _ in range(200)]
        for path in ("/metrics", "/readyz"):
            assert await _good_client(url, path) < ANSWER_WITHIN
        assert site.web_server.open_connections <= 16
        answers = [await _closed_within(r, 2.0) for r, _ in idle]  # evicted, or cut by the header timeout
        assert answers == [b""] * 200
        for _, w in idle:
            w.close()
        assert site.web_server.events["connection-evicted"] >= 200 - 16
        assert _rss() - rss0 < RSS_BOUND
    finally:
        await site.aclose()
