"""inferoute's HTTP/2 gRPC server checked by an independent HTTP/2 implementation (the ``h2`` library as a
strict client) over real sockets: framing, HPACK, flow control, padding, CONTINUATION, PING, errors,
shutdown. The ext_proc semantics on top are covered by test_extproc_server.py (run on this server and on
grpc.aio, with grpc's C-core client) and by the Envoy interop tests."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from grpc_health.v1 import health_pb2

from inferoute.epp.serving import h2server as h2s

ECHO = "/test.Echo/Echo"
HOLD = "/test.Echo/Hold"
CHECK = "/grpc.health.v1.Health/Check"
BOOM = "/test.Echo/Boom"


class _Echo:
    """Bidi: answers every request with the same message (its ``service`` field echoed)."""

    def __init__(self, _writer: h2s.StreamWriter) -> None:
        self.closed: bool | None = None

    def feed(self, msg: Any) -> Sequence[Any]:
        return (health_pb2.HealthCheckRequest(service=msg.service),)

    async def resume(self) -> Sequence[Any]:
        return ()

    def end_of_input(self) -> Sequence[Any]:
        return ()

    def close(self, cancelled: bool) -> None:
        CLOSED.append(cancelled)


class _Hold(_Echo):
    """Defers every reply to ``resume``, which waits for RELEASE: later messages must wait their turn."""

    def feed(self, msg: Any) -> None:
        self.msg = msg
        return None

    async def resume(self) -> Sequence[Any]:
        await RELEASE.wait()
        return (health_pb2.HealthCheckRequest(service="held:" + self.msg.service),)


class _Boom(_Echo):
    """A handler with a bug: the call must end with INTERNAL, and the connection stay usable."""

    def feed(self, msg: Any) -> Sequence[Any]:
        raise ValueError(f"bug on {msg.service}")

    async def resume(self) -> Sequence[Any]:
        raise ValueError("never")


CLOSED: list[bool] = []
OPEN_CLIENTS: list[asyncio.StreamWriter] = []
RELEASE = asyncio.Event()  # replaced per test (an Event binds to the loop that first waits on it)


def _reset_state() -> None:
    global RELEASE
    CLOSED.clear()
    RELEASE = asyncio.Event()


def _methods() -> dict[str, h2s.Method]:
    return {
        ECHO: h2s.Method(health_pb2.HealthCheckRequest, _Echo),
        HOLD: h2s.Method(health_pb2.HealthCheckRequest, _Hold),
        BOOM: h2s.Method(health_pb2.HealthCheckRequest, _Boom),
        CHECK: h2s.unary(health_pb2.HealthCheckRequest, lambda r: health_pb2.HealthCheckResponse(status=1)),
    }


def _msg(service: str, *, compressed: bool = False) -> bytes:
    body = health_pb2.HealthCheckRequest(service=service).SerializeToString()
    return bytes((1 if compressed else 0,)) + struct.pack(">I", len(body)) + body


def _decode(data: bytes) -> list[str]:
    out, off = [], 0
    while off < len(data):
        (n,) = struct.unpack(">I", data[off + 1 : off + 5])
        out.append(health_pb2.HealthCheckRequest.FromString(data[off + 5 : off + 5 + n]).service)
        off += 5 + n
    return out


class Client:
    """An ``h2`` client connection with helpers to wait for events."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, window: int) -> None:
        self.reader, self.writer = reader, writer
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.h2.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window}
        )
        self.events: list[h2.events.Event] = []
        self.data: dict[int, bytearray] = {}
        self.auto_ack = True

    def flush(self) -> None:
        self.writer.write(self.h2.data_to_send())

    def start(self, path: str, sid: int | None = None) -> int:
        sid = sid if sid is not None else self.h2.get_next_available_stream_id()
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "x"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        self.h2.send_headers(sid, headers)
        self.flush()
        return sid

    async def until(self, pred: Any) -> h2.events.Event:
        async def loop() -> h2.events.Event:
            while True:
                for ev in self.events:
                    if pred(ev):
                        return ev
                chunk = await self.reader.read(65536)
                if not chunk:
                    raise ConnectionError("server closed the connection")
                for ev in self.h2.receive_data(chunk):
                    self.events.append(ev)
                    if isinstance(ev, h2.events.DataReceived):
                        self.data.setdefault(ev.stream_id, bytearray()).extend(ev.data)
                        if self.auto_ack:
                            self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                self.flush()

        return await asyncio.wait_for(loop(), 5)

    async def trailers(self, sid: int) -> dict[bytes, bytes]:
        ev = await self.until(
            lambda e: (
                isinstance(e, (h2.events.TrailersReceived, h2.events.ResponseReceived))
                and e.stream_id == sid
                and any(k == b"grpc-status" for k, _ in e.headers)
            )
        )
        return dict(ev.headers)


