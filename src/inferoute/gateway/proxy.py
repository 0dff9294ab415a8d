"""Forwarding to model servers: keep-alive pools, fallback walking, streaming relay.

:class:`Forwarder` owns one aiohttp ``ClientSession`` per process (one ``TCPConnector``: a keep-alive pool per
``ip:port``). :meth:`Forwarder.open` walks a decision's ordered endpoint list: a connect error, a dropped
keep-alive connection or a 5xx status *before any byte went to the client* moves on to the next endpoint (a
buffered body is replayed; a :class:`StreamedBody` only until an endpoint started to receive it); the last
endpoint's 5xx is passed through as is. What it returns is the open upstream response, which the gateway
handler streams to the client chunk by chunk (``iter_any``: an SSE event is written as soon as it arrives)
while reporting it to the picker session (small answers of known length are relayed whole, in one write).

Endpoints of a pool or backend with ``app_protocol: h2c`` are spoken to over HTTP/2 cleartext by
:class:`~inferoute.gateway.h2c.H2cPool` (opened on the first such request), whose responses and errors look to
this module and the relay like aiohttp's (:class:`UpstreamResponse`), so both protocols walk, time out, stream
and cancel alike.

Header rules (RFC 9110 §7.6.1): hop-by-hop headers and those named in ``Connection`` are dropped both ways;
``Host`` and ``Content-Length`` are recomputed for the upstream; ``x-request-id`` and ``x-forwarded-for`` are
set.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from inferoute.errors import InferouteError
from inferoute.gateway.config import GatewayConfig
from inferoute.gateway.h2c import H2cPool, H2cUnreachable
from inferoute.gateway.metrics import GatewayMetrics

log = logging.getLogger(__name__)

HOP_BY_HOP: frozenset[str] = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
_RECOMPUTED = frozenset(
    {"host", "content-length", "x-request-id", "x-forwarded-for", "expect"}
)  # expect: answered here


_REQUEST_SKIPPED = HOP_BY_HOP | _RECOMPUTED
_RESPONSE_SKIPPED = HOP_BY_HOP | {"content-length"}

# A buffered body larger than this is written in slices of this size, yielding to the event loop between
# them (aiohttp writes a bytes body in one go and warns about blocking the loop above 1 MiB).
_WHOLE_BODY_MAX = 1 << 20


async def _slices(body: bytes) -> AsyncIterator[bytes]:
    view = memoryview(body)
    for start in range(0, len(body), _WHOLE_BODY_MAX):
        yield bytes(view[start : start + _WHOLE_BODY_MAX])


def _connection_tokens(value: str, into: set[str]) -> None:
    """Add the header names listed in one ``Connection`` value (lower case) to ``into``."""
    for t in value.split(","):
        t = t.strip()
        if t:
            into.add(t.lower())


def end_to_end_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """``headers`` without the hop-by-hop ones and those named in ``Connection`` (RFC 9110 §7.6.1)."""
    named: set[str] = set()
    out = []
    for k, v in headers:
        lk = k.lower()
        if lk in HOP_BY_HOP:
            if lk == "connection":
                _connection_tokens(v, named)
            continue
        out.append((k, v))
    if named:
        out = [(k, v) for k, v in out if k.lower() not in named]
    return out


def upstream_request_headers(
    headers: Iterable[tuple[str, str]], request_id: str, client_ip: str | None
) -> CIMultiDict[str]:
    """Headers for the upstream request: hop-by-hop removed, ``x-request-id`` and ``x-forwarded-for`` set.

    One pass over the headers (this runs for every request): names listed in ``Connection`` are removed
    afterwards, so they may come before or after it."""
    out: CIMultiDict[str] = CIMultiDict()
    forwarded: list[str] = []
    named: set[str] | None = None
    for k, v in headers:
        lk = k.lower()
        if lk in _REQUEST_SKIPPED:
            if lk == "x-forwarded-for":
                forwarded.append(v)
            elif lk == "connection":
                if named is None:
                    named = set()
                _connection_tokens(v, named)
            continue
        out.add(k, v)
    if named:
        for name in named:
            out.popall(name, None)
        if "x-forwarded-for" in named:
            forwarded.clear()  # a hop-by-hop X-Forwarded-For is the previous hop's business
    if client_ip:
        forwarded.append(client_ip)
    if forwarded:
        out["X-Forwarded-For"] = ", ".join(forwarded)
    out["X-Request-Id"] = request_id
    return out


def client_response_headers(headers: CIMultiDictProxy[str], request_id: str) -> CIMultiDict[str]:
    """The upstream's response headers minus hop-by-hop ones and ``Content-Length`` (set separately)."""
    out: CIMultiDict[str] = CIMultiDict()
    named: set[str] | None = None
    for k, v in headers.items():
        lk = k.lower()
        if lk in _RESPONSE_SKIPPED:
            if lk == "connection":
                if named is None:
                    named = set()
                _connection_tokens(v, named)
            continue
        out.add(k, v)
    if named:
        for name in named:
            out.popall(name, None)
    out["X-Request-Id"] = request_id
    return out


