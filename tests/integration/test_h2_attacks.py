"""The known HTTP/2 attacks against the picker's HTTP/2 server, over real loopback sockets.

Each attack runs from a raw socket while a well-behaved gRPC client (grpc's C core, connected before the
attack) keeps calling. Every test asserts: the offending connection is closed (GOAWAY with the stated error
code where HTTP/2 got that far), the process RSS grows by less than ``RSS_BOUND``, and the good client is
answered within ``ANSWER_WITHIN`` seconds during and after the attack. The limits are set small (the
defaults, in docs/security.md, only make each attack take longer to trip).
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inferoute.epp.serving import h2server as h2s
from inferoute.epp.serving.h2core import PREFACE, Limits, frame_header, literal_header

RSS_BOUND = 64 * 1024 * 1024
ANSWER_WITHIN = 1.0
HOLD = "/test.Echo/Hold"
CHECK = "/grpc.health.v1.Health/Check"
E_FLOW_CONTROL, E_COMPRESSION, E_ENHANCE_YOUR_CALM = 0x3, 0x9, 0xB
LIMITS = Limits(
    max_concurrent_streams=16,
    max_resets_per_interval=100,
    max_no_reply_frames_per_interval=200,
    max_continuation_frames=4,
    stream_window=65535,
    connection_window=256 * 1024,
    preface_timeout_seconds=0.3,
    idle_timeout_seconds=0.5,
    keepalive_interval_seconds=0.5,
    keepalive_timeout_seconds=0.5,
    max_connections=24,
)


class _Hold:
    """Never answers: its input is held (the picker deciding, forever)."""

    def __init__(self, _writer: h2s.StreamWriter) -> None:
        pass

    def feed(self, msg: Any) -> None:
        return None

    async def resume(self) -> Sequence[Any]:
        await asyncio.Event().wait()
        return ()

    def end_of_input(self) -> Sequence[Any]:
        return ()

    def close(self, cancelled: bool) -> None:
        return None


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


@pytest.fixture
async def server() -> AsyncIterator[h2s.GrpcServer]:
    methods = {
        HOLD: h2s.Method(health_pb2.HealthCheckRequest, _Hold),
        CHECK: h2s.unary(health_pb2.HealthCheckRequest, lambda r: health_pb2.HealthCheckResponse(status=1)),
    }
    srv = h2s.GrpcServer(methods, limits=LIMITS)
    await srv.start("127.0.0.1", 0)
    try:
        yield srv
    finally:
        await srv.stop(0)


class GoodClient:
    """grpc's C-core client calling Check in a loop; records the slowest answer."""

    def __init__(self, port: int) -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.stub = health_pb2_grpc.HealthStub(self.channel)
        self.slowest = 0.0
        self.answers = 0

    async def call(self) -> None:
        t0 = time.perf_counter()
        reply = await self.stub.Check(health_pb2.HealthCheckRequest(service="x"), timeout=5)
        assert reply.status == 1
        self.slowest = max(self.slowest, time.perf_counter() - t0)
        self.answers += 1

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.call()
            await asyncio.sleep(0.01)


class Attacker:
    """A raw TCP connection speaking just enough HTTP/2 to attack."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int, *, preface: bool = True) -> Attacker:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        a = cls(reader, writer)
        if preface:
            writer.write(PREFACE + frame_header(0, 4, 0, 0))
        return a

    def send(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)

    async def frame(self, ftype: int, sid: int, within: float = 5.0) -> bytes:
        """Read frames until one of type ``ftype`` on stream ``sid`` arrives; its payload."""
        async with asyncio.timeout(within):
            while True:
                head = await self.reader.readexactly(9)
                payload = await self.reader.readexactly(int.from_bytes(head[:3], "big"))
                if head[3] == ftype and int.from_bytes(head[5:9], "big") & 0x7FFFFFFF == sid:
                    return payload

    async def goaway(self, within: float = 5.0) -> int | None:
        """Read to EOF; the error code of the server's GOAWAY (None: closed without one)."""
        data = bytearray()
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            try:
                chunk = await asyncio.wait_for(self.reader.read(1 << 16), deadline - time.monotonic())
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            data += chunk
        else:
            raise AssertionError("the server did not close the connection")
        pos, code = 0, None
        while len(data) - pos >= 9:
            length, ftype = int.from_bytes(data[pos : pos + 3], "big"), data[pos + 3]
            if ftype == 7:
                code = int.from_bytes(data[pos + 13 : pos + 17], "big")
            pos += 9 + length
        self.writer.close()
        return code