@pytest.fixture
async def server() -> AsyncIterator[h2s.GrpcServer]:
    _reset_state()
    srv = h2s.GrpcServer(_methods(), max_message_bytes=1024 * 1024)
    await srv.start("127.0.0.1", 0)
    try:
        yield srv
    finally:
        for writer in OPEN_CLIENTS:
            writer.close()
        OPEN_CLIENTS.clear()
        await srv.stop(0)


async def _client(srv: h2s.GrpcServer, window: int = 65535) -> Client:
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    OPEN_CLIENTS.append(writer)  # closed by the server fixture
    c = Client(reader, writer, window)
    c.h2.initiate_connection()
    c.flush()
    return c


async def test_bidi_messages_answered_in_order_with_ok_trailers(server: h2s.GrpcServer) -> None:
    c = await _client(server)
    sid = c.start(ECHO)
    c.h2.send_data(sid, _msg("a") + _msg("b"))  # two messages in one DATA frame
    c.h2.send_data(sid, _msg("c")[:3])  # a message split across frames
    c.flush()
    c.h2.send_data(sid, _msg("c")[3:], end_stream=True)
    c.flush()
    trailers = await c.trailers(sid)
    assert trailers[b"grpc-status"] == b"0"
    assert _decode(bytes(c.data[sid])) == ["a", "b", "c"]
    resp = next(e for e in c.events if isinstance(e, h2.events.ResponseReceived))
    assert dict(resp.headers)[b"content-type"] == b"application/grpc"
    assert CLOSED == [False]


async def test_unknown_method_and_wrong_content_type(server: h2s.GrpcServer) -> None:
    c = await _client(server)
    sid = c.start("/nope.Service/Nope")
    trailers = await c.trailers(sid)  # trailers-only response
    assert trailers[b"grpc-status"] == b"12" and b"nope.Service" in trailers[b"grpc-message"]
    sid2 = c.h2.get_next_available_stream_id()
    c.h2.send_headers(sid2, [(":method", "POST"), (":scheme", "http"), (":path", ECHO), (":authority", "x")])
    c.flush()
    ev = await c.until(lambda e: isinstance(e, h2.events.ResponseReceived) and e.stream_id == sid2)
    assert dict(ev.headers)[b":status"] == b"415"


async def test_peer_flow_control_windows_are_respected(server: h2s.GrpcServer) -> None:
    """The client grants a 100-byte stream window and withholds WINDOW_UPDATEs: the server must stop after
    100 bytes, then finish once the window opens (h2 raises on any flow-control violation)."""
    c = await _client(server, window=100)
    c.auto_ack = False
    sid = c.start(ECHO)
    big = "x" * 5000
    c.h2.send_data(sid, _msg(big), end_stream=True)
    c.flush()
    await c.until(lambda e: isinstance(e, h2.events.DataReceived) and e.stream_id == sid)
    await asyncio.sleep(0.2)
    assert len(c.data[sid]) == 100  # exactly the window, no trailers yet
    assert not any(isinstance(e, h2.events.TrailersReceived) for e in c.events)
    c.h2.increment_flow_control_window(10_000, stream_id=sid)
    c.h2.increment_flow_control_window(10_000)
    c.flush()
    trailers = await c.trailers(sid)
    assert trailers[b"grpc-status"] == b"0" and _decode(bytes(c.data[sid])) == [big]


