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


def test_byte_by_byte_feeding_equals_one_read() -> None:
    """The one-read fast path and the buffered path frame the same responses the same way."""
    from inferoute.epp.datalayer.httpget import ResponseReader

    responses = [
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nX: y\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nCONTENT-LENGTH:  3 \r\n\r\nabc",
        b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nno\r\n0\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    ]
    for raw in responses:
        whole = ResponseReader().feed(raw)
        assert whole is not None
        reader = ResponseReader()
        got = None
        for i in range(len(raw)):
            got = reader.feed(raw[i : i + 1])
            if got is not None:
                assert i == len(raw) - 1, "complete before the last byte"
        assert got == whole


def test_reader_is_reusable_after_reset() -> None:
    from inferoute.epp.datalayer.httpget import ResponseReader

    reader = ResponseReader()
    assert reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nab") == (200, b"ab")
    reader.reset()
    assert reader.feed(b"HTTP/1.1 503 Busy\r\nContent-Len") is None
    assert reader.feed(b"gth: 1\r\n\r\nz") == (503, b"z")


def test_negative_content_length_is_rejected() -> None:
    with pytest.raises(HttpGetError, match="content-length"):
        parse(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n")


def test_wheel_slots() -> None:
    from inferoute.epp.datalayer.collector import wheel_slots

    assert wheel_slots(0.05, 1.0, 100) == 10  # ~10 endpoints per 5 ms tick at 20 Hz
    assert wheel_slots(0.05, 1.0, 5) == 1  # a small pool: one tick per interval
    assert wheel_slots(0.05, 1.0, 1000) == 25  # never under 2 ms
    assert wheel_slots(10.0, 1.0, 5) == 40  # ticks of a quarter of the timeout
    assert wheel_slots(0.001, 1.0, 100) == 1