def request_block(path: str = HOLD) -> bytes:
    return b"".join(
        literal_header(k, v)
        for k, v in (
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path.encode()),
            (b":authority", b"x"),
            (b"content-type", b"application/grpc"),
        )
    )


def headers(sid: int, block: bytes, *, end_headers: bool = True, end_stream: bool = False) -> bytes:
    flags = (0x4 if end_headers else 0) | (0x1 if end_stream else 0)
    return frame_header(len(block), 1, flags, sid) + block


async def under_attack(server: h2s.GrpcServer, attack: Any) -> Any:
    """Run ``attack()`` while the good client calls; check its answers and the RSS; ``attack``'s result."""
    good = GoodClient(server.port)
    try:
        await good.call()  # connected before the attack
        rss0 = _rss()
        stop = asyncio.Event()
        calls = asyncio.create_task(good.run(stop))
        try:
            result = await attack()
        finally:
            stop.set()
            await calls
        await good.call()
        assert good.slowest < ANSWER_WITHIN, f"the good client waited {good.slowest:.2f} s"
        assert _rss() - rss0 < RSS_BOUND
        return result
    finally:
        await good.channel.close()


async def test_rapid_reset_gets_goaway(server: h2s.GrpcServer) -> None:
    async def attack() -> int | None:
        a = await Attacker.connect(server.port)
        block = request_block()
        rst = b"\x00\x00\x00\x08"
        a.send(b"".join(headers(s, block) + frame_header(4, 3, 0, s) + rst for s in range(1, 20_000, 2)))
        return await a.goaway()

    assert await under_attack(server, attack) == E_ENHANCE_YOUR_CALM


async def test_continuation_flood_gets_goaway(server: h2s.GrpcServer) -> None:
    async def attack() -> int | None:
        a = await Attacker.connect(server.port)
        a.send(headers(1, request_block(), end_headers=False) + frame_header(0, 9, 0, 1) * 100_000)
        return await a.goaway()

    assert await under_attack(server, attack) == E_ENHANCE_YOUR_CALM


async def test_empty_frame_flood_gets_goaway(server: h2s.GrpcServer) -> None:
    async def attack() -> int | None:
        a = await Attacker.connect(server.port)
        a.send(headers(1, request_block()) + frame_header(0, 0, 0, 1) * 100_000)  # empty DATA
        return await a.goaway()

    assert await under_attack(server, attack) == E_ENHANCE_YOUR_CALM


async def test_table_size_update_flood_gets_goaway(server: h2s.GrpcServer) -> None:
    async def attack() -> int | None:
        a = await Attacker.connect(server.port)
        a.send(headers(1, b"\x20" * 60_000 + request_block()))
        return await a.goaway()

    assert await under_attack(server, attack) == E_COMPRESSION


async def test_idle_stream_flood_is_refused_then_goaway(server: h2s.GrpcServer) -> None:
    async def attack() -> int | None:
        a = await Attacker.connect(server.port)
        block = request_block()
        a.send(b"".join(headers(s, block) for s in range(1, 40_000, 2)))
        return await a.goaway()

    assert await under_attack(server, attack) == E_ENHANCE_YOUR_CALM
    assert sum(len(c.calls) for c in server.connections) <= 1


