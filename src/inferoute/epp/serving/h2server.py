"""A small gRPC server on HTTP/2 and asyncio, for the picker's hot path.

Why not ``grpc.aio``
--------------------
Every gRPC message read or written through ``grpc.aio`` crosses from the C core's completion-queue thread to
the event loop and back; on this project's 2-core machine that costs ~70-100 µs per message, and one ext_proc
exchange is 4-10 messages. The pure-Python ``h2`` library avoids that crossing, but its per-frame state
machine becomes the largest cost in the profile. So this module speaks the part of HTTP/2 (RFC 9113) a gRPC
server needs itself, with slicing and ints: frames are parsed straight from ``data_received``, each
decoded message goes to its stream's handler synchronously, and every reply produced in one loop iteration
leaves in one ``write``. On one core it does 6.3x the full ext_proc exchanges per second of ``grpc.aio``
with the embedded picker, 12x with prebuilt replies (docs/benchmarks/picker.md). HPACK decoding uses
the ``hpack`` library; what we send is prebuilt literal blocks that never touch the peer's dynamic table.

Layers: the protocol is :mod:`inferoute.epp.serving.h2core` (sans I/O: bytes in, events and bytes out, every
limit in :class:`~inferoute.epp.serving.h2core.Limits`); this module is the asyncio shell around it: it
feeds the core what the socket delivers, opens a handler per call, decodes each message and hands it to the
handler synchronously, writes what the core queued once per loop iteration, runs one ticker for the core's
timeouts and caps the number of connections.

What the core implements: the connection preface and SETTINGS (ack, initial window, max frame size), HEADERS
with CONTINUATION, padding and priority fields, DATA, RST_STREAM, PING (answered), GOAWAY (both ways;
graceful shutdown), WINDOW_UPDATE, flow control both ways (receive windows enforced, credited back as calls
take their input; sends wait for the peer's windows), stream and connection errors as RFC 9113 prescribes.
Of gRPC: length-prefixed messages (uncompressed; a compressed one ends the call with UNIMPLEMENTED),
response headers + trailers (``grpc-status``, percent-encoded ``grpc-message``), trailers-only responses,
UNIMPLEMENTED for unknown methods, HTTP 415 for a non-gRPC content type, a maximum message size
(RESOURCE_EXHAUSTED), a call deadline (DEADLINE_EXCEEDED), cancellation by RST_STREAM, TLS with ALPN ``h2``
(asyncio's ssl). Not implemented (no ext_proc peer uses them): compression, ``grpc-timeout`` deadlines,
reflection, server push.

Handlers
--------
A method is a factory ``open(writer) -> StreamHandler``. The handler's ``feed`` gets each request message in
order and returns the replies at once -- or ``None`` when it must wait for something (the picker's
decision); the server then runs ``resume()`` as a task and holds later messages of that stream until it
returns. ``end_of_input`` runs when the client half-closes, ``close`` exactly once at the very end.
Handlers raise :class:`GrpcAbort` to end the call with a status; ``writer`` lets long-lived handlers
(health ``Watch``) push messages later.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import resource
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

from inferoute.epp.serving import h2core
from inferoute.epp.serving.h2core import (
    CANCELLED,
    DEADLINE_EXCEEDED,
    INTERNAL,
    INVALID_ARGUMENT,
    NOT_FOUND,
    OK,
    RESOURCE_EXHAUSTED,
    UNAVAILABLE,
    UNIMPLEMENTED,
    Buffer,
    CallEnded,
    CallStarted,
    ConnectionEnded,
    H2Core,
    InputEnded,
    Limits,
    frame_header,
    literal_header,
    percent_encode,
)

__all__ = [
    "CANCELLED",
    "DEADLINE_EXCEEDED",
    "INTERNAL",
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "OK",
    "RESOURCE_EXHAUSTED",
    "UNAVAILABLE",
    "UNIMPLEMENTED",
    "Encoded",
    "GrpcAbort",
    "GrpcServer",
    "Limits",
    "Message",
    "Method",
    "StreamHandler",
    "StreamWriter",
    "frame_header",
    "literal_header",
    "percent_encode",
    "server_streaming",
    "unary",
]

log = logging.getLogger(__name__)


class Message(Protocol):
    def SerializeToString(self) -> bytes: ...


class GrpcAbort(Exception):
    """Raised by a handler to end the call with ``code`` and ``details``."""

    def __init__(self, code: int, details: str = "") -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class StreamWriter(Protocol):
    """What a handler may do outside ``feed``/``resume`` (from its own tasks)."""

    def send(self, messages: Sequence[Message]) -> None: ...

    def finish(self, code: int = OK, details: str = "") -> None: ...


class StreamHandler(Protocol):
    def feed(self, message: Any) -> Sequence[Message] | None:
        """Replies to one request message, or None: call :meth:`resume` (later messages wait)."""

    async def resume(self) -> Sequence[Message]:
        """The replies ``feed`` could not give at once."""

    def end_of_input(self) -> Sequence[Message] | None:
        """The client half-closed after its last message: final replies, after which the call ends with OK;
        None keeps the call open until the handler ends it with ``writer.finish``."""

    def close(self, cancelled: bool) -> None:
        """The call is over (called once, last). ``cancelled``: reset by the client or connection lost."""


@dataclass(frozen=True, slots=True)
class Method:
    """One RPC: how to decode its requests and how to open a handler for a call."""

    request_type: Any  # a protobuf message class (``FromString``)
    open: Callable[[StreamWriter], StreamHandler]


class Encoded:
    """A reply already in protobuf wire format, as pieces: sent as they are (no re-encoding, no joining), so
    a large body echoed back is not copied again on its way to the socket."""

    __slots__ = ("pieces", "size")

    def __init__(self, pieces: Sequence[bytes | memoryview]) -> None:
        self.pieces = pieces
        self.size = sum(len(p) for p in pieces)

    def SerializeToString(self) -> bytes:
        return b"".join(self.pieces)


def _wire(messages: Sequence[Message]) -> tuple[list[Buffer], int]:
    """gRPC length-prefixed messages as a list of buffers, and their total size."""
    pieces: list[Buffer] = []
    total = 0
    for msg in messages:
        if isinstance(msg, Encoded):
            pieces.append(b"\x00" + msg.size.to_bytes(4, "big"))
            pieces.extend(msg.pieces)
            total += 5 + msg.size
        else:
            data = msg.SerializeToString()
            pieces.append(b"\x00" + len(data).to_bytes(4, "big"))
            pieces.append(data)
            total += 5 + len(data)
    return pieces, total


class _Call:
    """One stream = one RPC call: its handler and what waits for the handler."""

    __slots__ = (
        "closed",
        "conn",
        "finished",
        "handler",
        "held",
        "input_ended",
        "method",
        "sid",
        "task",
        "waiting",
    )

    def __init__(self, conn: _Connection, sid: int, method: Method) -> None:
        self.conn = conn
        self.sid = sid
        self.method = method
        self.held: collections.deque[tuple[Any, int]] = collections.deque()  # (message, wire bytes)
        self.waiting = False  # resume() running: hold later messages
        self.input_ended = False
        self.finished = False
        self.closed = False
        self.task: asyncio.Task[None] | None = None
        self.handler: StreamHandler = method.open(self)

    # StreamWriter ---------------------------------------------------------------------------------------
    def send(self, messages: Sequence[Message]) -> None:
        if not self.finished and messages:
            self.conn.send(self, messages)
            self.conn.flush_soon()

    def finish(self, code: int = OK, details: str = "") -> None:
        if not self.finished:
            self.conn.abort(self, code, details)
            self.conn.flush_soon()


_FAILED = object()


class _Connection(asyncio.Protocol):
    """The asyncio shell of one connection: socket bytes into :class:`H2Core`, its events to the handlers,
    its output to the socket (once per loop iteration)."""

    def __init__(self, server: GrpcServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.core = H2Core(server.limits, asyncio.get_running_loop().time())
        self.calls: dict[int, _Call] = {}
        self._flush_scheduled = False

    # asyncio.Protocol -----------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it: no isinstance check
        self.transport = cast(asyncio.Transport, transport)
        if len(self.server.connections) >= self.server.limits.max_connections:
            self.server.refused_connections += 1
            log.warning("gRPC connection refused: %d connections open", len(self.server.connections))
            self.transport.abort()  # the descriptor is freed at once: health and metrics keep theirs
            return
        self.server.connections.add(self)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.core.closed = True
        for call in list(self.calls.values()):
            self._cancel(call)
        self.calls.clear()

    def pause_writing(self) -> None:  # the peer reads slower than we answer: stop reading until it catches up
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self._dispatch(self.core.receive_data(data))
        self.flush()

    def tick(self, now: float) -> None:
        """The server's ticker: the core's timeouts and deadlines."""
        events = self.core.tick(now)
        if events:
            self._dispatch(events)
        self.flush()

    def _dispatch(self, events: list[h2core.Event]) -> None:
        calls = self.calls
        for ev in events:
            if type(ev) is tuple:  # MessageReceived, the hot path: decoded and fed here
                sid, data = ev
                call = calls.get(sid)
                if call is None or call.finished:
                    continue
                try:
                    msg = call.method.request_type.FromString(data)
                except Exception:
                    self.abort(call, INTERNAL, "cannot decode the request message")
                    continue
                if call.waiting:
                    self._hold(call, msg, len(data) + 5)
                else:
                    self._feed(call, msg)
            elif isinstance(ev, CallStarted):
                self._open(ev.sid, ev.path)
            elif isinstance(ev, InputEnded):
                call = calls.get(ev.sid)
                if call is not None:
                    self._input_ended(call)
            elif isinstance(ev, CallEnded):
                self._call_ended(ev)
            elif isinstance(ev, ConnectionEnded):
                self._ended(ev)

    def _call_ended(self, ev: CallEnded) -> None:
        call = self.calls.pop(ev.sid, None)
        if call is None:
            return
        if ev.cancelled:
            self._cancel(call)
        else:
            call.finished = True
            self._close_handler(call, cancelled=False)

    def _ended(self, ev: ConnectionEnded) -> None:
        if ev.code:
            log.info("gRPC connection closed: HTTP/2 error %d: %s", ev.code, ev.reason)
        else:
            log.debug("gRPC connection closed: %s", ev.reason)
        self.flush()
        if self.transport is not None:
            self.transport.close()

    # calls ----------------------------------------------------------------------------------------------
    def _open(self, sid: int, path: str) -> None:
        method = self.server.methods.get(path)
        if method is None:
            self.core.end_call(sid, UNIMPLEMENTED, f"unknown method {path}")
            return
        try:
            call = _Call(self, sid, method)
        except Exception as exc:
            log.exception("gRPC handler for %s failed to open", path)
            self.core.end_call(sid, INTERNAL, f"handler failed: {type(exc).__name__}")
            return
        self.calls[sid] = call

    def _hold(self, call: _Call, msg: Any, nbytes: int) -> None:
        """A message behind a pending decision: kept, and its bytes not credited to the client yet."""
        call.held.append((msg, nbytes))
        self.core.hold(call.sid, nbytes)

    def _input_ended(self, call: _Call) -> None:
        call.input_ended = True
        if not call.waiting and not call.finished:
            self._end_of_input(call)

    def _guarded(self, call: _Call, step: Callable[[], Any]) -> Any:
        """Run a handler step; a failure ends the call (see :meth:`_failed`) and gives _FAILED."""
        try:
            return step()
        except Exception as exc:
            self._failed(call, exc)
        return _FAILED

    def _failed(self, call: _Call, exc: Exception) -> None:
        """A handler raised: GrpcAbort ends the call with its status, anything else with INTERNAL (logged)."""
        if isinstance(exc, GrpcAbort):
            self.abort(call, exc.code, exc.details)
        else:
            log.error("gRPC handler failed", exc_info=exc)
            self.abort(call, INTERNAL, f"handler failed: {exc}")

    def _feed(self, call: _Call, msg: Any) -> None:
        try:
            out = call.handler.feed(msg)
        except Exception as exc:
            self._failed(call, exc)
            return
        if out is None:
            call.waiting = True
            call.task = asyncio.get_running_loop().create_task(self._resume(call))
        elif out:  # (send inlined: this is the hot path)
            pieces, total = _wire(out)
            if not self.core.send_messages(call.sid, pieces, total):
                self._gone(call)

    async def _resume(self, call: _Call) -> None:
        try:
            out = await call.handler.resume()
        except asyncio.CancelledError:
            return  # the call was cancelled: _cancel closed the handler
        except Exception as exc:
            call.task = None
            self._failed(call, exc)
            self.flush_soon()
            return
        call.task = None
        call.waiting = False
        if call.finished:
            return
        if out:
            self.send(call, out)
        held, core = call.held, self.core
        while held and not call.waiting and not call.finished:
            msg, n = held.popleft()
            core.release(call.sid, n)
            self._feed(call, msg)
        if call.input_ended and not call.waiting and not call.finished:
            self._end_of_input(call)
        self.flush_soon()

    def _end_of_input(self, call: _Call) -> None:
        out = self._guarded(call, call.handler.end_of_input)
        if out is _FAILED:
            return
        if out is None:
            return  # the handler ends the call itself
        if out:
            self.send(call, out)
        self.abort(call, OK, "")

    def send(self, call: _Call, messages: Sequence[Message]) -> None:
        if not self.core.send_messages(call.sid, *_wire(messages)):
            self._gone(call)

    def abort(self, call: _Call, code: int, details: str) -> None:
        """End ``call`` with ``code``: the handler is closed (not cancelled), the trailers queued."""
        call.finished = True
        self._close_handler(call, cancelled=False)
        self.calls.pop(call.sid, None)
        self.core.end_call(call.sid, code, details)

    def _gone(self, call: _Call) -> None:
        """The core dropped the call (its replies were not read) or the whole connection."""
        self.calls.pop(call.sid, None)
        self._cancel(call)
        if self.core.closed and self.transport is not None:
            self.flush()
            self.transport.close()

    def _cancel(self, call: _Call) -> None:
        call.finished = True
        if call.task is not None:
            call.task.cancel()
            call.task = None
        self._close_handler(call, cancelled=True)

    @staticmethod
    def _close_handler(call: _Call, *, cancelled: bool) -> None:
        if call.closed:
            return
        call.closed = True
        try:
            call.handler.close(cancelled)
        except Exception:
            log.exception("gRPC handler close failed")

    # output ---------------------------------------------------------------------------------------------
    def flush_soon(self) -> None:
        """Write at the end of this loop iteration: the calls decided in one iteration (one task each)
        leave in one write instead of one write per call."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        out = self.core.data_to_send()
        if not out:
            return
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if len(out) == 1:
                transport.write(out[0])
            elif len(out) > 8:  # large replies: the pieces go out as they are (one vectored write on uvloop)
                transport.writelines(out)
            else:
                transport.write(b"".join(out))

    def goaway(self) -> None:
        """Graceful shutdown: no new calls; the open ones may finish."""
        self.core.goaway()
        self.flush()


