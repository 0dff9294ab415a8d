"""The sans-IO HTTP/2 core with plain calls and an injected clock: limits, timeouts and RFC 9113 errors."""

from __future__ import annotations

from inferoute.epp.serving.h2core import (
    PREFACE,
    CallEnded,
    CallStarted,
    ConnectionEnded,
    H2Core,
    InputEnded,
    Limits,
    MessageReceived,
    frame_header,
    literal_header,
)

BLOCK = b"".join(
    literal_header(k, v)
    for k, v in (
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", b"/s/M"),
        (b"content-type", b"application/grpc"),
    )
)
DATA, HEADERS, RST, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8


def frames(out: list[bytes | memoryview]) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream, payload) of every frame in ``out``."""
    data, pos, found = b"".join(bytes(x) for x in out), 0, []
    while pos < len(data):
        n = int.from_bytes(data[pos : pos + 3], "big")
        sid = int.from_bytes(data[pos + 5 : pos + 9], "big")
        found.append((data[pos + 3], data[pos + 4], sid, data[pos + 9 : pos + 9 + n]))
        pos += 9 + n
    return found


def connected(**limits: object) -> H2Core:
    core = H2Core(Limits(**limits), 0.0)  # type: ignore[arg-type]
    assert core.receive_data(PREFACE + frame_header(0, SETTINGS, 0, 0)) == []
    assert core.tick(0.0) == []  # activity is seen by the next tick
    core.data_to_send()
    return core


def call(sid: int, *, end_stream: bool = False) -> bytes:
    return frame_header(len(BLOCK), HEADERS, 0x4 | (0x1 if end_stream else 0), sid) + BLOCK


def message(sid: int, body: bytes, *, end_stream: bool = False) -> bytes:
    payload = b"\x00" + len(body).to_bytes(4, "big") + body
    return frame_header(len(payload), DATA, 0x1 if end_stream else 0, sid) + payload


def cancel(sid: int) -> bytes:
    """RST_STREAM CANCEL from the client."""
    return frame_header(4, RST, 0, sid) + (8).to_bytes(4, "big")


def test_a_call_arrives_as_events_and_is_answered() -> None:
    core = connected()
    events = core.receive_data(call(1) + message(1, b"abc", end_stream=True))
    assert [type(e) for e in events] == [CallStarted, MessageReceived, InputEnded]
    assert events[1][0] == 1 and bytes(events[1][1]) == b"abc"  # type: ignore[index]
    assert core.send_messages(1, [b"\x00\x00\x00\x00\x01z"], 6)
    core.end_call(1, 0)
    kinds = [(t, f) for t, f, _, _ in frames(core.data_to_send())]
    assert kinds == [(HEADERS, 0x4), (DATA, 0), (HEADERS, 0x5)]
    assert core.streams == {}


def test_concurrent_streams_are_enforced_as_advertised() -> None:
    core = connected(max_concurrent_streams=2)
    settings = frames(H2Core(Limits(max_concurrent_streams=2), 0.0).data_to_send())[0][3]
    assert (3).to_bytes(2, "big") + (2).to_bytes(4, "big") in settings
    events = core.receive_data(call(1) + call(3) + call(5))
    assert [type(e) for e in events] == [CallStarted, CallStarted]
    assert [(t, s, p) for t, _, s, p in frames(core.data_to_send())] == [(RST, 5, b"\x00\x00\x00\x07")]


def test_held_input_is_not_credited_until_released() -> None:
    core = connected(stream_window=65535, connection_window=65535)
    body = b"x" * 40_000
    core.receive_data(call(1) + message(1, body))
    core.hold(1, len(body) + 5)
    assert [t for t, *_ in frames(core.data_to_send())] == []  # nothing credited
    events = core.receive_data(message(1, body))  # 80 KB > the 64 KB windows: a connection error
    assert isinstance(events[-1], ConnectionEnded) and events[-1].code == 0x3
    core = connected(stream_window=65535, connection_window=65535)
    core.receive_data(call(1) + message(1, body))
    core.hold(1, len(body) + 5)
    core.release(1, len(body) + 5)
    assert {(t, s) for t, _, s, _ in frames(core.data_to_send())} == {(WINDOW_UPDATE, 0), (WINDOW_UPDATE, 1)}


def test_timeouts_follow_the_injected_clock() -> None:
    core = H2Core(Limits(preface_timeout_seconds=5), 0.0)
    assert core.tick(4.9) == []
    (ended,) = core.tick(5.0)
    assert isinstance(ended, ConnectionEnded) and core.closed

    core = connected(idle_timeout_seconds=30)
    core.tick(29.0)
    (ended,) = core.tick(30.0)
    assert isinstance(ended, ConnectionEnded) and ended.code == 0  # GOAWAY NO_ERROR

    core = connected(keepalive_interval_seconds=10, keepalive_timeout_seconds=5, call_deadline_seconds=100)
    core.receive_data(call(1))
    core.tick(1.0)  # activity seen
    assert core.tick(11.0) == [] and frames(core.data_to_send())[0][0] == PING
    (ended,) = core.tick(16.0)
    assert isinstance(ended, ConnectionEnded)


def test_call_deadline_ends_the_call() -> None:
    core = connected(call_deadline_seconds=60, keepalive_interval_seconds=1000)
    core.receive_data(call(1))
    assert core.tick(59.0) == []
    (ended,) = core.tick(60.5)
    assert isinstance(ended, CallEnded) and ended.cancelled
    trailers = [p for t, _, _, p in frames(core.data_to_send()) if t == HEADERS]
    assert b"grpc-status\x014" in trailers[0]  # DEADLINE_EXCEEDED


def test_header_block_limit_applies_to_headers_alone() -> None:
    core = connected(max_header_list_bytes=1024)
    big = BLOCK + literal_header(b"x-big", b"v" * 2000)
    (ended,) = core.receive_data(frame_header(len(big), HEADERS, 0x4, 1) + big)
    assert isinstance(ended, ConnectionEnded) and ended.code == 0xB


def test_rfc9113_stream_errors() -> None:
    core = connected()
    core.receive_data(call(1))
    core.data_to_send()
    overflow = (2**31 - 1).to_bytes(4, "big")
    (ended,) = core.receive_data(frame_header(4, WINDOW_UPDATE, 0, 1) + overflow)
    assert isinstance(ended, CallEnded)
    assert frames(core.data_to_send()) == [(RST, 0, 1, b"\x00\x00\x00\x03")]  # FLOW_CONTROL_ERROR
    (ended,) = core.receive_data(frame_header(4, WINDOW_UPDATE, 0, 9) + b"\x00\x00\x00\x01")
    assert isinstance(ended, ConnectionEnded) and ended.code == 0x1  # idle stream
    goaway = frames(core.data_to_send())[-1]
    assert goaway[0] == GOAWAY and b"idle stream" in goaway[3]


def test_only_resets_before_our_reply_count_toward_rapid_reset() -> None:
    """A proxy ending an answered call with RST_STREAM (Envoy's ext_proc filter does, every call) is not
    rapid reset; a call cancelled before any reply is, and the limit's next one closes the connection."""
    core = connected(max_resets_per_interval=3)
    for sid in range(1, 41, 2):  # 20 answered calls, each reset by the client after our reply headers
        core.receive_data(call(sid) + message(sid, b"q"))
        assert core.send_messages(sid, [b"\x00\x00\x00\x00\x01a"], 6)
        assert [type(e) for e in core.receive_data(cancel(sid))] == [CallEnded]
    core.receive_data(cancel(1))  # a call long over
    assert not core.closed
    for sid in range(41, 47, 2):  # three cancelled before any reply: at the limit, still open
        core.receive_data(call(sid) + cancel(sid))
    assert not core.closed
    events = core.receive_data(call(47) + cancel(47))
    assert any(isinstance(e, ConnectionEnded) for e in events)
    goaway = [p for t, _, _, p in frames(core.data_to_send()) if t == GOAWAY]
    assert goaway and goaway[0][4:8] == (0xB).to_bytes(4, "big")
