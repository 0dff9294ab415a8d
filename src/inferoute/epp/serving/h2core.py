"""The server side of gRPC over HTTP/2 (RFC 9113, RFC 7541), sans I/O: bytes in, events and bytes out.

Theory of operation
-------------------
:class:`H2Core` is one connection's protocol state in the style of h11/h2: the shell feeds it what the socket
delivered (:meth:`H2Core.receive_data`) and gets back a list of events (a call started, a gRPC message
arrived, the client half-closed, a call ended, the connection must close); the shell answers calls with
:meth:`H2Core.send_messages` / :meth:`H2Core.end_call` and writes :meth:`H2Core.data_to_send` to the socket.
Time enters only through :meth:`H2Core.tick` (``now`` from the shell's clock): the core has no sockets, no
tasks and no clock of its own, so every limit below is tested with plain function calls, and the fuzz harness
(tests/unit/test_h2core_fuzz.py) drives it with mutated frame sequences at ~10,000 cases a second.

What the core decides by itself, so that no handler ever sees it: the preface and SETTINGS exchange, PING
answers, flow control both ways, HPACK decoding, the gRPC length prefix (compressed or oversized messages end
the call), HTTP 415 for a non-gRPC request, and every limit of :class:`Limits`. A client that breaks a limit
or the protocol gets what RFC 9113 prescribes: a stream error (RST_STREAM, the call ends, the connection
lives) or a connection error (GOAWAY with a fixed reason, then the shell closes the socket: event
:class:`ConnectionEnded`). Flooding frames that need no reply (CVE-2019-9512/9515/9518, CVE-2023-44487
rapid reset, CVE-2024-27316 CONTINUATION flood) ends the connection with ``ENHANCE_YOUR_CALM`` once their
count in one :attr:`Limits.interval_seconds` passes the limit, as nghttp2, Go and Envoy do.

Back-pressure: a call whose handler is deciding (the shell called :meth:`H2Core.pause`) keeps its later
messages in the shell; their bytes are not given back to the client's stream window until
:meth:`H2Core.resume`, so one stream can hold at most :attr:`Limits.stream_window` bytes, and one connection
at most :attr:`Limits.connection_window`. Replies the client does not read are capped per stream and per
connection (:attr:`Limits.max_pending_stream_bytes`, :attr:`Limits.max_pending_connection_bytes`).

The hot path is kept to what docs/benchmarks/picker.md measures: frames are parsed with
slicing and ints straight from the received bytes, a block of headers a proxy repeats is decoded once, and
replies are queued as prebuilt HPACK literals and DATA frame headers for one write.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import hpack

__all__ = [
    "CallEnded",
    "CallStarted",
    "ConnectionEnded",
    "H2Core",
    "InputEnded",
    "Limits",
    "MessageReceived",
    "frame_header",
    "literal_header",
    "percent_encode",
]

# gRPC status codes (https://grpc.github.io/grpc/core/md_doc_statuscodes.html)
OK = 0
CANCELLED = 1
INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
NOT_FOUND = 5
RESOURCE_EXHAUSTED = 8
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14

Buffer = bytes | memoryview


@dataclass(frozen=True, slots=True)
class Limits:
    """Every limit of the picker's HTTP/2 server, with its default (``inferoute epp --h2-*`` flags set them;
    docs/security.md says what happens when each is hit)."""

    max_concurrent_streams: int = 256
    """Open calls per connection, advertised in SETTINGS and enforced: one more is refused (RST_STREAM
    REFUSED_STREAM, which gRPC clients retry)."""
    max_header_list_bytes: int = 64 * 1024
    """A header block (HEADERS and its CONTINUATION frames together), compressed and decoded alike."""
    max_table_size_updates: int = 2
    """HPACK dynamic-table size updates at the start of one block (RFC 7541 4.2 allows two)."""
    max_continuation_frames: int = 16
    """CONTINUATION frames in one header block."""
    max_resets_per_interval: int = 2000
    """RST_STREAM from the client for a call not yet answered (no reply headers sent), and streams refused
    or reset by us, per interval (rapid reset). A reset after the reply began is not counted: proxies end
    finished calls that way."""
    max_no_reply_frames_per_interval: int = 10_000
    """Frames that carry nothing to act on (empty DATA/CONTINUATION, PRIORITY, unknown types, SETTINGS,
    PING, WINDOW_UPDATE, frames for closed streams) per interval."""
    interval_seconds: float = 10.0
    stream_window: int = 4 * 1024 * 1024
    """The receive window of a stream: body bytes one call may have buffered before its handler takes them."""
    connection_window: int = 16 * 1024 * 1024
    """The receive window of the connection: body bytes all its calls together may have buffered."""
    max_message_bytes: int = 4 * 1024 * 1024
    """One gRPC message (a larger one ends the call with RESOURCE_EXHAUSTED)."""
    max_pending_stream_bytes: int = 16 * 1024 * 1024
    """Reply bytes of one call waiting for the client's window (more: the stream is reset). A body echoed
    in full duplex is replied all at once, so this is at least twice :attr:`max_message_bytes`."""
    max_pending_connection_bytes: int = 64 * 1024 * 1024
    """Reply bytes of all calls waiting for the client's windows (more: GOAWAY)."""
    call_deadline_seconds: float = 900.0
    """A call still open this long after its HEADERS ends with DEADLINE_EXCEEDED."""
    preface_timeout_seconds: float = 10.0
    """From accept to the client's connection preface."""
    idle_timeout_seconds: float = 600.0
    """A connection with no open call and no frame for this long is closed with GOAWAY (NO_ERROR)."""
    keepalive_interval_seconds: float = 60.0
    """With calls open and nothing received for this long, we send a PING ..."""
    keepalive_timeout_seconds: float = 20.0
    """... and close the connection if nothing at all arrives within this many seconds after it."""
    max_connections: int = 4096
    """Connections per listening socket; further ones are closed at once. Capped at start so that
    ``RLIMIT_NOFILE`` keeps 256 descriptors for health, metrics and scrapes."""


