"""HTTP/1.1 response framing for the metrics scraper (:mod:`.collector`).

Why not aiohttp's client: a scrape is one small GET repeated 20 times a second per endpoint; at 100 endpoints
aiohttp's per-request machinery cost ~220 µs of CPU per scrape here (~45% of a core with parsing, see
docs/benchmarks/scheduler.md). The collector keeps one connection per endpoint: a request is one
``transport.write`` of pre-built bytes, and the response collected in ``data_received`` is framed here by
``Content-Length`` or chunked encoding.

It does exactly what scraping needs: GET, HTTP/1.1 keep-alive, optional TLS, no redirects, no compression
(``Accept-Encoding: identity``), bodies up to ``max_body`` bytes.
"""

from __future__ import annotations

import ssl

MAX_BODY = 16 * 1024 * 1024


class HttpGetError(Exception):
    """Connection, framing or timeout failure of one GET."""


class ResponseReader:
    """Frames one response at a time from the bytes of a keep-alive connection; the head is parsed once."""

    __slots__ = ("buf", "chunked", "length", "start", "status")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.status = 0
        self.start = -1
        self.length = 0
        self.chunked = False

    def reset(self) -> None:
        """Forget the previous response (call before each request)."""
        self.buf.clear()
        self.start = -1

    def feed(self, data: bytes) -> tuple[int, bytes] | None:
        """Add received bytes: (status, body) once the response is complete, else None.
        Raises :class:`HttpGetError` on a malformed or oversized response."""
        buf = self.buf
        if self.start < 0 and not buf:
            # Fast path: a small response usually arrives in one read; frame it without copying it into the
            # buffer first (the body is sliced out of ``data`` once).
            head = _parse_head(data)
            if head is None:
                buf += data
                return None
            self.status, self.length, self.chunked, self.start = head
            if not self.chunked and len(data) - self.start >= self.length:
                start = self.start
                return self.status, data[start : start + self.length]
            buf += data
        else:
            buf += data
            if self.start < 0:
                head = _parse_head(buf)
                if head is None:
                    return None
                self.status, self.length, self.chunked, self.start = head
        if self.chunked:
            return _dechunk(buf, self.start, self.status)
        if len(buf) - self.start < self.length:
            return None
        return self.status, bytes(buf[self.start : self.start + self.length])


def parse_response(buf: bytes | bytearray) -> tuple[int, bytes] | None:
    """(status, body) when ``buf`` holds a whole response, None while more bytes are needed."""
    return ResponseReader().feed(bytes(buf))


def _parse_head(buf: bytes | bytearray) -> tuple[int, int, bool, int] | None:
    """(status, content length, chunked, body offset) once the head is complete. Header names are matched
    on a lower-cased copy of the head with ``bytes.find`` (no per-line Python loop)."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > 65536:
            raise HttpGetError("response headers too large")
        return None
    head = bytes(buf[: end + 2]).lower()
    line_end = head.find(b"\r\n")
    status_line = head[:line_end]
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"http/1."):
        raise HttpGetError(f"bad status line {bytes(buf[:line_end])[:80]!r}")
    try:
        status = int(parts[1])
    except ValueError:
        raise HttpGetError(f"bad status line {bytes(buf[:line_end])[:80]!r}") from None
    chunked = False
    te = head.find(b"\r\ntransfer-encoding:", line_end)
    if te >= 0:
        chunked = b"chunked" in head[te + 20 : head.find(b"\r\n", te + 20)]
    length: int | None = None
    cl = head.find(b"\r\ncontent-length:", line_end)
    if cl >= 0:
        try:
            length = int(head[cl + 17 : head.find(b"\r\n", cl + 17)])
        except ValueError:
            raise HttpGetError("bad content-length") from None
        if length < 0:
            raise HttpGetError("bad content-length")
    if not chunked:
        if length is None:
            raise HttpGetError("response without content-length or chunked encoding")
        if length > MAX_BODY:
            raise HttpGetError(f"body of {length} bytes is too large")
    return status, length or 0, chunked, end + 4


def _dechunk(buf: bytearray, pos: int, status: int) -> tuple[int, bytes] | None:
    out = bytearray()
    while True:
        nl = buf.find(b"\r\n", pos)
        if nl < 0:
            return None
        try:
            size = int(bytes(buf[pos:nl]).split(b";", 1)[0], 16)
        except ValueError:
            raise HttpGetError("bad chunk size") from None
        if size == 0:
            if buf.find(b"\r\n\r\n", nl) < 0 and not buf.endswith(b"\r\n\r\n"):
                return None  # trailers not complete yet
            return status, bytes(out)
        if len(buf) < nl + 2 + size + 2:
            return None
        out += buf[nl + 2 : nl + 2 + size]
        if len(out) > MAX_BODY:
            raise HttpGetError("chunked body is too large")
        pos = nl + 2 + size + 2


def client_ssl_context(insecure_skip_verify: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    if insecure_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