RESERVED_DESCRIPTORS = 256
"""Descriptors kept free of gRPC connections (health, metrics, scrapes, logs): see :func:`connection_cap`."""


def connection_cap(wanted: int) -> int:
    """``wanted``, lowered so that ``RLIMIT_NOFILE`` keeps :data:`RESERVED_DESCRIPTORS` free."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - RESERVED_DESCRIPTORS))


class GrpcServer:
    """Serves ``methods`` (``"/package.Service/Method"`` -> :class:`Method`) on one listening socket, within
    ``limits`` (``max_message_bytes`` overrides the limits' own, for callers that set only that)."""

    def __init__(
        self,
        methods: dict[str, Method],
        *,
        max_message_bytes: int | None = None,
        limits: Limits | None = None,
    ) -> None:
        limits = limits or Limits()
        if max_message_bytes is not None:
            limits = dataclasses.replace(
                limits,
                max_message_bytes=max_message_bytes,
                max_pending_stream_bytes=max(limits.max_pending_stream_bytes, 2 * max_message_bytes),
                max_pending_connection_bytes=max(limits.max_pending_connection_bytes, 4 * max_message_bytes),
            )
        cap = connection_cap(limits.max_connections)
        if cap < limits.max_connections:
            log.warning("gRPC connections capped at %d by RLIMIT_NOFILE", cap)
            limits = dataclasses.replace(limits, max_connections=cap)
        self.methods = methods
        self.limits = limits
        self.connections: set[_Connection] = set()
        self.refused_connections = 0
        self._server: asyncio.Server | None = None
        self._ticker: asyncio.Task[None] | None = None
        self.port = 0

    @property
    def max_message_bytes(self) -> int:
        return self.limits.max_message_bytes

    async def start(
        self, host: str, port: int, ssl_context: ssl.SSLContext | None = None, *, reuse_port: bool = False
    ) -> int:
        """Listen; returns the bound port (``port`` 0 picks a free one). OSError when it is taken.
        ``reuse_port``: share the port with the other worker processes (``SO_REUSEPORT``)."""
        if ssl_context is not None:
            ssl_context.set_alpn_protocols(["h2"])
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self),
            host,
            port,
            ssl=ssl_context,
            reuse_address=True,
            reuse_port=reuse_port or None,
            backlog=1024,
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._ticker = loop.create_task(self._tick_forever(), name=f"h2-ticker-{self.port}")
        return self.port

    def tick_interval(self) -> float:
        """How often the core's clock is applied: a quarter of the shortest timeout, at most a second."""
        lim = self.limits
        shortest = min(
            lim.preface_timeout_seconds,
            lim.idle_timeout_seconds,
            lim.keepalive_interval_seconds,
            lim.keepalive_timeout_seconds,
            lim.interval_seconds,
            lim.call_deadline_seconds,
        )
        return max(0.01, min(1.0, shortest / 4))

    async def _tick_forever(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.tick_interval()
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            for conn in list(self.connections):
                try:
                    conn.tick(now)
                except Exception:  # one connection's bug must not stop every connection's timeouts
                    log.exception("gRPC connection tick failed")

    async def stop(self, grace: float) -> None:
        """Stop accepting, send GOAWAY, let open calls finish for ``grace`` seconds, then cut them."""
        if self._server is None:
            return
        self._server.close()
        for conn in list(self.connections):
            conn.goaway()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        # polling: calls end in many places (replies, resets, lost connections); shutdown is rare
        while any(c.calls for c in self.connections) and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        for conn in list(self.connections):
            if conn.transport is not None:
                # cut, not close: a TLS close waits (up to 30 s) for the peer's close_notify, so the socket
                # outlived the server (found by filterwarnings = error: an unclosed transport)
                conn.transport.abort()
        await self._server.wait_closed()
        self._server = None

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.serve_forever()


def unary(request_type: Any, fn: Callable[[Any], Message]) -> Method:
    """A unary method answered synchronously by ``fn(request)``."""

    class _Unary:
        __slots__ = ("got",)

        def __init__(self, _writer: StreamWriter) -> None:
            self.got = False

        def feed(self, message: Any) -> Sequence[Message]:
            if self.got:
                raise GrpcAbort(UNIMPLEMENTED, "more than one request message for a unary method")
            self.got = True
            return (fn(message),)

        async def resume(self) -> Sequence[Message]:  # pragma: no cover - feed never defers
            return ()

        def end_of_input(self) -> Sequence[Message]:
            if not self.got:
                raise GrpcAbort(INTERNAL, "no request message for a unary method")
            return ()

        def close(self, cancelled: bool) -> None:
            return None

    return Method(request_type, _Unary)


def server_streaming(request_type: Any, fn: Callable[[Any, StreamWriter], Awaitable[None]]) -> Method:
    """A server-streaming method: ``fn(request, writer)`` runs as a task, sends with ``writer.send`` and
    returns (the call ends with OK) or raises :class:`GrpcAbort`; it is cancelled when the call is."""

    class _Streaming:
        __slots__ = ("task", "writer")

        def __init__(self, writer: StreamWriter) -> None:
            self.writer = writer
            self.task: asyncio.Task[None] | None = None

        def feed(self, message: Any) -> Sequence[Message]:
            if self.task is not None:
                raise GrpcAbort(UNIMPLEMENTED, "more than one request message for a server-streaming method")
            self.task = asyncio.get_running_loop().create_task(self._run(message))
            return ()

        async def _run(self, message: Any) -> None:
            try:
                await fn(message, self.writer)
            except GrpcAbort as exc:
                self.writer.finish(exc.code, exc.details)
                return
            self.writer.finish(OK)

        async def resume(self) -> Sequence[Message]:  # pragma: no cover - feed never defers
            return ()

        def end_of_input(self) -> None:
            if self.task is None:
                raise GrpcAbort(INTERNAL, "no request message for a server-streaming method")

        def close(self, cancelled: bool) -> None:
            if cancelled and self.task is not None:
                self.task.cancel()

    return Method(request_type, _Streaming)