# -- events ---------------------------------------------------------------------------------------------


class CallStarted:
    """A gRPC request (HEADERS with ``content-type: application/grpc``): the shell opens a handler, or ends
    the call (unknown ``path``)."""

    __slots__ = ("path", "sid")

    def __init__(self, sid: int, path: str) -> None:
        self.sid, self.path = sid, path

    def __repr__(self) -> str:
        return f"CallStarted({self.sid}, {self.path!r})"


MessageReceived = tuple  # type: ignore[type-arg]
"""One complete gRPC message: a plain ``(sid, data)`` tuple, ``data`` the protobuf bytes without the 5-byte
prefix. A tuple rather than an object because it is the one event per message: it costs a fifth as much to
make, and the shell tells it from the other events with ``type(ev) is tuple``."""


class InputEnded:
    """The client half-closed the call (END_STREAM) after its last message."""

    __slots__ = ("sid",)

    def __init__(self, sid: int) -> None:
        self.sid = sid

    def __repr__(self) -> str:
        return f"InputEnded({self.sid})"


class CallEnded:
    """The core ended a call the shell had opened: reset by the client, or ended by a limit or a bad
    message (trailers already queued). ``cancelled``: the client is gone from it (reset, deadline)."""

    __slots__ = ("cancelled", "sid")

    def __init__(self, sid: int, cancelled: bool) -> None:
        self.sid, self.cancelled = sid, cancelled

    def __repr__(self) -> str:
        return f"CallEnded({self.sid}, cancelled={self.cancelled})"


class ConnectionEnded:
    """The connection is over (GOAWAY queued, or the keep-alive went unanswered): write
    :meth:`H2Core.data_to_send`, then close the socket. Every open call counts as cancelled."""

    __slots__ = ("code", "reason")

    def __init__(self, code: int, reason: str) -> None:
        self.code, self.reason = code, reason

    def __repr__(self) -> str:
        return f"ConnectionEnded({self.code}, {self.reason!r})"


Event = CallStarted | tuple[int, Buffer] | InputEnded | CallEnded | ConnectionEnded

# -- wire constants -------------------------------------------------------------------------------------

# HTTP/2 (RFC 9113) frame types, flags, settings and error codes used here
_DATA, _HEADERS, _PRIORITY, _RST_STREAM, _SETTINGS, _PUSH_PROMISE, _PING, _GOAWAY, _WINDOW_UPDATE, _CONT = (
    range(10)
)
_END_STREAM = _ACK = 0x1
_END_HEADERS = 0x4
_PADDED = 0x8
_PRIORITY_FLAG = 0x20
(
    _S_HEADER_TABLE_SIZE,
    _S_ENABLE_PUSH,
    _S_MAX_CONCURRENT,
    _S_INITIAL_WINDOW,
    _S_MAX_FRAME,
    _S_MAX_HEADER_LIST,
) = range(1, 7)
E_NO_ERROR, E_PROTOCOL, E_INTERNAL, E_FLOW_CONTROL = 0x0, 0x1, 0x2, 0x3
E_STREAM_CLOSED, E_FRAME_SIZE, E_REFUSED_STREAM, E_CANCEL, E_COMPRESSION = 0x5, 0x6, 0x7, 0x8, 0x9
E_ENHANCE_YOUR_CALM = 0xB
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_MAX_WINDOW = 2**31 - 1
RECV_FRAME_MAX = 1 << 20
"""Largest frame we accept (SETTINGS_MAX_FRAME_SIZE): big DATA frames mean fewer frames to parse."""


def frame_header(length: int, ftype: int, flags: int, sid: int) -> bytes:
    """The 9-byte HTTP/2 frame header."""
    return length.to_bytes(3, "big") + bytes((ftype, flags)) + sid.to_bytes(4, "big")


def literal_header(name: bytes, value: bytes) -> bytes:
    """HPACK literal header field without indexing, new name, no Huffman (RFC 7541 6.2.2): the bytes are
    valid whatever the peer's dynamic table holds, so constant blocks can be prebuilt (here and by the
    benchmark's pipelined client)."""
    return b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def percent_encode(text: str) -> bytes:
    """``grpc-message`` encoding: bytes outside printable ASCII, and '%', as %XX (UTF-8)."""
    raw = text.encode("utf-8", "replace")
    if all(0x20 <= b <= 0x7E and b != 0x25 for b in raw):
        return raw
    return b"".join(bytes((b,)) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b for b in raw)


