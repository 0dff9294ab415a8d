"""How answers are relayed: small known-length answers whole (one plain response), the rest streamed.

The backend is a raw asyncio TCP server on 127.0.0.1 (port from the kernel) so that it can misbehave:
declare a ``Content-Length`` and break off, or answer a HEAD request with a length and no body.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from prometheus_client import CollectorRegistry
from test_gw_support import ScriptedPicker, gateway_config, metric_value, running_gateway

from inferoute.gateway.relay import BUFFERED_ANSWER_MAX

CHAT = {"model": "llama-3", "messages": [{"role": "user", "content": "hi"}]}
BIG = BUFFERED_ANSWER_MAX * 3 + 7


@dataclass
class RawBackend:
    """Answers by path: ``/short`` declares 100 bytes and sends 10, ``/big`` sends :data:`BIG` bytes,
    anything else a small JSON; HEAD gets the headers only."""

    name: str
    port: int = 0

    @property
    def key(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                await reader.readexactly(length)
                if path.endswith("/short"):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
                    writer.write(b"Content-Length: 100\r\n\r\n0123456789")
                    await writer.drain()
                    return  # closes mid-body
                body = b"x" * BIG if path.endswith("/big") else b'{"ok":true}'
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Backend: raw\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(body)
                )
                if method != "HEAD":
                    writer.write(body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def raw_backend() -> AsyncIterator[RawBackend]:
    backend = RawBackend("raw")
    server = await asyncio.start_server(backend.handle, "127.0.0.1", 0)
    backend.port = server.sockets[0].getsockname()[1]
    try:
        yield backend
    finally:
        server.close()
        await server.wait_closed()


async def test_small_answer_is_relayed_whole_with_its_headers_and_reported() -> None:
    reg = CollectorRegistry()
    async with raw_backend() as b:
        picker = ScriptedPicker([b.key])
        async with (
            running_gateway(gateway_config([b]), picker, reg) as gw,
            aiohttp.ClientSession(headers={"X-Request-Id": "r1"}) as s,
            s.post(gw.url + "/v1/chat/completions", json=CHAT) as r,
        ):
            assert r.status == 200
            assert await r.read() == b'{"ok":true}'
            assert r.headers["X-Backend"] == "raw" and r.headers["Content-Type"] == "application/json"
            assert r.headers["Content-Length"] == "11" and r.headers["X-Request-Id"] == "r1"
    assert picker.sessions[0].events == [("started", (b.key, 200)), ("chunk", 11), ("finished", None)]
    assert metric_value(reg, "inferoute_gateway_response_bytes_total") == 11
    assert metric_value(reg, "inferoute_gateway_request_bytes_total") > 0
    assert metric_value(reg, "inferoute_gateway_requests_total", {"route": "/", "code": "200"}) == 1
    assert metric_value(reg, "inferoute_gateway_in_flight_requests") == 0


async def test_small_answer_broken_off_becomes_a_clean_502() -> None:
    reg = CollectorRegistry()
    async with raw_backend() as b:
        picker = ScriptedPicker([b.key])
        async with (
            running_gateway(gateway_config([b]), picker, reg) as gw,
            aiohttp.ClientSession() as s,
            s.post(gw.url + "/v1/short", json=CHAT) as r,
        ):
            assert r.status == 502  # nothing had reached the client: it gets an error, not a cut body
            err = (await r.json())["error"]
            assert "broke off" in err["message"]
    assert picker.sessions[0].events[-1] == ("aborted", "upstream-aborted")
    assert metric_value(reg, "inferoute_gateway_errors_total", {"cause": "upstream-aborted"}) == 1
    assert metric_value(reg, "inferoute_gateway_requests_total", {"route": "/", "code": "502"}) == 1


async def test_large_answer_is_streamed_intact() -> None:
    reg = CollectorRegistry()
    async with raw_backend() as b:
        picker = ScriptedPicker([b.key])
        async with (
            running_gateway(gateway_config([b]), picker, reg) as gw,
            aiohttp.ClientSession() as s,
            s.post(gw.url + "/v1/big", json=CHAT) as r,
        ):
            assert r.status == 200 and r.headers["Content-Length"] == str(BIG)
            assert await r.read() == b"x" * BIG
    kinds = picker.sessions[0].kinds()
    assert kinds[0] == "started" and kinds[-1] == "finished" and kinds.count("chunk") >= 1
    assert metric_value(reg, "inferoute_gateway_response_bytes_total") == BIG


async def test_head_keeps_the_upstream_length_and_sends_no_body() -> None:
    async with raw_backend() as b:
        picker = ScriptedPicker([b.key])
        async with running_gateway(gateway_config([b]), picker) as gw, aiohttp.ClientSession() as s:
            async with s.head(gw.url + "/v1/models") as r:
                assert r.status == 200 and r.headers["Content-Length"] == "11"
                assert await r.read() == b""
            async with s.post(gw.url + "/v1/chat/completions", json=CHAT) as r:  # the connection still works
                assert await r.read() == b'{"ok":true}'