class StreamedBody:
    """A request body passed through as it arrives (routes where neither BBR nor the picker needs it).

    It can be sent once: :meth:`Forwarder.open` still walks past endpoints that refuse the connection (nothing
    was read yet), but stops at the first endpoint that received any of it.
    """

    __slots__ = ("_chunks", "length", "started")

    def __init__(self, chunks: AsyncIterator[bytes], length: int | None) -> None:
        self._chunks = chunks
        self.length = length
        """The declared ``Content-Length`` (None: chunked)."""
        self.started = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self.started = True
        async for chunk in self._chunks:
            yield chunk


class UpstreamBody(Protocol):
    async def read(self) -> bytes: ...

    def iter_any(self) -> AsyncIterator[bytes]: ...


class UpstreamResponse(Protocol):
    """What the relay reads from an upstream response: an aiohttp ``ClientResponse`` (HTTP/1.1) or an
    :class:`~inferoute.gateway.h2c.H2cResponse`."""

    @property
    def status(self) -> int: ...
    @property
    def reason(self) -> str | None: ...
    @property
    def headers(self) -> CIMultiDictProxy[str]: ...
    @property
    def content_length(self) -> int | None: ...
    @property
    def content(self) -> UpstreamBody: ...
    @property
    def closed(self) -> bool: ...
    def release(self) -> object: ...
    def close(self) -> None: ...


@dataclass(slots=True)
class Opened:
    """An upstream response whose status line and headers arrived."""

    response: UpstreamResponse
    served: str
    attempts: int


