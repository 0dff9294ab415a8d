"""The one forwarding path, run against both data planes that use it: the gateway, and the NGINX decider's
relay (the requests NGINX cannot carry itself because the picker replaced the body).

Everything goes through real sockets: the client is aiohttp, the model servers are raw asyncio TCP servers
(they record the exact request head and answer with hop-by-hop headers an aiohttp server would not send),
and the "dead" endpoint is a socket that is bound but not listening (the kernel refuses connections to it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from test_gw_support import ScriptedPicker

from inferoute.endpoints import Endpoint
from inferoute.gateway.app import start_gateway
from inferoute.gateway.config import GatewayConfig, parse_config
from inferoute.gateway.nginx_decider.server import start_decider
from inferoute.picking import Destination, PickRequest

CHAT = {"model": "llama-3", "messages": [{"role": "user", "content": "hi"}]}
HOP_BY_HOP_REQUEST = {
    "Connection": "keep-alive, X-Hop-Private",
    "X-Hop-Private": "named in Connection",
    "Keep-Alive": "timeout=5",
    "Proxy-Authorization": "Basic c2VjcmV0",
    "Proxy-Connection": "keep-alive",
    "TE": "trailers",
    "Trailer": "X-Checksum",
}
HOP_BY_HOP_RESPONSE = (
    b"Connection: keep-alive, X-Backend-Private\r\n"
    b"X-Backend-Private: named in Connection\r\n"
    b"Keep-Alive: timeout=5\r\n"
    b"Proxy-Authenticate: Basic\r\n"
    b"Proxy-Connection: keep-alive\r\n"
    b"Trailer: X-Checksum\r\n"
)


@dataclass
class RawServer:
    """A model server that answers every request with ``status``: a small JSON of known length, or (path
    ending in ``/stream``) a chunked answer. Each answer carries hop-by-hop headers and ``X-Backend``."""

    name: str
    status: int = 200
    port: int = 0
    heads: list[list[tuple[str, str]]] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"127.0.0.1:{self.port}"

    def header_names(self, i: int = -1) -> set[str]:
        return {k.lower() for k, _ in self.heads[i]}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                path = head[0].split(" ")[1]
                headers = [(k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in head[1:] if ln)]
                self.heads.append(headers)
                length = int(next((v for k, v in headers if k.lower() == "content-length"), "0"))
                self.bodies.append(await reader.readexactly(length))
                writer.write(self._answer(path))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def _answer(self, path: str) -> bytes:
        body = json.dumps({"served_by": self.name}).encode()
        head = b"HTTP/1.1 %d Status\r\nContent-Type: application/json\r\nX-Backend: %s\r\n" % (
            self.status,
            self.name.encode(),
        )
        if path.endswith("/stream"):
            chunks = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:5], body[5:]))
            return head + HOP_BY_HOP_RESPONSE + b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
        return head + HOP_BY_HOP_RESPONSE + b"Content-Length: %d\r\n\r\n" % len(body) + body


@contextlib.asynccontextmanager
async def raw_servers(*specs: tuple[str, int]) -> AsyncIterator[list[RawServer]]:
    servers: list[asyncio.Server] = []
    out = []
    try:
        for name, status in specs:
            backend = RawServer(name, status)
            server = await asyncio.start_server(backend.handle, "127.0.0.1", 0)
            backend.port = server.sockets[0].getsockname()[1]
            servers.append(server)
            out.append(backend)
        yield out
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()


@pytest.fixture
def dead() -> Iterator[str]:
    """An endpoint that refuses connections: bound (so nobody else gets the port), never listening."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def rewriting_picker(order: list[str]) -> ScriptedPicker:
    """Sends to ``order`` (the rest are fallbacks) and replaces the body, which makes the NGINX decider
    relay the request itself instead of handing it to NGINX."""

    def script(req: PickRequest) -> Destination:
        return Destination(tuple(order), body=req.body.replace(b"llama-3", b"llama-3-rewritten"))

    return ScriptedPicker(order, script=script)


def config(keys: list[str], **route: Any) -> GatewayConfig:
    eps = [{"address": k.split(":")[0], "port": int(k.split(":")[1])} for k in keys]
    r = {"path": "/", "epp": {"endpoint": "embedded"}, **route}
    return parse_config({"listen": "127.0.0.1:0", "pool": {"endpoints": eps}, "routes": [r]})