def table_size_updates(block: bytes | memoryview) -> int:
    """How many dynamic-table size updates open ``block`` (RFC 7541 6.3: ``001xxxxx`` + integer)."""
    n = pos = 0
    end = len(block)
    while pos < end and block[pos] & 0xE0 == 0x20:
        n += 1
        if block[pos] & 0x1F == 0x1F:
            pos += 1
            while pos < end and block[pos] & 0x80:
                pos += 1
        pos += 1
    return n


# ":status: 200" is static-table entry 8 (indexed: 0x88); "content-type" is static name 31 (literal without
# indexing, indexed name: 0x0f 0x10). The first block on a connection also sets our encoder's dynamic table
# to 0 bytes (0x20), so nothing we send ever depends on, or changes, the peer's decoding state.
_BLOCK_RESPONSE = b"\x88\x0f\x10" + _hpack_int(16, 7) + b"application/grpc"
_DATA_HEADER_TAIL = bytes((_DATA, 0))  # type and flags of a DATA frame without END_STREAM
_BLOCK_415 = b"\x08\x03415"  # ":status" is static name 8; literal value without indexing
_TABLE_SIZE_ZERO = b"\x20"


def _trailer_block(code: int, details: str) -> bytes:
    block = literal_header(b"grpc-status", str(code).encode())
    if details:
        block += literal_header(b"grpc-message", percent_encode(details[:1024]))
    return block


_BLOCK_OK = _trailer_block(OK, "")


class ProtocolError(Exception):
    """A connection error (RFC 9113 5.4.1): GOAWAY with ``code`` and the fixed text ``reason``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class _Stream:
    """One open call's protocol state."""

    __slots__ = (
        "deadline",
        "headers_sent",
        "held",
        "inbuf",
        "input_ended",
        "need",
        "paused",
        "pending",
        "recv_unacked",
        "recv_window",
        "send_window",
        "sid",
        "trailers",
    )

    def __init__(self, sid: int, send_window: int, recv_window: int, deadline: float) -> None:
        self.sid = sid
        self.inbuf = bytearray()
        self.need = 5  # bytes ``inbuf`` must hold before the next message can be complete
        self.pending = bytearray()  # reply bytes waiting for the peer's flow-control window
        self.trailers: bytes | None = None  # the trailer block, waiting behind ``pending``
        self.send_window = send_window  # what the peer lets us send on this stream
        self.recv_window = recv_window  # what the peer may still send on this stream
        self.recv_unacked = 0  # bytes taken since our last WINDOW_UPDATE for this stream
        self.held = 0  # bytes delivered while paused: credited on resume
        self.paused = False
        self.input_ended = False
        self.headers_sent = False
        self.deadline = deadline


def _unpad(payload: bytes | memoryview) -> Buffer:
    pad = payload[0] if payload else 0
    if 1 + pad > len(payload):
        raise ProtocolError(E_PROTOCOL, "padding longer than the frame")
    return payload[1 : len(payload) - pad]