async def test_window_overrun_and_body_flood_get_goaway(server: h2s.GrpcServer) -> None:
    """Held calls (the handler never takes its input) on every allowed stream, then more body than the
    windows grant: FLOW_CONTROL_ERROR. Nothing is credited while the input is held."""

    async def attack() -> int | None:
        a = await Attacker.connect(server.port)
        block = request_block()
        msg = b"\x00" + (60_000).to_bytes(4, "big") + b"x" * 60_000
        frames = [headers(s, block) + frame_header(len(msg), 0, 0, s) + msg for s in range(1, 9, 2)]
        a.send(b"".join(frames) * 1)
        a.send(b"".join(frame_header(len(msg), 0, 0, s) + msg for s in range(1, 9, 2)) * 50)  # 12 MB
        return await a.goaway()

    assert await under_attack(server, attack) == E_FLOW_CONTROL


async def test_slowloris_connections_time_out(server: h2s.GrpcServer) -> None:
    """No preface: closed after preface_timeout. Preface and then silence: GOAWAY after idle_timeout."""

    async def attack() -> list[int | None]:
        silent = [await Attacker.connect(server.port, preface=False) for _ in range(5)]
        for a in silent:
            a.send(PREFACE[:10])  # a trickle of the preface
        idle = [await Attacker.connect(server.port) for _ in range(5)]
        t0 = time.monotonic()
        codes = [await a.goaway() for a in silent + idle]
        assert time.monotonic() - t0 < 3.0
        return codes

    codes = await under_attack(server, attack)
    assert codes[5:] == [0] * 5  # idle: GOAWAY NO_ERROR


async def test_descriptor_exhaustion_leaves_room_and_recovers(server: h2s.GrpcServer) -> None:
    """More connections than max_connections: the extra ones are closed at once (the good client, already
    connected, keeps being answered); the idle ones time out, and new clients get in again."""

    async def attack() -> int:
        held = [await Attacker.connect(server.port) for _ in range(60)]
        await asyncio.sleep(0.1)
        assert len(server.connections) <= LIMITS.max_connections
        assert server.refused_connections >= 60 - LIMITS.max_connections
        for a in held:
            await a.goaway()
        return len(server.connections)

    await under_attack(server, attack)
    fresh = GoodClient(server.port)
    try:
        await fresh.call()
    finally:
        await fresh.channel.close()


async def test_protocol_errors_are_answered(server: h2s.GrpcServer) -> None:
    """RFC 9113: a reused stream id and RST_STREAM on an idle stream are connection errors (PROTOCOL_ERROR);
    the GOAWAY debug text is fixed (no object addresses)."""
    a = await Attacker.connect(server.port)
    a.send(headers(5, request_block(CHECK), end_stream=True) + headers(3, request_block(CHECK)))
    assert await a.goaway() == 0x1
    b = await Attacker.connect(server.port)
    b.send(frame_header(4, 3, 0, 7) + b"\x00\x00\x00\x08")
    assert await b.goaway() == 0x1
    c = await Attacker.connect(server.port)
    c.send(headers(1, b"\xff\xff\xff\xff\x0f"))  # an index far past any table
    data = await asyncio.wait_for(c.reader.read(), 5)
    c.writer.close()
    assert b"0x" not in data and b"object at" not in data


async def test_window_update_overflow_is_answered(server: h2s.GrpcServer) -> None:
    """RFC 9113 6.9.1: a stream's WINDOW_UPDATE past 2^31-1 resets that stream (FLOW_CONTROL_ERROR) and the
    connection carries on (a Check on it is answered); the connection's own is GOAWAY FLOW_CONTROL_ERROR."""
    a = await Attacker.connect(server.port)
    overflow = (2**31 - 1).to_bytes(4, "big")
    a.send(headers(1, request_block()) + frame_header(4, 8, 0, 1) + overflow)
    assert await a.frame(3, 1) == E_FLOW_CONTROL.to_bytes(4, "big")  # RST_STREAM on stream 1
    msg = health_pb2.HealthCheckRequest(service="x").SerializeToString()
    grpc_msg = b"\x00" + len(msg).to_bytes(4, "big") + msg
    a.send(headers(3, request_block(CHECK)) + frame_header(len(grpc_msg), 0, 0x1, 3) + grpc_msg)
    await a.frame(1, 3)  # the answer's HEADERS
    a.send(frame_header(4, 8, 0, 0) + overflow)
    assert await a.goaway() == E_FLOW_CONTROL