async def test_padding_continuation_and_ping(server: h2s.GrpcServer) -> None:
    c = await _client(server)
    c.h2.max_outbound_frame_size = 16384
    sid = c.h2.get_next_available_stream_id()
    long_headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", ECHO),
        (":authority", "x"),
        ("content-type", "application/grpc"),
        *[(f"x-filler-{i}", "v" * 1000) for i in range(40)],  # > 16 KB: HEADERS + CONTINUATION
    ]
    c.h2.send_headers(sid, long_headers)
    c.h2.send_data(sid, _msg("padded"), pad_length=50, end_stream=True)
    c.h2.ping(b"12345678")
    c.flush()
    ack = await c.until(lambda e: isinstance(e, h2.events.PingAckReceived))
    assert ack.ping_data == b"12345678"
    assert (await c.trailers(sid))[b"grpc-status"] == b"0"
    assert _decode(bytes(c.data[sid])) == ["padded"]


async def test_bad_messages_end_the_call_with_a_status(server: h2s.GrpcServer) -> None:
    c = await _client(server)
    sid = c.start(ECHO)
    c.h2.send_data(sid, _msg("z", compressed=True), end_stream=True)
    c.flush()
    assert (await c.trailers(sid))[b"grpc-status"] == b"12"
    sid = c.start(ECHO)
    c.h2.send_data(sid, b"\x00" + struct.pack(">I", 2 * 1024 * 1024))  # announces 2 MB > the 1 MB limit
    c.flush()
    trailers = await c.trailers(sid)
    assert trailers[b"grpc-status"] == b"8" and b"exceeds" in trailers[b"grpc-message"]
    sid = c.start(BOOM)
    c.h2.send_data(sid, _msg("z"), end_stream=True)
    c.flush()
    trailers = await c.trailers(sid)
    assert trailers[b"grpc-status"] == b"13" and b"bug on z" in trailers[b"grpc-message"]
    sid = c.start(ECHO)
    c.h2.send_data(sid, b"\x00\x00\x00\x00\x03\xff\xff\xff", end_stream=True)  # not protobuf
    c.flush()
    assert (await c.trailers(sid))[b"grpc-status"] == b"13"
    # the connection is still good
    sid = c.start(CHECK)
    c.h2.send_data(sid, _msg("ok"), end_stream=True)
    c.flush()
    assert (await c.trailers(sid))[b"grpc-status"] == b"0"


async def test_messages_after_a_deferred_reply_wait_their_turn(server: h2s.GrpcServer) -> None:
    c = await _client(server)
    sid = c.start(HOLD)
    c.h2.send_data(sid, _msg("first") + _msg("second"), end_stream=True)
    c.flush()
    await asyncio.sleep(0.1)
    assert sid not in c.data  # the first reply is still being routed
    RELEASE.set()
    assert (await c.trailers(sid))[b"grpc-status"] == b"0"
    assert _decode(bytes(c.data[sid])) == ["held:first", "held:second"]


async def test_reset_cancels_the_call(server: h2s.GrpcServer) -> None:
    c = await _client(server)
    sid = c.start(HOLD)
    c.h2.send_data(sid, _msg("x"))
    c.flush()
    await asyncio.sleep(0.05)
    c.h2.reset_stream(sid)
    c.flush()
    for _ in range(100):
        if CLOSED:
            break
        await asyncio.sleep(0.01)
    assert CLOSED == [True]


async def test_not_http2_gets_goaway_and_close(server: h2s.GrpcServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), 5)  # read to EOF: the server closed
    assert data[3] == 4  # our SETTINGS first ...
    assert b"\x07" in data[9:]  # ... then a GOAWAY frame
    writer.close()


async def test_graceful_stop_lets_open_calls_finish() -> None:
    """GOAWAY, then the open call completes (grpc's C-core client: h2's client state machine rejects frames
    after a GOAWAY). New connections are refused once stopping."""
    _reset_state()
    srv = h2s.GrpcServer(_methods())
    port = await srv.start("127.0.0.1", 0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        hold = ch.stream_stream(
            HOLD,
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckRequest.FromString,
        )
        call = hold()
        await call.write(health_pb2.HealthCheckRequest(service="late"))
        await call.done_writing()
        await asyncio.sleep(0.1)
        stopping = asyncio.create_task(srv.stop(5))
        await asyncio.sleep(0.1)
        assert not stopping.done()  # waiting for the open call
        RELEASE.set()
        assert (await asyncio.wait_for(call.read(), 5)).service == "held:late"
        assert await call.code() == grpc.StatusCode.OK
        await asyncio.wait_for(stopping, 5)
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
