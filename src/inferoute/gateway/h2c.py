"""HTTP/2 cleartext to model servers (``app_protocol: h2c``; an InferencePool's ``appProtocol:
kubernetes.io/h2c``).

h2c here is *prior knowledge* (RFC 9113 §3.3): the gateway opens TCP and starts with the HTTP/2 preface, as
Envoy and the GIE gateways do for ``kubernetes.io/h2c``; there is no ``Upgrade: h2c`` dance. The protocol
state is the ``h2`` library's (sans I/O); this module is the asyncio shell around it, built to give
:class:`~inferoute.gateway.proxy.Forwarder` exactly what an aiohttp response gives it, so the relay and its
fallback walk treat both protocols alike:

* **Errors** are aiohttp's classes: anything before the response headers (connection refused, connect
  timeout, a peer that does not speak HTTP/2, a stream refused or reset, GOAWAY, connection lost) is an
  :class:`H2cConnectError` (a ``ClientConnectionError``: the fallback walk moves on; when no connection
  could be opened at all, an :class:`H2cUnreachable`, which passive health reports); a stream that breaks
  off after its headers is an :class:`H2cStreamError` (a ``ClientPayloadError``); silence longer than
  ``timeouts.read_idle`` is aiohttp's ``ServerTimeoutError``.
* **Streaming**: :meth:`H2cBody.iter_any` hands out whatever DATA arrived since the last call, so an SSE event
  goes on to the client as soon as its frame arrives.
* **Cancelling**: closing or releasing a response whose stream has not ended sends ``RST_STREAM(CANCEL)`` (the
  client went away, a 5xx was skipped, a timeout hit): the model server stops generating; the connection and
  its other streams carry on.
* **Multiplexing and reuse**: :class:`H2cPool` keeps connections per ``ip:port``; a request takes the first
  live connection with a free stream slot (the peer's ``SETTINGS_MAX_CONCURRENT_STREAMS``) and opens another
  only when all are full (``upstream.max_connections_per_upstream`` caps them; over it, requests wait for a
  slot). A connection with no streams is closed after ``upstream.keepalive_timeout``; one that received
  GOAWAY takes no new streams.
* **Flow control**: the connection window is handed back as data arrives (a slow client never stalls the
  other streams of its connection); a stream's window only as the relay consumes its data, so a slow client
  holds at most :data:`STREAM_WINDOW` bytes here before the model server is told to wait. Request bodies are
  sent as the peer's windows allow, a large one from a task while the response may already arrive.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable
from typing import cast

import aiohttp
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from multidict import CIMultiDict, CIMultiDictProxy

from inferoute.endpoints import split_hostport

log = logging.getLogger(__name__)

STREAM_WINDOW = 1 << 20
"""Bytes of one response the peer may send ahead of the relay (its stream's receive window)."""
CONNECTION_WINDOW = 16 << 20
"""The connection's receive window; handed back as data arrives."""
_LAST_STREAM_ID = (1 << 31) - 3
"""Stream ids are odd and below 2**31: a connection that used them all takes no new requests."""
_DEFAULT_MAX_STREAMS = 100
"""Streams per connection until the peer's SETTINGS say otherwise (RFC 9113 recommends at least 100)."""


class H2cConnectError(aiohttp.ClientConnectionError):
    """No response headers from this endpoint: the fallback walk may try the next one."""


class H2cUnreachable(H2cConnectError):
    """No connection to the endpoint could be opened (refused, reset, unreachable, timed out): passive
    health marks it down. ``reason`` is what the picker is told."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class H2cStreamError(aiohttp.ClientPayloadError):
    """The response broke off after its headers."""


class _Stream:
    """One request's state on a connection."""

    __slots__ = ("chunks", "conn", "ended", "error", "headers", "id", "sender", "unacked", "waiter")

    def __init__(self, conn: H2cConnection, stream_id: int) -> None:
        self.conn = conn
        self.id = stream_id
        self.headers: asyncio.Future[tuple[int, CIMultiDict[str]]] = conn.loop.create_future()
        self.chunks: collections.deque[bytes] = collections.deque()
        self.ended = False
        self.error: BaseException | None = None
        self.unacked = 0
        self.waiter: asyncio.Future[None] | None = None
        self.sender: asyncio.Task[None] | None = None

    def wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def fail(self, exc: BaseException) -> None:
        if not self.headers.done():
            self.headers.set_exception(exc)
            self.headers.exception()  # retrieved here: a request that already gave up must not log it
        elif self.error is None and not self.ended:
            self.error = exc
        self.wake()


class H2cBody:
    """The response body, read the way the relay reads aiohttp's ``StreamReader``."""

    __slots__ = ("_read_idle", "_stream")

    def __init__(self, stream: _Stream, read_idle: float) -> None:
        self._stream = stream
        self._read_idle = read_idle

    async def _next(self) -> bytes | None:
        """What arrived since the last call (waiting up to ``read_idle`` for it); None at the end."""
        s = self._stream
        while not s.chunks:
            if s.error is not None:
                raise s.error
            if s.ended:
                return None
            s.waiter = s.conn.loop.create_future()
            try:
                async with asyncio.timeout(self._read_idle):
                    await s.waiter
            except TimeoutError:
                raise aiohttp.ServerTimeoutError(
                    f"no data from the model server within {self._read_idle:g}s"
                ) from None
            finally:
                s.waiter = None
        data = s.chunks.popleft() if len(s.chunks) == 1 else b"".join(s.chunks)
        s.chunks.clear()
        s.conn.consumed(s, len(data))
        return data

    async def read(self) -> bytes:
        parts = []
        while (data := await self._next()) is not None:
            parts.append(data)
        return b"".join(parts)

    def iter_any(self) -> AsyncIterator[bytes]:
        return _Chunks(self)


class _Chunks:
    __slots__ = ("_body",)

    def __init__(self, body: H2cBody) -> None:
        self._body = body

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        data = await self._body._next()
        if data is None:
            raise StopAsyncIteration
        return data


class H2cResponse:
    """An upstream response over h2c with the attributes the relay reads from an aiohttp response."""

    __slots__ = ("_closed", "_stream", "content", "content_length", "headers", "reason", "status")

    def __init__(self, stream: _Stream, status: int, headers: CIMultiDict[str], read_idle: float) -> None:
        self._stream = stream
        self.status = status
        self.reason: str | None = None  # HTTP/2 has no reason phrase; aiohttp fills in the standard one
        self.headers = CIMultiDictProxy(headers)
        length = headers.get("content-length")
        self.content_length = int(length) if length is not None and length.isdigit() else None
        self.content = H2cBody(stream, read_idle)
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def release(self) -> None:
        """Done with the response: a stream that has not ended is cancelled."""
        self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._stream.conn.finish(self._stream)


class H2cConnection(asyncio.Protocol):
    """One HTTP/2 connection to one model server."""

    def __init__(self, pool: H2cPool, key: str) -> None:
        self.pool = pool
        self.key = key
        self.loop = asyncio.get_running_loop()
        self.h2 = h2.connection.H2Connection(
            # Outbound validation is redundant here and a tenth of the cost of a request: the pseudo-headers
            # are built below, the rest are lowercased names and values from the client's parsed HTTP/1.1
            # request, hop-by-hop ones removed (normalisation still keeps Authorization and Cookie values out
            # of the HPACK table). What the model server sends is validated.
            h2.config.H2Configuration(client_side=True, header_encoding=None, validate_outbound_headers=False)
        )
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, _Stream] = {}
        self.closed = False
        self.goaway = False
        self.max_streams = _DEFAULT_MAX_STREAMS
        self._conn_unacked = 0
        self._window_waiters: list[asyncio.Future[None]] = []
        self._drain: asyncio.Future[None] | None = None
        self._idle: asyncio.TimerHandle | None = None
        self.lost: asyncio.Future[None] = self.loop.create_future()

    # --- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no asyncio.Transport subclass
        codes = h2.settings.SettingCodes
        self.h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={codes.ENABLE_PUSH: 0, codes.INITIAL_WINDOW_SIZE: STREAM_WINDOW},
        )
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._abort(H2cConnectError(f"{self.key}: not an HTTP/2 (h2c) peer or protocol error: {exc}"))
            return
        for ev in events:
            self._event(ev)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        err = H2cConnectError(f"{self.key}: connection lost" + (f": {exc}" if exc else ""))
        for s in list(self.streams.values()):
            s.fail(err if not s.headers.done() else H2cStreamError(f"{self.key}: connection lost"))
        self.streams.clear()
        self._wake_senders()
        if self._idle is not None:
            self._idle.cancel()
        if not self.lost.done():
            self.lost.set_result(None)

    def pause_writing(self) -> None:
        if self._drain is None:
            self._drain = self.loop.create_future()

    def resume_writing(self) -> None:
        d, self._drain = self._drain, None
        if d is not None and not d.done():
            d.set_result(None)

    # --- events

    def _event(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.DataReceived):
            s = self.streams.get(ev.stream_id or 0)
            n = ev.flow_controlled_length or 0
            self._conn_unacked += n
            if self._conn_unacked >= CONNECTION_WINDOW // 2:
                self.h2.increment_flow_control_window(self._conn_unacked)
                self._conn_unacked = 0
            if s is None:
                return
            s.unacked += n - len(ev.data or b"")  # padding counts against the window, never reaches the relay
            if ev.data:
                s.chunks.append(ev.data)
            s.wake()
        elif isinstance(ev, h2.events.ResponseReceived):
            s = self.streams.get(ev.stream_id or 0)
            if s is not None and not s.headers.done():
                s.headers.set_result(_response_head(ev.headers or []))
        elif isinstance(ev, h2.events.StreamEnded):
            s = self.streams.get(ev.stream_id or 0)
            if s is not None:
                s.ended = True
                s.fail(H2cConnectError(f"{self.key}: stream ended without response headers"))
                s.wake()
        elif isinstance(ev, h2.events.StreamReset):
            s = self.streams.pop(ev.stream_id or 0, None)
            if s is not None:
                why = f"{self.key}: stream reset by the model server ({_code(ev.error_code)})"
                s.fail(H2cStreamError(why) if s.headers.done() else H2cConnectError(why))
                self._stream_done()
            self._wake_senders()
        elif isinstance(ev, h2.events.WindowUpdated):
            self._wake_senders()
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            self.max_streams = min(self.h2.remote_settings.max_concurrent_streams, 1 << 16)
            self._wake_senders()
            self.pool.slot_freed(self.key)
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self._goaway(ev.last_stream_id or 0, _code(ev.error_code))

    def _goaway(self, last_stream_id: int, code: str) -> None:
        """GOAWAY: no new streams here; the streams it did not take are refused (another endpoint may)."""
        self.goaway = True
        self.pool.forget(self)
        for sid in [sid for sid in self.streams if sid > last_stream_id]:
            self.streams.pop(sid).fail(H2cConnectError(f"{self.key}: GOAWAY ({code}) refused the stream"))
        if not self.streams and self.transport is not None:
            self.transport.close()

    # --- requests

    @property
    def usable(self) -> bool:
        return (
            not self.closed
            and not self.goaway
            and len(self.streams) < self.max_streams
            and (self.h2.highest_outbound_stream_id or 0) < _LAST_STREAM_ID
        )

    async def request(
        self,
        method: str,
        authority: str,
        path_qs: str,
        headers: Iterable[tuple[str, str]],
        body: bytes | AsyncIterator[bytes] | None,
        read_idle: float,
    ) -> H2cResponse:
        """Send one request on a new stream; the response once its headers arrived."""
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        sid = self.h2.get_next_available_stream_id()
        s = _Stream(self, sid)
        self.streams[sid] = s
        fields = [
            (b":method", method.encode()),
            (b":scheme", b"http"),
            (b":authority", authority.encode()),
            (b":path", path_qs.encode("utf-8", "surrogateescape")),
        ]
        has_length = False
        for k, v in headers:
            lk = k.lower()
            has_length = has_length or lk == "content-length"
            fields.append((lk.encode(), v.encode("utf-8", "surrogateescape")))
        if isinstance(body, bytes) and body and not has_length:
            fields.append((b"content-length", str(len(body)).encode()))
        try:
            self.h2.send_headers(sid, fields, end_stream=not body)
            if body and not (isinstance(body, bytes) and self._send_now(sid, body)):
                s.sender = self.loop.create_task(self._send_body(s, body))
        except h2.exceptions.ProtocolError as exc:
            self.streams.pop(sid, None)
            self._stream_done()
            raise H2cConnectError(f"{self.key}: cannot send the request: {exc}") from exc
        self.flush()
        try:
            async with asyncio.timeout(read_idle):
                status, head = await s.headers
        except TimeoutError:
            self.finish(s)
            raise aiohttp.ServerTimeoutError(
                f"no response headers from the model server within {read_idle:g}s"
            ) from None
        except BaseException:
            self.finish(s)
            raise
        return H2cResponse(s, status, head, read_idle)

    def _send_now(self, sid: int, body: bytes) -> bool:
        """Send a body that fits the windows at once (the common case); False: a task must send it."""
        frame = self.h2.max_outbound_frame_size
        if len(body) > self.h2.local_flow_control_window(sid):
            return False
        for start in range(0, len(body), frame):
            end = start + frame >= len(body)
            self.h2.send_data(sid, body[start : start + frame], end_stream=end)
        return True

    async def _send_body(self, s: _Stream, body: bytes | AsyncIterator[bytes]) -> None:
        """Send a body as the peer's windows allow; a failing upload cancels the stream."""
        try:
            if isinstance(body, bytes):
                await self._send_bytes(s, body)
            else:
                async for chunk in body:
                    await self._send_bytes(s, chunk)
            if s.id in self.streams and not self.closed:
                self.h2.end_stream(s.id)
                self.flush()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if s.id in self.streams:
                s.fail(H2cConnectError(f"{self.key}: request body upload failed: {exc!r}"))
                self.finish(s)

    async def _send_bytes(self, s: _Stream, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if s.id not in self.streams or self.closed:
                return  # reset or gone: the rest is not wanted
            n = min(len(view), self.h2.local_flow_control_window(s.id), self.h2.max_outbound_frame_size)
            if n <= 0:
                w = self.loop.create_future()
                self._window_waiters.append(w)
                await w
                continue
            self.h2.send_data(s.id, bytes(view[:n]))
            view = view[n:]
            self.flush()
            if self._drain is not None:
                await self._drain

    def _wake_senders(self) -> None:
        waiters, self._window_waiters = self._window_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def consumed(self, s: _Stream, n: int) -> None:
        """The relay took ``n`` bytes of ``s``: hand its window back (in halves of it, not per chunk)."""
        s.unacked += n
        if s.unacked >= STREAM_WINDOW // 2 and not s.ended and s.id in self.streams:
            with contextlib.suppress(h2.exceptions.StreamClosedError):
                self.h2.increment_flow_control_window(s.unacked, stream_id=s.id)
                self.flush()
            s.unacked = 0

    def finish(self, s: _Stream) -> None:
        """The relay is done with ``s``: cancel it unless the model server already ended it."""
        if s.sender is not None and not s.sender.done():
            s.sender.cancel()
        if self.streams.pop(s.id, None) is None:
            return
        if not s.ended and not self.closed:
            with contextlib.suppress(h2.exceptions.StreamClosedError):
                self.h2.reset_stream(s.id, h2.errors.ErrorCodes.CANCEL)
                self.flush()
        self._stream_done()

    def _stream_done(self) -> None:
        self.pool.slot_freed(self.key)
        if not self.streams and not self.closed:
            if self.goaway:
                if self.transport is not None:
                    self.transport.close()
            elif self._idle is None:
                self._idle = self.loop.call_later(self.pool.keepalive_timeout, self._idle_close)

    def _idle_close(self) -> None:
        self._idle = None
        if not self.streams:
            self.close()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.closed:
            self.transport.write(data)

    def _abort(self, exc: BaseException) -> None:
        for s in list(self.streams.values()):
            s.fail(exc)
        self.streams.clear()
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        """Say GOAWAY and close (streams still open are cut)."""
        self.goaway = True  # no new streams while it closes
        if self.closed or self.transport is None:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.close_connection()
            self.flush()
        self.transport.close()


def _code(code: int | None) -> str:
    try:
        return h2.errors.ErrorCodes(code or 0).name
    except ValueError:
        return str(code)


def _response_head(raw: Iterable[tuple[bytes, bytes]]) -> tuple[int, CIMultiDict[str]]:
    status = 0
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in raw:
        if k == b":status":
            status = int(v)
        elif not k.startswith(b":"):
            out.add(k.decode("latin-1"), v.decode("utf-8", "surrogateescape"))
    return status, out


class H2cPool:
    """The h2c connections of one process, per upstream ``ip:port`` (see module docstring)."""

    def __init__(self, connect_timeout: float, keepalive_timeout: float, max_connections: int = 0) -> None:
        self.connect_timeout = connect_timeout
        self.keepalive_timeout = keepalive_timeout
        self.max_connections = max_connections
        self._conns: dict[str, list[H2cConnection]] = {}
        self._connecting: dict[str, asyncio.Future[H2cConnection]] = {}
        self._slot: dict[str, asyncio.Event] = {}

    async def request(
        self,
        method: str,
        up: str,
        path_qs: str,
        headers: Iterable[tuple[str, str]],
        body: bytes | AsyncIterator[bytes] | None,
        read_idle: float,
    ) -> H2cResponse:
        """Send one request to ``up`` (``ip:port``) on a pooled connection."""
        conn = await self._acquire(up)
        return await conn.request(method, up, path_qs, headers, body, read_idle)

    async def _acquire(self, up: str) -> H2cConnection:
        while True:
            conns = self._conns.get(up, [])
            for c in conns:
                if c.usable:
                    return c
            pending = self._connecting.get(up)
            if pending is not None:
                await asyncio.shield(pending)  # its error is this request's error too
                continue
            if self.max_connections and len(conns) >= self.max_connections:
                slot = self._slot.setdefault(up, asyncio.Event())
                slot.clear()
                await slot.wait()
                continue
            return await self._connect(up)

    async def _connect(self, up: str) -> H2cConnection:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[H2cConnection] = loop.create_future()
        self._connecting[up] = fut
        try:
            host, port = split_hostport(up)
            if port is None:
                raise H2cConnectError(f"{up}: expected ip:port")
            try:
                async with asyncio.timeout(self.connect_timeout):
                    _, conn = await loop.create_connection(lambda: H2cConnection(self, up), host, port)
            except TimeoutError as exc:
                message = f"{up}: connect timed out after {self.connect_timeout:g}s"
                raise H2cUnreachable(message, "connect timed out") from exc
            except ConnectionRefusedError as exc:
                raise H2cUnreachable(f"{up}: {exc.strerror or exc}", "connection refused") from exc
            except ConnectionResetError as exc:
                raise H2cUnreachable(f"{up}: {exc.strerror or exc}", "connection reset") from exc
            except OSError as exc:
                reason = f"connect failed ({type(exc).__name__})"
                raise H2cUnreachable(f"{up}: {exc.strerror or exc}", reason) from exc
            self._conns.setdefault(up, []).append(conn)
            fut.set_result(conn)
            return conn
        except BaseException as exc:
            fut.set_exception(exc if isinstance(exc, Exception) else H2cConnectError(f"{up}: cancelled"))
            fut.exception()  # retrieved: waiters re-raise it, nobody else must log it
            raise
        finally:
            del self._connecting[up]

    def forget(self, conn: H2cConnection) -> None:
        """``conn`` takes no new streams (closed or GOAWAY)."""
        conns = self._conns.get(conn.key)
        if conns and conn in conns:
            conns.remove(conn)
            if not conns:
                del self._conns[conn.key]
        self.slot_freed(conn.key)

    def slot_freed(self, up: str) -> None:
        ev = self._slot.get(up)
        if ev is not None:
            ev.set()

    async def aclose(self) -> None:
        conns = [c for lst in self._conns.values() for c in lst]
        self._conns.clear()
        for c in conns:
            c.close()
        if conns:
            await asyncio.wait([c.lost for c in conns], timeout=1.0)


__all__ = ["H2cConnectError", "H2cPool", "H2cResponse", "H2cStreamError", "H2cUnreachable"]