@contextlib.asynccontextmanager
async def data_plane(kind: str, cfg: GatewayConfig, picker: ScriptedPicker) -> AsyncIterator[str]:
    """The gateway or the NGINX decider serving ``cfg`` with ``picker``; yields its base URL."""

    async def factory(_cfg: GatewayConfig, _eps: list[Endpoint], _reg: CollectorRegistry) -> Any:
        return picker

    if kind == "gateway":
        gw = await start_gateway(cfg, registry=CollectorRegistry(), embedded_factory=factory)
        try:
            yield gw.url
        finally:
            await gw.aclose(grace=1.0)
    else:
        running = await start_decider(
            cfg, "127.0.0.1:0", registry=CollectorRegistry(), embedded_factory=factory
        )
        try:
            yield f"http://127.0.0.1:{running.port}"
        finally:
            await running.aclose()


PLANES = pytest.mark.parametrize("plane", ["gateway", "nginx-decider"])


@PLANES
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/chat/completions/stream"])
async def test_hop_by_hop_and_connection_named_headers_are_dropped_both_ways(plane: str, path: str) -> None:
    async with raw_servers(("a", 200)) as (a,):
        picker = rewriting_picker([a.key])
        async with data_plane(plane, config([a.key]), picker) as url, aiohttp.ClientSession() as s:
            headers = {**HOP_BY_HOP_REQUEST, "X-End-To-End": "kept", "X-Request-Id": "req-1"}
            async with s.post(url + path, json=CHAT, headers=headers) as r:
                assert r.status == 200
                assert await r.json() == {"served_by": "a"}
                answer = {k.lower() for k in r.headers}
                assert r.headers["x-request-id"] == "req-1"
    received = a.header_names()
    dropped = {k.lower() for k in HOP_BY_HOP_REQUEST} - {"connection"}
    assert not received & dropped, received & dropped
    assert "x-end-to-end" in received and "x-forwarded-for" in received
    assert b"llama-3-rewritten" in a.bodies[0]  # the picker's body went out (the decider relayed)
    assert "x-backend" in answer
    for name in ("x-backend-private", "keep-alive", "proxy-authenticate", "proxy-connection", "trailer"):
        assert name not in answer, name
    assert picker.sessions[0].kinds()[0] == "started" and picker.sessions[0].kinds()[-1] == "finished"


@PLANES
async def test_5xx_before_the_first_byte_and_connect_errors_walk_the_fallbacks(plane: str, dead: str) -> None:
    async with raw_servers(("sick", 503), ("well", 200)) as (sick, well):
        picker = rewriting_picker([dead, sick.key, well.key])
        cfg = config([dead, sick.key, well.key])
        async with (
            data_plane(plane, cfg, picker) as url,
            aiohttp.ClientSession() as s,
            s.post(url + "/v1/chat/completions", json=CHAT) as r,
        ):
            assert r.status == 200
            assert await r.json() == {"served_by": "well"}
    assert len(sick.heads) == 1 and len(well.heads) == 1  # the 503 came before any byte reached the client
    assert picker.sessions[0].events[0] == ("started", (well.key, 200))
    assert picker.sessions[0].kinds()[-1] == "finished"


@PLANES
async def test_the_last_endpoints_5xx_is_passed_through(plane: str, dead: str) -> None:
    async with raw_servers(("sick", 503)) as (sick,):
        picker = rewriting_picker([dead, sick.key])
        async with (
            data_plane(plane, config([dead, sick.key]), picker) as url,
            aiohttp.ClientSession() as s,
            s.post(url + "/v1/chat/completions", json=CHAT) as r,
        ):
            assert r.status == 503
            assert await r.json() == {"served_by": "sick"}
    assert picker.sessions[0].events[0] == ("started", (sick.key, 503))


@PLANES
async def test_no_reachable_endpoint_is_a_json_502_and_ends_the_session(plane: str, dead: str) -> None:
    picker = rewriting_picker([dead])
    async with (
        data_plane(plane, config([dead]), picker) as url,
        aiohttp.ClientSession() as s,
        s.post(url + "/v1/chat/completions", json=CHAT) as r,
    ):
        assert r.status == 502
        assert (await r.json())["error"]["message"] == "no model server could be reached"
    assert picker.sessions[0].kinds() == ["aborted"]


@PLANES
@pytest.mark.parametrize("bbr", [True, False])
async def test_body_over_the_limit_is_413_whether_declared_or_chunked(
    plane: str, bbr: bool, dead: str
) -> None:
    picker = rewriting_picker([dead])
    cfg = config([dead], bbr={"enabled": bbr, "max_body_size": 1000})

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"x" * 400

    async with data_plane(plane, cfg, picker) as url, aiohttp.ClientSession() as s:
        async with s.post(url + "/v1/chat/completions", data=b"x" * 1001) as r:
            assert r.status == 413
            assert (await r.json())["error"]["code"] == 413
        async with s.post(url + "/v1/chat/completions", data=chunks()) as r:
            assert r.status == 413
            assert "1000" in (await r.json())["error"]["message"]
    assert picker.requests == []  # refused before the picker was asked