class H2Core:
    """One server connection's HTTP/2 + gRPC state: feed bytes, get events; queue replies, take bytes."""

    def __init__(self, limits: Limits, now: float) -> None:
        self.limits = limits
        self.streams: dict[int, _Stream] = {}
        self.last_sid = 0
        self.going_away = False  # our graceful GOAWAY went out: new streams are refused
        self.closed = False  # the connection is over: input is ignored
        self.peer_initial_window = 65535
        self._out: list[Buffer] = []
        self._events: list[Event] = []
        self._buf = b""
        self._preface = False
        self._decoder = hpack.Decoder(max_header_list_size=limits.max_header_list_bytes)
        self._blocks: dict[bytes, list[tuple[bytes, bytes]]] = {}  # see _decode
        self._block: bytearray | None = None  # a header block waiting for CONTINUATION frames
        self._block_sid = 0
        self._block_end_stream = False
        self._block_frames = 0
        self._table_zeroed = False
        self._peer_frame_max = 16384
        self._send_window = 65535  # connection-level, ours to spend
        self._recv_window = limits.connection_window  # connection-level, what the peer may still send
        self._recv_unacked = 0  # connection-level bytes taken since our last WINDOW_UPDATE
        self._credit_due: list[_Stream] = []  # streams whose window may need a WINDOW_UPDATE
        self._pending_total = 0
        self._conn_credit_at = limits.connection_window >> 1  # (hot-path copies of limits)
        self._stream_credit_at = limits.stream_window >> 1
        self._max_message = limits.max_message_bytes
        self._resets = 0
        self._no_reply = 0
        self._now = now
        self._interval_end = now + limits.interval_seconds
        self._active = False  # bytes arrived since the last tick
        self._last_active = self._started = now
        self._ping_sent_at: float | None = None
        settings = b"".join(
            k.to_bytes(2, "big") + v.to_bytes(4, "big")
            for k, v in (
                (_S_MAX_CONCURRENT, limits.max_concurrent_streams),
                (_S_INITIAL_WINDOW, limits.stream_window),
                (_S_MAX_FRAME, RECV_FRAME_MAX),
                (_S_MAX_HEADER_LIST, limits.max_header_list_bytes),
            )
        )
        self._out.append(frame_header(len(settings), _SETTINGS, 0, 0) + settings)
        if limits.connection_window > 65535:
            self._window_update(0, limits.connection_window - 65535)

    # -- input --------------------------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> list[Event]:
        """Parse ``data`` (any split of the byte stream); the events it caused, in order."""
        if self.closed:
            return []
        self._active = True
        if self._buf:
            data = self._buf + data
            self._buf = b""
        events = self._events = []
        try:
            if not self._preface:
                data = self._read_preface(data)
            pos = self._frames(data) if data else 0
            if pos < len(data):
                self._buf = data[pos:]
        except ProtocolError as exc:
            self._connection_error(exc.code, exc.reason)
        return events

    def _read_preface(self, data: bytes) -> bytes:
        if len(data) < len(PREFACE):
            if not PREFACE.startswith(data):
                raise ProtocolError(E_PROTOCOL, "not an HTTP/2 client preface")
            self._buf = data
            return b""
        if not data.startswith(PREFACE):
            raise ProtocolError(E_PROTOCOL, "not an HTTP/2 client preface")
        self._preface = True
        return data[len(PREFACE) :]

    def _frames(self, data: bytes) -> int:
        """Handle every complete frame in ``data``; the offset of the first incomplete one."""
        pos, end = 0, len(data)
        view = memoryview(data)  # DATA payloads are sliced from it without a copy
        while end - pos >= 9:  # (a connection error raises: no ``closed`` check per frame)
            length = int.from_bytes(data[pos : pos + 3], "big")
            if length > RECV_FRAME_MAX:
                raise ProtocolError(E_FRAME_SIZE, "frame larger than SETTINGS_MAX_FRAME_SIZE")
            if end - pos - 9 < length:
                break
            ftype, flags = data[pos + 3], data[pos + 4]
            sid = int.from_bytes(data[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
            start, pos = pos + 9, pos + 9 + length
            if self._block is not None and (ftype != _CONT or sid != self._block_sid):
                raise ProtocolError(E_PROTOCOL, "header block interrupted")
            if ftype == _DATA:
                self._on_data(sid, flags, view[start:pos])
            elif ftype == _HEADERS:
                self._on_headers(sid, flags, data[start:pos])
            elif ftype == _CONT:
                self._on_continuation(sid, flags, data[start:pos])
            elif ftype == _WINDOW_UPDATE:
                self._on_window_update(sid, data[start:pos])
            else:
                self._on_control(ftype, sid, flags, data[start:pos])
        return pos

    def _on_control(self, ftype: int, sid: int, flags: int, payload: bytes) -> None:
        """The frames that are rare on a gRPC connection: RST_STREAM, SETTINGS, PING, GOAWAY, PRIORITY,
        PUSH_PROMISE and unknown types (ignored, RFC 9113 5.5)."""
        if ftype == _RST_STREAM:
            self._on_rst(sid, payload)
        elif ftype == _SETTINGS:
            self._on_settings(sid, flags, payload)
        elif ftype == _PING:
            if sid != 0:
                raise ProtocolError(E_PROTOCOL, "PING on a stream")
            if len(payload) != 8:
                raise ProtocolError(E_FRAME_SIZE, "PING of the wrong size")
            self._no_reply_frame()
            if not flags & _ACK:
                self._out.append(frame_header(8, _PING, _ACK, 0) + payload)
        elif ftype == _GOAWAY:
            if sid != 0:
                raise ProtocolError(E_PROTOCOL, "GOAWAY on a stream")
            self.going_away = True  # the client opens no more calls; the open ones finish
        elif ftype == _PUSH_PROMISE:
            raise ProtocolError(E_PROTOCOL, "PUSH_PROMISE from a client")
        elif ftype == _PRIORITY:
            if sid == 0:
                raise ProtocolError(E_PROTOCOL, "PRIORITY on stream 0")
            self._no_reply_frame()
            if len(payload) != 5:
                self._stream_error(sid, E_FRAME_SIZE)
        else:
            self._no_reply_frame()

    def _no_reply_frame(self) -> None:
        self._no_reply += 1
        if self._no_reply > self.limits.max_no_reply_frames_per_interval:
            raise ProtocolError(E_ENHANCE_YOUR_CALM, "too many frames that need no reply")

    def _count_reset(self) -> None:
        self._resets += 1
        if self._resets > self.limits.max_resets_per_interval:
            raise ProtocolError(E_ENHANCE_YOUR_CALM, "too many stream resets")

    def _on_data(self, sid: int, flags: int, payload: memoryview) -> None:
        if sid == 0:
            raise ProtocolError(E_PROTOCOL, "DATA on stream 0")
        n = len(payload)
        self._recv_window -= n
        if self._recv_window < 0:
            raise ProtocolError(E_FLOW_CONTROL, "connection receive window exceeded")
        self._recv_unacked += n
        s = self.streams.get(sid)
        if s is None:
            if sid > self.last_sid:
                raise ProtocolError(E_PROTOCOL, "DATA on an idle stream")
            self._no_reply_frame()  # a call already over: only the connection window is credited
            return
        if s.input_ended:
            self._stream_error(sid, E_STREAM_CLOSED)
            return
        s.recv_window -= n
        if s.recv_window < 0:
            self._stream_error(sid, E_FLOW_CONTROL)
            return
        s.recv_unacked += n
        if s.recv_unacked >= self._stream_credit_at:
            self._credit_due.append(s)
        if flags & _PADDED:
            payload = cast(memoryview, _unpad(payload))
        if payload:
            if s.trailers is None:
                self._data(s, payload)
        elif not flags & _END_STREAM:
            self._no_reply_frame()
        if flags & _END_STREAM and sid in self.streams:
            s.input_ended = True
            self._events.append(InputEnded(sid))

    def _data(self, s: _Stream, data: Buffer) -> None:
        """Cut gRPC messages (1-byte flag, 4-byte length, body) out of a stream's bytes."""
        buf = s.inbuf
        if buf:  # the rest of a message that spans frames: append, parse only once it is complete
            buf += data
            if len(buf) < s.need:
                return
            data = bytes(buf)
            buf.clear()
        off, end = 0, len(data)
        limit = self._max_message
        events, sid = self._events, s.sid
        while end - off >= 5:
            if data[off]:
                self._fail_call(s, UNIMPLEMENTED, "compressed messages are not supported")
                return
            size = int.from_bytes(data[off + 1 : off + 5], "big")
            if size > limit:
                self._fail_call(
                    s, RESOURCE_EXHAUSTED, f"message of {size} bytes exceeds the limit of {limit}"
                )
                return
            stop = off + 5 + size
            if end < stop:
                s.need = 5 + size
                break
            events.append((sid, data[off + 5 : stop]))
            off = stop
        else:
            s.need = 5
        if off < end:
            buf += data[off:]

    def _on_headers(self, sid: int, flags: int, payload: bytes) -> None:
        if sid == 0:
            raise ProtocolError(E_PROTOCOL, "HEADERS on stream 0")
        if flags & _PADDED:
            payload = cast(bytes, _unpad(payload))
        if flags & _PRIORITY_FLAG:
            if len(payload) < 5:
                raise ProtocolError(E_FRAME_SIZE, "HEADERS priority fields missing")
            payload = payload[5:]
        if len(payload) > self.limits.max_header_list_bytes:
            raise ProtocolError(E_ENHANCE_YOUR_CALM, "header block too large")
        if flags & _END_HEADERS:
            self._header_block(sid, payload, bool(flags & _END_STREAM))
        else:
            self._block, self._block_sid = bytearray(payload), sid
            self._block_end_stream, self._block_frames = bool(flags & _END_STREAM), 0

    def _on_continuation(self, sid: int, flags: int, payload: bytes) -> None:
        block = self._block
        if block is None:
            raise ProtocolError(E_PROTOCOL, "CONTINUATION without HEADERS")
        self._block_frames += 1
        if self._block_frames > self.limits.max_continuation_frames:
            raise ProtocolError(E_ENHANCE_YOUR_CALM, "too many CONTINUATION frames")
        if not payload and not flags & _END_HEADERS:
            self._no_reply_frame()
        block += payload
        if len(block) > self.limits.max_header_list_bytes:
            raise ProtocolError(E_ENHANCE_YOUR_CALM, "header block too large")
        if flags & _END_HEADERS:
            self._block = None
            self._header_block(sid, bytes(block), self._block_end_stream)

    def _header_block(self, sid: int, block: bytes, end_stream: bool) -> None:
        if table_size_updates(block) > self.limits.max_table_size_updates:
            raise ProtocolError(E_COMPRESSION, "too many dynamic table size updates")
        headers = self._blocks.get(block)
        if headers is None:
            headers = self._decode(block)
        s = self.streams.get(sid)
        if s is not None:  # trailers from the client (gRPC clients send none): the end of its input
            if not end_stream or s.input_ended:
                self._stream_error(sid, E_PROTOCOL if not end_stream else E_STREAM_CLOSED)
            else:
                s.input_ended = True
                self._events.append(InputEnded(sid))
            return
        if sid % 2 == 0:
            raise ProtocolError(E_PROTOCOL, "even stream id from a client")
        if sid <= self.last_sid:
            if headers and headers[0][0][:1] == b":":  # a new request: ids must increase (RFC 9113 5.1.1)
                raise ProtocolError(E_PROTOCOL, "stream id reused or lower than a previous one")
            self._no_reply_frame()  # trailers of a call already over
            return
        self.last_sid = sid
        if self.going_away or len(self.streams) >= self.limits.max_concurrent_streams:
            self._count_reset()
            self._rst(sid, E_REFUSED_STREAM)
            return
        self._request(sid, headers, end_stream)

    def _decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """HPACK-decode ``block`` (always, even for streams we refuse: the table must stay in step).

        Proxies send the same block for every call (Envoy: the method path as a Huffman literal, the rest
        indexed), so a block that left the dynamic table untouched is remembered until the table changes.
        """
        table = self._decoder.header_table
        entries = table.dynamic_entries
        size, first, maxsize = len(entries), entries[0] if entries else None, table.maxsize
        try:
            headers = cast(list[tuple[bytes, bytes]], self._decoder.decode(block, raw=True))
        except Exception as exc:  # the reason is fixed text: the library's may carry object reprs
            raise ProtocolError(E_COMPRESSION, "cannot decode a header block") from exc
        # an insertion puts a new tuple first (identity, not equality: the same header may be added again)
        if len(entries) != size or (entries[0] if entries else None) is not first or table.maxsize != maxsize:
            self._blocks.clear()
        elif len(self._blocks) < 64:
            self._blocks[block] = headers
        return headers

    def _request(self, sid: int, headers: Sequence[tuple[bytes, bytes]], end_stream: bool) -> None:
        path = ctype = b""
        for k, v in headers:
            if k == b":path":
                path = v
            elif k == b"content-type":
                ctype = v
            elif k == b"grpc-encoding" and v != b"identity":
                self._closing_reply(
                    sid, _BLOCK_RESPONSE + _trailer_block(UNIMPLEMENTED, "grpc-encoding"), end_stream
                )
                return
        if not ctype.startswith(b"application/grpc"):
            self._closing_reply(sid, _BLOCK_415, end_stream)
            return
        lim = self.limits
        self.streams[sid] = _Stream(
            sid, self.peer_initial_window, lim.stream_window, self._now + lim.call_deadline_seconds
        )
        self._events.append(CallStarted(sid, path.decode("ascii", "replace")))
        if end_stream:
            self.streams[sid].input_ended = True
            self._events.append(InputEnded(sid))

    def _closing_reply(self, sid: int, block: bytes, end_stream: bool) -> None:
        """A whole answer in one HEADERS frame for a stream never opened as a call."""
        self._out.append(self._headers_frame(sid, block, end_stream=True))
        if not end_stream:  # the client may still be sending: tell it to stop (RFC 9113 8.1)
            self._rst(sid, E_NO_ERROR)

    def _on_rst(self, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise ProtocolError(E_PROTOCOL, "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise ProtocolError(E_FRAME_SIZE, "RST_STREAM of the wrong size")
        if sid > self.last_sid:
            raise ProtocolError(E_PROTOCOL, "RST_STREAM on an idle stream")
        s = self.streams.get(sid)
        if s is None:
            self._no_reply_frame()  # a call already over: nothing to cancel
            return
        if not s.headers_sent:
            # Cancelled before we answered anything: the rapid-reset pattern (work started, never read).
            # A reset after our reply is how proxies end a call they are done with -- Envoy's ext_proc
            # filter resets every stream once it has its last response -- and is not counted.
            self._count_reset()
        self._forget(s)
        self._events.append(CallEnded(sid, True))

    def _on_window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ProtocolError(E_FRAME_SIZE, "WINDOW_UPDATE of the wrong size")
        inc = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if sid == 0:
            if inc == 0:
                raise ProtocolError(E_PROTOCOL, "WINDOW_UPDATE of 0")
            self._send_window += inc
            if self._send_window > _MAX_WINDOW:
                raise ProtocolError(E_FLOW_CONTROL, "connection window overflow")
            if self._pending_total:
                for waiting in list(self.streams.values()):
                    if waiting.pending:
                        self._drain(waiting)
            return
        if sid > self.last_sid:
            raise ProtocolError(E_PROTOCOL, "WINDOW_UPDATE on an idle stream")
        s = self.streams.get(sid)
        if s is None:
            return  # a call already over
        if inc == 0:
            self._stream_error(sid, E_PROTOCOL)
            return
        s.send_window += inc
        if s.send_window > _MAX_WINDOW:
            self._stream_error(sid, E_FLOW_CONTROL)
        elif s.pending:
            self._drain(s)

    def _on_settings(self, sid: int, flags: int, payload: bytes) -> None:
        if sid != 0:
            raise ProtocolError(E_PROTOCOL, "SETTINGS on a stream")
        if flags & _ACK:
            if payload:
                raise ProtocolError(E_FRAME_SIZE, "SETTINGS ack with a payload")
            return
        if len(payload) % 6:
            raise ProtocolError(E_FRAME_SIZE, "SETTINGS of the wrong size")
        self._no_reply_frame()
        for i in range(0, len(payload), 6):
            key = int.from_bytes(payload[i : i + 2], "big")
            value = int.from_bytes(payload[i + 2 : i + 6], "big")
            if key == _S_INITIAL_WINDOW:
                if value > _MAX_WINDOW:
                    raise ProtocolError(E_FLOW_CONTROL, "SETTINGS_INITIAL_WINDOW_SIZE too large")
                delta, self.peer_initial_window = value - self.peer_initial_window, value
                for s in self.streams.values():
                    s.send_window += delta
                    if s.send_window > _MAX_WINDOW:
                        raise ProtocolError(E_FLOW_CONTROL, "a stream window overflowed")
            elif key == _S_MAX_FRAME:
                if not 16384 <= value <= 16777215:
                    raise ProtocolError(E_PROTOCOL, "bad SETTINGS_MAX_FRAME_SIZE")
                self._peer_frame_max = value
            elif key == _S_ENABLE_PUSH and value > 1:
                raise ProtocolError(E_PROTOCOL, "bad SETTINGS_ENABLE_PUSH")
        self._out.append(frame_header(0, _SETTINGS, _ACK, 0))
        if self._pending_total:
            for s in list(self.streams.values()):
                if s.pending:
                    self._drain(s)

    # -- errors -------------------------------------------------------------------------------------------
    def _stream_error(self, sid: int, code: int) -> None:
        """RST_STREAM ``code`` (RFC 9113 5.4.2); an open call ends (cancelled) and the connection lives."""
        self._count_reset()
        self._rst(sid, code)
        s = self.streams.get(sid)
        if s is not None:
            self._forget(s)
            self._events.append(CallEnded(sid, True))

    def _fail_call(self, s: _Stream, code: int, details: str) -> None:
        """A bad message: the call ends with ``code`` (trailers), the handler is told (not cancelled)."""
        self.end_call(s.sid, code, details)
        self._events.append(CallEnded(s.sid, False))

    def _connection_error(self, code: int, reason: str) -> None:
        """GOAWAY ``code`` with the fixed text ``reason`` (never an object's repr); the connection is over."""
        self._goaway(code, reason)
        self.closed = True
        self._events.append(ConnectionEnded(code, reason))

    # -- time ---------------------------------------------------------------------------------------------
    def tick(self, now: float) -> list[Event]:
        """Apply the clock (the shell calls this about once a second): rate intervals, the preface, idle and
        keep-alive timeouts, call deadlines. The events it caused."""
        self._now = now
        events = self._events = []
        if self.closed:
            return events
        lim = self.limits
        if now >= self._interval_end:
            self._resets = self._no_reply = 0
            self._interval_end = now + lim.interval_seconds
        if self._active:
            self._active, self._last_active, self._ping_sent_at = False, now, None
        quiet = now - self._last_active
        if not self._preface:
            if now - self._started >= lim.preface_timeout_seconds:
                self._connection_error(E_PROTOCOL, "no connection preface in time")
        elif not self.streams:
            if quiet >= lim.idle_timeout_seconds:
                self._connection_error(E_NO_ERROR, "idle")
        elif self._ping_sent_at is not None:
            if now - self._ping_sent_at >= lim.keepalive_timeout_seconds:
                self._connection_error(E_NO_ERROR, "keep-alive PING unanswered")
        elif quiet >= lim.keepalive_interval_seconds:
            self._ping_sent_at = now
            self._out.append(frame_header(8, _PING, 0, 0) + b"inferkap")
        if not self.closed:
            for s in [s for s in self.streams.values() if now >= s.deadline]:
                self._expire(s)
        return events

    def _expire(self, s: _Stream) -> None:
        if s.trailers is None and not s.pending:
            self.end_call(s.sid, DEADLINE_EXCEEDED, "call deadline exceeded")
        else:  # the reply is stuck behind the client's window: cut it
            self._rst(s.sid, E_CANCEL)
            self._forget(s)
        self._events.append(CallEnded(s.sid, True))

    # -- back-pressure ------------------------------------------------------------------------------------
    def hold(self, sid: int, nbytes: int) -> None:
        """The shell keeps ``nbytes`` of a stream's input for later: they are not given back to the
        client's windows until :meth:`release` (or the call ends)."""
        s = self.streams.get(sid)
        if s is not None:
            s.held += nbytes
            s.recv_unacked -= nbytes
            self._recv_unacked -= nbytes

    def release(self, sid: int, nbytes: int) -> None:
        """The shell took ``nbytes`` it held: they may be credited to the client again."""
        s = self.streams.get(sid)
        if s is not None:
            nbytes = min(nbytes, s.held)
            s.held -= nbytes
            s.recv_unacked += nbytes
            self._recv_unacked += nbytes
            self._credit_due.append(s)

    def _credit(self) -> None:
        """WINDOW_UPDATEs for what was taken: the connection's once half its window is used, a stream's
        likewise (never after its END_STREAM: nothing more can come). Withheld while replies wait for the
        client's window beyond a quarter of their cap: a client that sends without reading is slowed down
        instead of growing our buffers."""
        lim = self.limits
        if (
            self._recv_unacked >= lim.connection_window >> 1
            and self._pending_total <= lim.max_pending_connection_bytes >> 2
        ):
            self._recv_window += self._recv_unacked
            self._window_update(0, self._recv_unacked)
            self._recv_unacked = 0
        if self._credit_due:
            half, most = lim.stream_window >> 1, lim.max_pending_stream_bytes >> 2
            for s in self._credit_due:
                if s.recv_unacked >= half and not s.input_ended and self.streams.get(s.sid) is s:
                    if len(s.pending) > most:
                        continue  # its replies are not read: no more input until they are (see _drain)
                    s.recv_window += s.recv_unacked
                    self._window_update(s.sid, s.recv_unacked)
                    s.recv_unacked = 0
            self._credit_due.clear()

    # -- output -------------------------------------------------------------------------------------------
    def data_to_send(self) -> list[Buffer]:
        """Everything queued since the last call, as buffers for one (vectored) write."""
        if self._recv_unacked >= self._conn_credit_at or self._credit_due:
            self._credit()
        out = self._out
        if out:
            self._out = []
        return out

    def _headers_frame(self, sid: int, block: bytes, *, end_stream: bool) -> bytes:
        if not self._table_zeroed:
            self._table_zeroed = True
            block = _TABLE_SIZE_ZERO + block
        flags = _END_HEADERS | (_END_STREAM if end_stream else 0)
        return frame_header(len(block), _HEADERS, flags, sid) + block

    def _window_update(self, sid: int, increment: int) -> None:
        self._out.append(frame_header(4, _WINDOW_UPDATE, 0, sid) + increment.to_bytes(4, "big"))

    def _rst(self, sid: int, code: int) -> None:
        self._out.append(frame_header(4, _RST_STREAM, 0, sid) + code.to_bytes(4, "big"))

    def _goaway(self, code: int, reason: str = "") -> None:
        body = self.last_sid.to_bytes(4, "big") + code.to_bytes(4, "big") + reason.encode()[:256]
        self._out.append(frame_header(len(body), _GOAWAY, 0, 0) + body)

    def goaway(self) -> None:
        """Graceful shutdown: GOAWAY (NO_ERROR); new calls are refused, the open ones may finish."""
        if not self.closed and not self.going_away:
            self.going_away = True
            self._goaway(E_NO_ERROR)

    def send_messages(self, sid: int, pieces: list[Buffer], total: int) -> bool:
        """Queue DATA frames carrying ``pieces`` (``total`` bytes, already gRPC-framed) within the peer's
        windows; what does not fit waits for WINDOW_UPDATE. False: the call is gone (it was reset because
        too much waits, or ended before), or the whole connection is (:attr:`closed`)."""
        s = self.streams.get(sid)
        if s is None or s.trailers is not None or self.closed:
            return False
        out = self._out
        if not s.headers_sent:
            s.headers_sent = True
            out.append(self._headers_frame(sid, _BLOCK_RESPONSE, end_stream=False))
        if not s.pending and total <= s.send_window and total <= self._send_window:
            s.send_window -= total
            self._send_window -= total
            if total <= self._peer_frame_max:
                out.append(total.to_bytes(3, "big") + _DATA_HEADER_TAIL + sid.to_bytes(4, "big"))
                out.extend(pieces)
            else:
                self._split(sid, pieces)
            return True
        for piece in pieces:
            s.pending += piece
        self._pending_total += total
        self._drain(s)
        lim = self.limits
        if len(s.pending) > lim.max_pending_stream_bytes:
            self._rst(sid, E_ENHANCE_YOUR_CALM)
            self._forget(s)
            return False
        if self._pending_total > lim.max_pending_connection_bytes:
            self._connection_error(E_ENHANCE_YOUR_CALM, "replies not read")
            return False
        return True

    def _split(self, sid: int, pieces: list[Buffer]) -> None:
        """DATA frames of at most the peer's frame size, cut from ``pieces`` with memoryviews (no copies)."""
        limit = self._peer_frame_max
        out = self._out
        frame: list[Buffer] = []
        room = limit
        for piece in pieces:
            view = memoryview(piece)
            while view:
                part = view[:room]
                frame.append(part)
                room -= len(part)
                view = view[len(part) :]
                if room == 0:
                    out.append(frame_header(limit, _DATA, 0, sid))
                    out.extend(frame)
                    frame, room = [], limit
        if frame:
            out.append(frame_header(limit - room, _DATA, 0, sid))
            out.extend(frame)

    def _drain(self, s: _Stream) -> None:
        """Send what the windows allow of ``s.pending``; then its trailers once nothing is left."""
        pending = s.pending
        while pending:
            n = min(len(pending), s.send_window, self._send_window, self._peer_frame_max)
            if n <= 0:
                return
            s.send_window -= n
            self._send_window -= n
            self._pending_total -= n
            self._out.append(frame_header(n, _DATA, 0, s.sid) + bytes(pending[:n]))
            del pending[:n]
        if s.recv_unacked >= self.limits.stream_window >> 1:
            self._credit_due.append(s)  # input held back while the replies waited
        if s.trailers is not None:
            self._send_trailers(s, s.trailers)

    def end_call(self, sid: int, code: int, details: str = "") -> None:
        """End the call with gRPC status ``code``: trailers (after the replies still waiting for the
        window), or a trailers-only answer when nothing was sent. No-op for a call already ended."""
        s = self.streams.get(sid)
        if s is None or s.trailers is not None or self.closed:
            return
        if not s.headers_sent:
            self._out.append(
                self._headers_frame(sid, _BLOCK_RESPONSE + _trailer_block(code, details), end_stream=True)
            )
            if not s.input_ended:
                self._rst(sid, E_NO_ERROR)
            self._forget(s)
            return
        block = _BLOCK_OK if code == OK and not details else _trailer_block(code, details)
        if s.pending:
            s.trailers = block
        else:
            self._send_trailers(s, block)

    def _send_trailers(self, s: _Stream, block: bytes) -> None:
        self._out.append(self._headers_frame(s.sid, block, end_stream=True))
        if not s.input_ended:  # the client is still sending: tell it to stop (RFC 9113 8.1)
            self._rst(s.sid, E_NO_ERROR)
        self._forget(s)

    def _forget(self, s: _Stream) -> None:
        """Drop a stream: its waiting replies, and its held input given back to the connection window."""
        if self.streams.pop(s.sid, None) is None:
            return
        self._pending_total -= len(s.pending)
        s.pending.clear()
        if s.held:
            self._recv_unacked += s.held
            s.held = 0
        s.trailers = b""  # marks it over for any late send_messages/end_call through a stale reference
