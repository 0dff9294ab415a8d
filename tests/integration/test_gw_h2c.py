"""The gateway forwarding to ``app_protocol: h2c`` model servers over HTTP/2 cleartext (prior knowledge).

The model servers here are raw asyncio servers running the ``h2`` library's server side, so each test can see
what went over the wire: how many TCP connections, which streams were open at once, which ones the gateway
reset. (Real Envoy as the h2c peer, with the OpenAI SDK as the client: tests/interop/test_gw_h2c_envoy.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import h2.config
import h2.connection
import h2.events
import pytest
from prometheus_client import CollectorRegistry
from test_gw_support import ScriptedPicker

from inferoute.endpoints import Endpoint
from inferoute.errors import ConfigError
from inferoute.gateway.app import RunningGateway, start_gateway
from inferoute.gateway.config import GatewayConfig, parse_config
from inferoute.gateway.h2c import H2cPool
from inferoute.gateway.nginx_decider.server import start_decider
from tcp_relay import FreezableRelay

CHAT = {"model": "llama-3", "messages": [{"role": "user", "content": "hi"}]}


@dataclass
class H2Server:
    """An h2c model server. Paths: ``.../stream`` sends one SSE event, waits for :attr:`go`, sends a second;
    ``.../hang`` never answers; ``.../big`` answers :attr:`big` bytes; anything else answers ``status`` with
    a JSON naming the server and what it received (body length and digest)."""

    name: str
    status: int = 200
    port: int = 0
    big: int = 3 << 20
    connections: int = 0
    open_streams: int = 0
    max_open_streams: int = 0
    heads: list[dict[str, str]] = field(default_factory=list)
    resets: list[int] = field(default_factory=list)
    reset_seen: asyncio.Event = field(default_factory=asyncio.Event)
    go: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    transports: list[asyncio.Transport] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"127.0.0.1:{self.port}"


class _Conn(asyncio.Protocol):
    def __init__(self, srv: H2Server) -> None:
        self.srv = srv
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        self.bodies: dict[int, bytearray] = {}
        self.heads: dict[int, dict[str, str]] = {}
        self.window = asyncio.Event()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport subclass
        self.srv.transports.append(transport)
        self.srv.connections += 1
        self.h2.initiate_connection()
        self.flush()

    def flush(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.h2.data_to_send())

    def data_received(self, data: bytes) -> None:
        for ev in self.h2.receive_data(data):
            if isinstance(ev, h2.events.RequestReceived):
                assert ev.stream_id is not None and ev.headers is not None
                self.heads[ev.stream_id] = {str(k): str(v) for k, v in ev.headers}
                self.bodies[ev.stream_id] = bytearray()
                self.srv.open_streams += 1
                self.srv.max_open_streams = max(self.srv.max_open_streams, self.srv.open_streams)
            elif isinstance(ev, h2.events.DataReceived):
                assert ev.stream_id is not None and ev.data is not None
                self.bodies[ev.stream_id] += ev.data
                self.h2.acknowledge_received_data(ev.flow_controlled_length or 0, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                assert ev.stream_id is not None
                task = asyncio.get_running_loop().create_task(self.answer(ev.stream_id))
                self.srv.tasks.add(task)
                task.add_done_callback(self.srv.tasks.discard)
            elif isinstance(ev, h2.events.StreamReset):
                assert ev.stream_id is not None
                self.srv.resets.append(ev.stream_id)
                self.srv.reset_seen.set()
                self.srv.open_streams -= 1
                self.window.set()
            elif isinstance(ev, h2.events.WindowUpdated):
                self.window.set()
        self.flush()

    async def send(self, sid: int, data: bytes, end: bool) -> None:
        view = memoryview(data)
        while view:
            n = min(len(view), self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size)
            if n == 0:
                self.window.clear()
                await self.window.wait()
                if sid in self.srv.resets:
                    return
                continue
            self.h2.send_data(sid, bytes(view[:n]))
            view = view[n:]
            self.flush()
        if end:
            self.h2.end_stream(sid)
            self.flush()

    async def answer(self, sid: int) -> None:
        head = self.heads[sid]
        body = bytes(self.bodies.pop(sid))
        self.srv.heads.append(head)
        self.srv.arrived.set()
        path = head[":path"]
        try:
            if path.endswith("/hang"):
                await asyncio.Event().wait()
            if path.endswith("/stream"):
                self.h2.send_headers(sid, [(":status", "200"), ("content-type", "text/event-stream")])
                await self.send(sid, b"data: 1\n\n", end=False)
                await self.srv.go.wait()
                await self.send(sid, b"data: 2\n\ndata: [DONE]\n\n", end=True)
            elif path.endswith("/big"):
                data = bytes(range(256)) * (self.srv.big // 256)
                self.h2.send_headers(sid, [(":status", "200"), ("content-length", str(len(data)))])
                await self.send(sid, data, end=True)
            else:
                await self.srv.go.wait() if path.endswith("/wait") else None
                out = {"served_by": self.srv.name, "len": len(body), "sha": hashlib.sha256(body).hexdigest()}
                data = json.dumps(out).encode()
                self.h2.send_headers(
                    sid,
                    [
                        (":status", str(self.srv.status)),
                        ("content-type", "application/json"),
                        ("content-length", str(len(data))),
                        ("x-backend", self.srv.name),
                    ],
                )
                await self.send(sid, data, end=True)
        except h2.exceptions.StreamClosedError:
            pass
        finally:
            if sid not in self.srv.resets:
                self.srv.open_streams -= 1


@contextlib.asynccontextmanager
async def h2_servers(*specs: tuple[str, int]) -> AsyncIterator[list[H2Server]]:
    servers: list[asyncio.Server] = []
    out: list[H2Server] = []
    loop = asyncio.get_running_loop()
    try:
        for name, status in specs:
            srv = H2Server(name, status)
            server = await loop.create_server(lambda srv=srv: _Conn(srv), "127.0.0.1", 0)  # type: ignore[misc]
            srv.port = server.sockets[0].getsockname()[1]
            servers.append(server)
            out.append(srv)
        yield out
    finally:
        for srv in out:
            for t in srv.tasks:
                t.cancel()
            for tr in srv.transports:
                tr.close()
        for server in servers:
            server.close()
            await server.wait_closed()


@contextlib.asynccontextmanager
async def http1_server() -> AsyncIterator[int]:
    """An aiohttp (HTTP/1.1 only) model server; yields its port."""
    from aiohttp import web

    async def handle(_r: web.Request) -> web.Response:
        return web.json_response({"served_by": "http1"})

    app = web.Application()
    app.router.add_post("/v1/x", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


def config(keys: list[str], **extra: Any) -> GatewayConfig:
    eps = [{"address": k.split(":")[0], "port": int(k.split(":")[1])} for k in keys]
    return parse_config(
        {
            "listen": "127.0.0.1:0",
            "pool": {"endpoints": eps, "app_protocol": "h2c"},
            "routes": [{"path": "/", "epp": {"endpoint": "embedded"}}],
            **extra,
        }
    )


@contextlib.asynccontextmanager
async def gateway(cfg: GatewayConfig, picker: ScriptedPicker) -> AsyncIterator[RunningGateway]:
    async def factory(_cfg: GatewayConfig, _eps: list[Endpoint], _reg: CollectorRegistry) -> Any:
        return picker

    gw = await start_gateway(cfg, registry=CollectorRegistry(), embedded_factory=factory)
    try:
        yield gw
    finally:
        await gw.aclose(grace=1.0)


@pytest.fixture
def dead(refused_port: Callable[[], int]) -> str:
    """An endpoint that refuses connections."""
    return f"127.0.0.1:{refused_port()}"


async def test_requests_are_multiplexed_on_one_connection_and_hop_by_hop_headers_dropped() -> None:
    async with (
        h2_servers(("a", 200)) as (a,),
        gateway(config([a.key]), ScriptedPicker([a.key])) as gw,
        aiohttp.ClientSession() as s,
    ):
        headers = {
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "1",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
        }

        async def one(i: int) -> dict[str, Any]:
            body = {**CHAT, "n": i}
            async with s.post(gw.url + "/v1/wait", json=body, headers={**headers, "X-End": "kept"}) as r:
                assert r.status == 200, await r.text()
                assert r.headers["x-backend"] == "a"
                out: dict[str, Any] = await r.json()
                assert out["sha"] == hashlib.sha256(json.dumps(body).encode()).hexdigest()
                return out

        tasks = [asyncio.create_task(one(i)) for i in range(8)]
        while len(a.heads) < 8:  # every request is open at the server at once...
            a.arrived.clear()
            await asyncio.wait_for(a.arrived.wait(), 10)
        a.go.set()
        await asyncio.gather(*tasks)
        # ... over one TCP connection, and the next request reuses it
        async with s.post(gw.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200
    assert a.connections == 1
    assert a.max_open_streams == 8
    head = a.heads[0]
    assert head[":scheme"] == "http" and head[":authority"] == a.key and head[":method"] == "POST"
    assert head["x-end"] == "kept" and "x-forwarded-for" in head and "x-request-id" in head
    assert not {"connection", "x-hop", "keep-alive", "te", "host"} & set(head)


async def test_sse_events_are_relayed_as_they_arrive() -> None:
    async with (
        h2_servers(("a", 200)) as (a,),
        gateway(config([a.key]), ScriptedPicker([a.key])) as gw,
        aiohttp.ClientSession() as s,
        s.post(gw.url + "/v1/stream", json=CHAT) as r,
    ):
        assert r.status == 200
        assert r.headers["content-type"] == "text/event-stream"
        first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 10)  # before the server goes on
        assert first == b"data: 1\n\n"
        a.go.set()
        rest = await r.content.read()
    assert rest == b"data: 2\n\ndata: [DONE]\n\n"


async def test_connect_errors_and_5xx_walk_the_fallbacks(dead: str) -> None:
    async with h2_servers(("sick", 503), ("well", 200)) as (sick, well):
        order = [dead, sick.key, well.key]
        async with gateway(config(order), ScriptedPicker(order)) as gw, aiohttp.ClientSession() as s:
            async with s.post(gw.url + "/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200
                assert (await r.json())["served_by"] == "well"
            async with s.get(gw.url + "/metrics") as r:
                text = await r.text()
    assert len(sick.heads) == 1 and len(well.heads) == 1
    assert 'reason="connect"' in text and 'reason="5xx"' in text


async def test_refused_and_timed_out_connects_are_reported_to_the_picker(dead: str) -> None:
    """Passive health over h2c as over HTTP/1.1: a refused connect and one that times out (a blackholed
    endpoint) each walk on to the next endpoint and are reported to the picker session."""
    async with (
        FreezableRelay(None) as hole,
        h2_servers(("well", 200)) as (well,),
    ):
        order = [dead, hole.key, well.key]
        picker = ScriptedPicker(order)
        cfg = config(order, timeouts={"connect": 0.2})
        async with (
            gateway(cfg, picker) as gw,
            aiohttp.ClientSession() as s,
            s.post(gw.url + "/v1/chat/completions", json=CHAT) as r,
        ):
            assert r.status == 200 and (await r.json())["served_by"] == "well"
    assert picker.sessions[0].failed == [(dead, "connection refused"), (hole.key, "connect timed out")]


async def test_the_last_endpoints_5xx_is_passed_through_and_all_dead_is_502(dead: str) -> None:
    async with (
        h2_servers(("sick", 500)) as (sick,),
        gateway(config([dead, sick.key]), ScriptedPicker([dead, sick.key])) as gw,
        aiohttp.ClientSession() as s,
        s.post(gw.url + "/v1/x", json=CHAT) as r,
    ):
        assert r.status == 500 and (await r.json())["served_by"] == "sick"
    async with (
        gateway(config([dead]), ScriptedPicker([dead])) as gw,
        aiohttp.ClientSession() as s,
        s.post(gw.url + "/v1/x", json=CHAT) as r,
    ):
        assert r.status == 502
        assert "no model server could be reached" in (await r.json())["error"]["message"]


async def test_an_http1_server_is_not_an_h2c_peer(dead: str) -> None:
    """A model server that speaks only HTTP/1.1 answers the h2c preface with an HTTP/1.1 error: the gateway
    counts it as a failed endpoint and moves on."""
    async with http1_server() as port, h2_servers(("h2", 200)) as (good,):
        order = [f"127.0.0.1:{port}", good.key]
        async with (
            gateway(config(order), ScriptedPicker(order)) as gw,
            aiohttp.ClientSession() as s,
            s.post(gw.url + "/v1/x", json=CHAT) as r,
        ):
            assert r.status == 200 and (await r.json())["served_by"] == "h2"


async def test_client_disconnect_cancels_the_upstream_stream() -> None:
    async with h2_servers(("a", 200)) as (a,), gateway(config([a.key]), ScriptedPicker([a.key])) as gw:
        async with aiohttp.ClientSession() as s:
            r = await s.post(gw.url + "/v1/stream", json=CHAT)
            assert await asyncio.wait_for(r.content.readuntil(b"\n\n"), 10) == b"data: 1\n\n"
            r.close()  # the client goes away mid-stream
        await asyncio.wait_for(a.reset_seen.wait(), 10)
        # the connection survives: the next request goes over it
        async with aiohttp.ClientSession() as s, s.post(gw.url + "/v1/x", json=CHAT) as r2:
            assert r2.status == 200
    assert len(a.resets) == 1 and a.connections == 1


async def test_no_answer_in_time_is_504_and_the_stream_is_reset() -> None:
    async with h2_servers(("a", 200)) as (a,):
        cfg = config([a.key], timeouts={"response_headers": 0.3})
        async with gateway(cfg, ScriptedPicker([a.key])) as gw, aiohttp.ClientSession() as s:
            async with s.post(gw.url + "/v1/hang", json=CHAT) as r:
                assert r.status == 504
            await asyncio.wait_for(a.reset_seen.wait(), 10)


async def test_large_bodies_both_ways_respect_flow_control() -> None:
    body = json.dumps({**CHAT, "pad": "x" * (3 << 20)}).encode()
    async with (
        h2_servers(("a", 200)) as (a,),
        gateway(config([a.key]), ScriptedPicker([a.key])) as gw,
        aiohttp.ClientSession() as s,
    ):
        async with s.post(
            gw.url + "/v1/x", data=io.BytesIO(body), headers={"Content-Type": "application/json"}
        ) as r:
            assert r.status == 200
            assert (await r.json())["sha"] == hashlib.sha256(body).hexdigest()
        async with s.get(gw.url + "/v1/big") as r:
            data = await r.read()
    assert data == bytes(range(256)) * (a.big // 256)


async def test_weighted_backends_each_use_their_own_protocol() -> None:
    """A route with an h2c backend and an HTTP/1.1 backend: each request is spoken in its backend's protocol
    (an HTTP/1.1 request to the h2 server, or h2c to the aiohttp server, would fail)."""
    async with http1_server() as port, h2_servers(("h2", 200)) as (good,):
        backends = [
            {"name": "h2", "app_protocol": "h2c", "epp": {"enabled": False}, "endpoints": [ep(good.key)]},
            {"name": "h1", "epp": {"enabled": False}, "endpoints": [ep(f"127.0.0.1:{port}")]},
        ]
        cfg = parse_config(
            {
                "listen": "127.0.0.1:0",
                "routes": [{"path": "/", "epp": {"enabled": False}, "backends": backends}],
            }
        )
        async with gateway(cfg, ScriptedPicker([])) as gw, aiohttp.ClientSession() as s:
            served = []
            for _ in range(4):
                async with s.post(gw.url + "/v1/x", json=CHAT) as r:
                    assert r.status == 200
                    served.append((await r.json())["served_by"])
    assert sorted(served) == ["h2", "h2", "http1", "http1"]


def ep(key: str) -> dict[str, Any]:
    host, _, port = key.rpartition(":")
    return {"address": host, "port": int(port)}


@pytest.mark.parametrize("where", ["pool", "backend"])
async def test_nginx_mode_refuses_h2c_naming_the_key(where: str) -> None:
    if where == "pool":
        cfg = config(["127.0.0.1:9"])
        key = "pool.app_protocol"
    else:
        backends = [{"app_protocol": "h2c", "epp": {"enabled": False}, "endpoints": [ep("127.0.0.1:9")]}]
        cfg = parse_config({"routes": [{"path": "/v1", "epp": {"enabled": False}, "backends": backends}]})
        key = "routes[0].backends[0].app_protocol"
    with pytest.raises(ConfigError) as info:
        await start_decider(cfg, "127.0.0.1:0", registry=CollectorRegistry())
    assert info.value.message.startswith(f"{key}: h2c is not supported with --mode nginx")


async def test_a_streamed_upload_goes_out_as_it_arrives() -> None:
    """A route that needs no body (BBR and picker off) passes a chunked upload through to the h2c server."""
    async with h2_servers(("a", 200)) as (a,):
        cfg = config([a.key], routes=[{"path": "/", "bbr": {"enabled": False}, "epp": {"enabled": False}}])
        parts = [b"x" * 70000, b"y" * 70000, b"z"]

        async def upload() -> AsyncIterator[bytes]:
            for p in parts:
                yield p

        async with (
            gateway(cfg, ScriptedPicker([])) as gw,
            aiohttp.ClientSession() as s,
            s.post(gw.url + "/v1/x", data=upload()) as r,
        ):
            assert r.status == 200
            assert (await r.json())["sha"] == hashlib.sha256(b"".join(parts)).hexdigest()
    assert "content-length" not in a.heads[0]


def test_h2c_under_uvloop() -> None:
    """Production runs on uvloop, whose transports are not asyncio.Transport subclasses."""
    import uvloop

    async def scenario() -> None:
        async with (
            h2_servers(("a", 200)) as (a,),
            gateway(config([a.key]), ScriptedPicker([a.key])) as gw,
            aiohttp.ClientSession() as s,
        ):
            async with s.post(gw.url + "/v1/x", json=CHAT, timeout=aiohttp.ClientTimeout(total=10)) as r:
                assert r.status == 200 and (await r.json())["served_by"] == "a"
            a.go.set()
            async with s.post(gw.url + "/v1/stream", json=CHAT) as r:
                assert await r.read() == b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n"

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


async def _post(pool: H2cPool, up: str) -> dict[str, Any]:
    r = await pool.request("POST", up, "/v1/x", [("content-type", "application/json")], b"{}", 10)
    try:
        out: dict[str, Any] = json.loads(await r.content.read())
        return out
    finally:
        r.release()


async def test_idle_connections_close_and_exhausted_ones_are_replaced() -> None:
    async with h2_servers(("a", 200)) as (a,):
        pool = H2cPool(connect_timeout=5, keepalive_timeout=0.05)
        try:
            assert (await _post(pool, a.key))["served_by"] == "a"
            (first,) = pool._conns[a.key]
            await asyncio.wait_for(first.lost, 10)  # no stream for keepalive_timeout: closed
            assert (await _post(pool, a.key))["served_by"] == "a"
            (second,) = pool._conns[a.key]
            second.h2.highest_outbound_stream_id = (1 << 31) - 3  # the last stream id is used up
            assert (await _post(pool, a.key))["served_by"] == "a"
            assert pool._conns[a.key][-1] is not second
        finally:
            await pool.aclose()
    assert a.connections == 3


async def test_a_streamed_upload_over_the_limit_is_413_and_the_stream_is_reset() -> None:
    async with h2_servers(("a", 200)) as (a,):
        route = {"path": "/", "bbr": {"enabled": False, "max_body_size": 100_000}, "epp": {"enabled": False}}
        cfg = config([a.key], routes=[route])

        async def upload() -> AsyncIterator[bytes]:
            for _ in range(4):
                yield b"x" * 60_000

        async with (
            gateway(cfg, ScriptedPicker([])) as gw,
            aiohttp.ClientSession() as s,
            s.post(gw.url + "/v1/x", data=upload()) as r,
        ):
            assert r.status == 413
        await asyncio.wait_for(a.reset_seen.wait(), 10)
    assert a.heads == []  # the model server never saw a whole request
