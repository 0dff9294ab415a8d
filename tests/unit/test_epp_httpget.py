"""Response framing of the scrape client (pure: no sockets)."""

from __future__ import annotations

import pytest

from inferoute.epp.datalayer.httpget import HttpGetError, parse_response


def parse(raw: bytes) -> tuple[int, bytes] | None:
    return parse_response(bytearray(raw))


def test_content_length_framing_waits_for_the_whole_body() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 10\r\n\r\n"
    assert parse(head) is None
    assert parse(head + b"12345") is None
    assert parse(head + b"1234567890") == (200, b"1234567890")


def test_chunked_framing() -> None:
    head = b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"4\r\nabcd\r\n3;ext=1\r\nefg\r\n0\r\n\r\n"
    assert parse(head + body[:9]) is None
    assert parse(head + body[:-2]) is None
    assert parse(head + body) == (503, b"abcdefg")


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"SSH-2.0-OpenSSH\r\n\r\n", "bad status line"),
        (b"HTTP/1.1 abc OK\r\n\r\n", "bad status line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", "content-length"),
        (b"HTTP/1.1 200 OK\r\n\r\nbody", "without content-length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n", "too large"),
    ],
)
def test_bad_responses_fail_clearly(raw: bytes, fragment: str) -> None:
    with pytest.raises(HttpGetError, match=fragment):
        parse(raw)


def test_oversized_headers() -> None:
    with pytest.raises(HttpGetError, match="headers too large"):
        parse(b"HTTP/1.1 200 OK\r\n" + b"X-Pad: a\r\n" * 10000)