class Forwarder:
    """The upstream side of one process."""

    def __init__(self, cfg: GatewayConfig, metrics: GatewayMetrics | None = None) -> None:
        self._cfg = cfg
        self._session: aiohttp.ClientSession | None = None
        self._metrics = metrics
        self._h2c: H2cPool | None = None

    def _fallback(self, route: str, upstream: str, reason: str, detail: str) -> None:
        log.warning("route %s: upstream %s failed (%s); trying the next endpoint", route, upstream, detail)
        if self._metrics is not None:
            self._metrics.fallbacks.value(route, reason).inc()

    async def start(self) -> None:
        t = self._cfg.timeouts
        u = self._cfg.upstream
        connector = aiohttp.TCPConnector(
            limit=0,
            limit_per_host=u.max_connections_per_upstream,
            keepalive_timeout=u.keepalive_timeout,
            use_dns_cache=True,
            ttl_dns_cache=10,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(
                total=None, connect=None, sock_connect=t.connect, sock_read=t.read_idle
            ),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),
            raise_for_status=False,
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._h2c is not None:
            await self._h2c.aclose()
            self._h2c = None

    def h2c_pool(self) -> H2cPool:
        """The h2c connections (opened on the first request to an ``app_protocol: h2c`` endpoint)."""
        if self._h2c is None:
            u = self._cfg.upstream
            limit = u.max_connections_per_upstream
            self._h2c = H2cPool(self._cfg.timeouts.connect, u.keepalive_timeout, limit)
        return self._h2c

    async def open(
        self,
        method: str,
        path_qs: str,
        upstreams: tuple[str, ...],
        headers_for: Callable[[str], CIMultiDict[str]],
        body: bytes | StreamedBody,
        route: str = "-",
        protocol: str = "http",
        on_connect_failure: Callable[[str, str], None] | None = None,
    ) -> Opened:
        """Send the request to the first endpoint that answers (see module docstring); ``protocol``
        ``h2c``: over HTTP/2 cleartext."""
        session = self._session
        if session is None:
            raise RuntimeError("Forwarder.start() was not awaited")
        t = self._cfg.timeouts
        last_error = "no endpoint"
        for i, up in enumerate(upstreams):
            last = i == len(upstreams) - 1
            headers = headers_for(up)
            data: bytes | AsyncIterator[bytes] | None
            if isinstance(body, StreamedBody):
                if body.started:  # part of it went to the previous endpoint: it cannot be replayed
                    break
                data = body.__aiter__()
                if body.length is not None:
                    headers["Content-Length"] = str(body.length)
            elif len(body) > _WHOLE_BODY_MAX:
                data = _slices(body)
                headers["Content-Length"] = str(len(body))
            else:
                data = body or None
            resp: UpstreamResponse
            try:
                async with asyncio.timeout(t.response_headers):
                    if protocol == "h2c":
                        h2c = self.h2c_pool()
                        resp = await h2c.request(method, up, path_qs, headers.items(), data, t.read_idle)
                    else:
                        resp = await session.request(
                            method,
                            URL(f"http://{up}{path_qs}", encoded=True),  # as matched: no re-normalising
                            headers=headers,
                            data=data,
                            allow_redirects=False,
                        )
            except (aiohttp.ClientConnectionError, OSError, TimeoutError) as exc:
                unreachable = _unreachable(exc)
                if unreachable is None and isinstance(exc, TimeoutError):
                    log.warning(
                        "route %s: upstream %s did not answer within %gs", route, up, t.response_headers
                    )
                    raise InferouteError(  # no address in the client's message: it is in the log
                        504,
                        f"the model server did not answer within {t.response_headers:g}s",
                        cause="upstream-timeout",
                    ) from exc
                last_error = f"{up}: {exc or type(exc).__name__}"
                if on_connect_failure is not None and unreachable is not None:
                    on_connect_failure(up, unreachable)  # passive health: refused, reset, timed out
                if not last:
                    self._fallback(route, up, "connect", repr(exc))
                else:
                    log.warning("route %s: upstream %s failed before answering: %r", route, up, exc)
                continue
            if resp.status >= 500 and not last and not (isinstance(body, StreamedBody) and body.started):
                self._fallback(route, up, "5xx", f"status {resp.status}")
                resp.release()
                continue
            return Opened(resp, up, i + 1)
        log.warning("route %s: no upstream endpoint could be reached; last: %s", route, last_error)
        raise InferouteError(502, "no model server could be reached", cause="upstream-connect")


def _unreachable(exc: BaseException) -> str | None:
    """Why no connection to the endpoint could be opened (what the picker is told: ``connection refused``,
    ``connection reset``, ``connect timed out``, the OS error's name), or None when the failure came after
    a connection was open (a dropped keep-alive connection, a timeout waiting for the answer)."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):  # timeouts.connect passed (a TimeoutError too)
        return "connect timed out"
    if isinstance(exc, H2cUnreachable):
        return exc.reason
    if not isinstance(exc, aiohttp.ClientConnectorError):
        return None
    err = exc.os_error
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    if isinstance(err, ConnectionResetError):
        return "connection reset"
    if isinstance(err, TimeoutError):
        return "connect timed out"
    return f"connect failed ({type(err).__name__})"


def lower_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}
