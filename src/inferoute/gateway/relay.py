"""The one forwarding path from a routed request to the client's answer, shared by both data planes.

The gateway forwards every request through :class:`Relay`; the NGINX decider forwards through it the requests
NGINX cannot carry itself (the picker replaced the body). Both therefore read the body, walk the fallbacks
and apply the header rules the same way:

* **Body reading** (:func:`read_body`, :class:`LimitedStream`): ``Content-Length`` is checked against the
  route's limit before a byte is read (413), ``Expect: 100-continue`` is answered only then, a chunked upload
  is counted while it arrives, and a body shorter than its ``Content-Length`` is a 400.
* **Fallback walk** (:meth:`~inferoute.gateway.proxy.Forwarder.open`): a connect error, a dropped keep-alive
  connection or a 5xx before the first byte reached the client moves on to the next endpoint; the last
  endpoint's 5xx is passed through.
* **Header rules** (:func:`~inferoute.gateway.proxy.upstream_request_headers`,
  :func:`~inferoute.gateway.proxy.client_response_headers`): hop-by-hop headers and the names listed in
  ``Connection`` are dropped both ways.
* **The answer**: a small answer of known length (:func:`buffered_answer`) is read whole and sent in one write
  (an upstream that breaks off then still gets the client a clean 502); anything else is streamed chunk by
  chunk, so SSE events are not held back. The picker session sees every chunk and is ended exactly once,
  whatever happens (finished, upstream broke off, client gone, error).

What each request did is noted in a :class:`RequestRecord` (status, upstream, bytes, time to first byte,
cause), which the caller turns into its access log line and metrics.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from inferoute.clock import Clock
from inferoute.epp.requestcontrol.headers import DROPPED_REASON
from inferoute.epp.requestcontrol.restore import ModelRestorer
from inferoute.errors import InferouteError
from inferoute.gateway.bbr import BodyLimit, check_declared_length
from inferoute.gateway.metrics import Totals
from inferoute.gateway.proxy import (
    Forwarder,
    StreamedBody,
    UpstreamResponse,
    client_response_headers,
    lower_headers,
    upstream_request_headers,
)
from inferoute.gateway.routing import PickerRejected, RoutedRequest
from inferoute.picking import (
    EVICTED_MESSAGE,
    EVICTED_REASON,
    NullSession,
    PickSession,
    evictable,
    report_endpoint_failed,
)

log = logging.getLogger(__name__)

MAX_REQUEST_ID = 128
BUFFERED_ANSWER_MAX = 64 * 1024
"""Answers up to this size with a known ``Content-Length`` are read whole and sent in one write."""


@dataclass(slots=True)
class RequestRecord:
    """What the access log line and the metrics need about one request."""

    method: str
    path: str
    request_id: str
    start: float
    route: str = "-"
    model: str | None = None
    upstream: str | None = None
    status: int = 0
    ttfb: float | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    cause: str | None = None
    attempts: int = 0
    source: str = "-"
    extra_causes: list[str] = field(default_factory=list)
    target: str = ""
    """The normalised request target (path and query) that was matched and is forwarded; empty: the raw
    one (the NGINX decider's relay, where NGINX normalised it)."""


def request_id_from(value: str | None) -> str:
    """The client's ``X-Request-Id`` when it is short printable ASCII, else 32 random hex digits."""
    if value and len(value) <= MAX_REQUEST_ID and value.isprintable() and value.isascii():
        return value
    return os.urandom(16).hex()  # as unique as a uuid4, a quarter of its cost


def buffered_answer(method: str, status: int, length: int | None, content_type: str | None) -> bool:
    """True when an upstream answer can be relayed as one plain response: a known length of at most
    :data:`BUFFERED_ANSWER_MAX` bytes, a body to send (not HEAD, 1xx, 204 or 304) and not an event stream.
    Anything else is streamed chunk by chunk."""
    if length is None or length > BUFFERED_ANSWER_MAX or method == "HEAD":
        return False
    if status < 200 or status in (204, 304):
        return False
    return not (content_type and content_type.lstrip().lower().startswith("text/event-stream"))


async def answer_continue(request: web.BaseRequest) -> None:
    """Answer ``Expect: 100-continue`` (call it once the declared size was accepted): curl would otherwise
    wait a second before sending the body."""
    expect = request.headers.get("expect", "")
    if expect.lower() == "100-continue" and request.version >= aiohttp.HttpVersion11:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")


async def read_body(request: web.BaseRequest, limit: int) -> bytes:
    """The whole request body: 413 past ``limit`` (on ``Content-Length`` before reading, else while reading
    a chunked upload), 400 when it is shorter than its ``Content-Length``."""
    declared = check_declared_length(request.headers, limit)
    await answer_continue(request)
    if declared is not None:
        if declared == 0:
            return b""
        try:
            return await request.content.readexactly(declared)
        except asyncio.IncompleteReadError as exc:
            raise InferouteError(
                400, "request body shorter than its Content-Length", cause="bad-request"
            ) from exc
    if not request.body_exists:
        return b""
    counter = BodyLimit(limit)
    chunks: list[bytes] = []
    async for chunk in request.content.iter_any():
        counter.feed(len(chunk))
        chunks.append(chunk)
    return b"".join(chunks)


class LimitedStream:
    """The client's body as it arrives, counted against the route's limit (413 once it is passed) and
    timed: the whole of it must arrive within ``timeout`` seconds of :meth:`accept` (408 after)."""

    __slots__ = ("_deadline", "_limit", "_rec", "_request", "_timeout", "_totals", "declared", "failure")

    def __init__(
        self,
        request: web.BaseRequest,
        limit: int,
        declared: int | None,
        rec: RequestRecord,
        totals: Totals | None,
        timeout: float | None = None,
    ) -> None:
        self._request = request
        self._limit = limit
        self.declared = declared
        self._rec = rec
        self._totals = totals
        self._timeout = timeout
        self._deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        self.failure: InferouteError | None = None
        """Why reading the body stopped (413 too large, 408 too slow): the client's answer."""

    @classmethod
    async def accept(
        cls,
        request: web.BaseRequest,
        limit: int,
        rec: RequestRecord,
        totals: Totals | None,
        read_within: float | None = None,
    ) -> LimitedStream:
        """Check the declared length (413 before anything is read), answer ``100-continue``, wrap the body."""
        declared = check_declared_length(request.headers, limit)
        await answer_continue(request)
        return cls(request, limit, declared, rec, totals, read_within)

    async def chunks(self) -> AsyncIterator[bytes]:
        counter = BodyLimit(self._limit)
        content = self._request.content
        while True:
            try:
                async with asyncio.timeout_at(self._deadline):
                    chunk = await content.readany()
            except TimeoutError:
                self.failure = body_timeout(self._timeout)
                raise self.failure from None
            if not chunk:
                return
            try:
                counter.feed(len(chunk))
            except InferouteError as exc:
                self.failure = exc  # remembered: the upload to the upstream fails, the client gets 413
                raise
            self._rec.bytes_in += len(chunk)
            if self._totals is not None:
                self._totals.bytes_in += len(chunk)
            yield chunk


def body_timeout(timeout: float | None) -> InferouteError:
    """The 408 of a request body that did not arrive within ``timeout`` seconds."""
    within = f" within {timeout:g}s" if timeout is not None else ""
    return InferouteError(408, f"request body not received{within}", cause="body-timeout")


class SessionEnd:
    """Ends a picker session exactly once."""

    __slots__ = ("done", "session")

    def __init__(self, session: PickSession) -> None:
        self.session = session
        self.done = False

    def finished(self) -> None:
        if not self.done:
            self.done = True
            self.session.response_finished()

    def aborted(self, reason: str) -> None:
        if not self.done:
            self.done = True
            self.session.aborted(reason)


class _Eviction:
    """Flow control's eviction of the request being relayed: cancels the relaying task (see
    :class:`~inferoute.picking.EvictableSession`)."""

    __slots__ = ("fired", "task")

    def __init__(self, task: asyncio.Task[object]) -> None:
        self.task = task
        self.fired = False

    @classmethod
    def watch(cls, session: PickSession) -> _Eviction | None:
        target = evictable(session)
        task = asyncio.current_task()
        if target is None or task is None:
            return None
        ev = cls(task)
        target.on_evict(ev)
        return ev

    def __call__(self) -> None:
        if not self.fired:
            self.fired = True
            self.task.cancel()


class Relay:
    """Forwards routed requests through a :class:`~inferoute.gateway.proxy.Forwarder` and relays the
    answers (see module docstring). ``answer_headers`` are added to every relayed answer (the NGINX decider
    sets ``X-Accel-Buffering: no`` so that NGINX passes a stream on as it arrives)."""

    def __init__(
        self,
        forwarder: Forwarder,
        clock: Clock,
        *,
        max_upstreams: int | None = None,
        answer_headers: Mapping[str, str] | None = None,
    ) -> None:
        self.forwarder = forwarder
        self.clock = clock
        self.max_upstreams = max_upstreams
        """Endpoints tried per request at most (None: the whole list the picker gave)."""
        self.answer_headers = dict(answer_headers or {})

    async def forward(
        self,
        request: web.BaseRequest,
        d: RoutedRequest,
        rec: RequestRecord,
        streamed: LimitedStream | None = None,
    ) -> web.StreamResponse:
        """Send ``request`` (the routed body, or ``streamed`` as it arrives) to the routed endpoints and
        relay the answer. Ends ``d.session``. Raises :class:`InferouteError` when no answer could be
        started (502 no endpoint reachable, 504 no answer in time, 413 body too large)."""
        end = SessionEnd(d.session)
        evicted = _Eviction.watch(d.session)
        try:
            return await self._open_and_answer(request, d, rec, end, streamed)
        except asyncio.CancelledError:
            if evicted is None or not evicted.fired:
                end.aborted("client-disconnect")
                raise
            end.aborted("evicted")
            rec.cause = "evicted"
            log.info("flow control evicted the request [request_id=%s]", rec.request_id)
            if rec.ttfb is None:  # nothing sent yet: the client gets the 429
                evicted.task.uncancel()
                raise PickerRejected(
                    429, EVICTED_MESSAGE, cause="evicted", headers={DROPPED_REASON: EVICTED_REASON}
                ) from None
            if request.transport is not None:  # the answer has started: cut it off
                request.transport.abort()
            raise
        except InferouteError:
            if streamed is not None and streamed.failure is not None:
                end.aborted(streamed.failure.cause)
                raise streamed.failure from None
            end.aborted("upstream-error")
            raise
        except BaseException:
            end.aborted("error")
            raise
        finally:
            end.aborted("incomplete")  # no-op when already ended

    async def _open_and_answer(
        self,
        request: web.BaseRequest,
        d: RoutedRequest,
        rec: RequestRecord,
        end: SessionEnd,
        streamed: LimitedStream | None,
    ) -> web.StreamResponse:
        client_ip = request.remote
        peer_headers = d.upstream_headers  # bound method: headers naming the endpoint being tried

        def headers_for(up: str) -> CIMultiDict[str]:
            return upstream_request_headers(peer_headers(up), rec.request_id, client_ip)

        body: bytes | StreamedBody = d.body
        if streamed is not None:
            body = StreamedBody(streamed.chunks(), streamed.declared)
        upstreams = d.upstreams if self.max_upstreams is None else d.upstreams[: self.max_upstreams]
        try:
            opened = await self.forwarder.open(
                request.method,
                rec.target or request.raw_path,
                upstreams,
                headers_for,
                body,
                route=rec.route,
                protocol=d.app_protocol,
                on_connect_failure=lambda up, why: report_endpoint_failed(d.session, up, why),
            )
        except (aiohttp.ClientError, OSError) as exc:
            if streamed is not None and streamed.failure is not None:
                raise streamed.failure from exc
            raise
        if streamed is not None and streamed.failure is not None:
            opened.response.close()
            raise streamed.failure
        up = opened.response
        rec.upstream = opened.served
        rec.attempts = opened.attempts
        rec.status = up.status
        try:
            hdrs = client_response_headers(up.headers, rec.request_id)
            hdrs.update(self.answer_headers)
            if type(d.session) is not NullSession:  # no picker (static / fail-open): nothing to report
                d.session.response_started(opened.served, up.status, lower_headers(up.headers))
            restorer = None if d.restore_model is None else ModelRestorer(*d.restore_model)
            if buffered_answer(request.method, up.status, up.content_length, up.headers.get("content-type")):
                return await self._answer_whole(
                    request, up, hdrs, opened.served, d.session, rec, end, restorer
                )
            return await self._answer_streamed(
                request, up, hdrs, opened.served, d.session, rec, end, restorer
            )
        finally:
            if not up.closed:
                if end.done and rec.cause is None:
                    up.release()
                else:
                    up.close()

    async def _answer_whole(
        self,
        request: web.BaseRequest,
        up: UpstreamResponse,
        hdrs: CIMultiDict[str],
        served: str,
        session: PickSession,
        rec: RequestRecord,
        end: SessionEnd,
        restorer: ModelRestorer | None,
    ) -> web.StreamResponse:
        """A small answer of known length: read it whole, then send status, headers and body in one write
        (nothing reached the client yet, so an upstream that breaks off gets a clean 502)."""
        try:
            data = await up.content.read()
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
            _upstream_broke_off(rec, end, served, exc)
            raise InferouteError(
                502, "the model server broke off its response", cause="upstream-aborted"
            ) from exc
        if data:
            session.response_chunk(data)
            if restorer is not None:
                data = restorer.whole(data)
        resp = web.Response(status=up.status, reason=up.reason, headers=hdrs, body=data)
        await resp.prepare(request)  # headers wait for the body: one write in write_eof
        rec.ttfb = self.clock.now() - rec.start
        try:
            await resp.write_eof()
        except ConnectionError:
            _client_gone(rec, end)
            return resp
        rec.bytes_out = len(data)
        end.finished()
        return resp

    async def _answer_streamed(
        self,
        request: web.BaseRequest,
        up: UpstreamResponse,
        hdrs: CIMultiDict[str],
        served: str,
        session: PickSession,
        rec: RequestRecord,
        end: SessionEnd,
        restorer: ModelRestorer | None,
    ) -> web.StreamResponse:
        """Headers now, then every chunk as it arrives (SSE events are not held back). With a ``restorer`` the
        length may change: the answer goes chunked."""
        resp = web.StreamResponse(status=up.status, reason=up.reason, headers=hdrs)
        if up.content_length is not None and restorer is None:
            resp.content_length = up.content_length
        try:
            await resp.prepare(request)
        except ConnectionError:
            _client_gone(rec, end)
            return resp
        rec.ttfb = self.clock.now() - rec.start
        out = 0
        chunks = up.content.iter_any().__aiter__()
        while True:
            try:  # reading the model server's answer
                chunk = await anext(chunks)
            except StopAsyncIteration:
                break
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
                rec.bytes_out = out
                _upstream_broke_off(rec, end, served, exc)
                cut_client(request)  # the client must see a cut answer, not a complete one
                return resp
            session.response_chunk(chunk)
            if restorer is not None:
                chunk = restorer.feed(chunk)
                if not chunk:
                    continue
            try:  # writing it to the client
                await resp.write(chunk)
            except ConnectionError:  # ConnectionResetError, aiohttp's ClientConnectionResetError
                rec.bytes_out = out
                _client_gone(rec, end)
                return resp
            out += len(chunk)
        if restorer is not None and (tail := restorer.finish()):
            try:
                await resp.write(tail)
            except ConnectionError:
                rec.bytes_out = out
                _client_gone(rec, end)
                return resp
            out += len(tail)
        rec.bytes_out = out
        try:
            await resp.write_eof()
        except ConnectionError:
            _client_gone(rec, end)
            return resp
        end.finished()
        return resp


def cut_client(request: web.BaseRequest) -> None:
    """Close the client's connection in the middle of an answer: aiohttp then neither ends the chunked
    stream (the client sees it cut short) nor logs a traceback (its final write fails quietly)."""
    transport = request.transport
    if transport is not None:
        transport.close()


def _upstream_broke_off(rec: RequestRecord, end: SessionEnd, served: str, exc: BaseException) -> None:
    """The model server cut its answer short: cause, one log line (no traceback), picker session
    aborted."""
    rec.cause = "upstream-aborted"
    log.warning(
        "upstream %s broke off the response: %s [request_id=%s]",
        served,
        f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__,
        rec.request_id,
    )
    end.aborted("upstream-aborted")


def _client_gone(rec: RequestRecord, end: SessionEnd) -> None:
    """The client disconnected while the answer was sent: 499 in the log, picker session aborted."""
    rec.cause = "client-disconnect"
    rec.status = 499
    end.aborted("client-disconnect")
