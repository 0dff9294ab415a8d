"""Token usage from response tails (SSE and JSON)."""

from __future__ import annotations

import pytest

from inferoute.epp.requestcontrol.usage import TailBuffer, Usage, parse_usage


def test_json_body_usage() -> None:
    body = (
        b'{"id":"x","choices":[{"text":"usage: {not this}"}],'
        b'"usage":{"prompt_tokens":12,"completion_tokens":3}}'
    )
    u = parse_usage(body)
    assert u is not None and (u.prompt_tokens, u.completion_tokens, u.cached_tokens) == (12, 3, 0)


def test_sse_final_usage_chunk_wins() -> None:
    stream = (
        b'data: {"choices":[{"delta":{"content":"hi"}}],"usage":null}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,'
        b'"prompt_tokens_details":{"cached_tokens":4}}}\n\ndata: [DONE]\n\n'
    )
    u = parse_usage(stream)
    assert u is not None and (u.prompt_tokens, u.completion_tokens, u.cached_tokens) == (5, 2, 4)


def test_no_usage() -> None:
    assert parse_usage(b'data: {"choices":[],"usage":null}\n\ndata: [DONE]\n\n') is None
    assert parse_usage(b"") is None
    assert parse_usage(b'{"usage":{"prompt_tokens":') is None  # truncated


def test_tail_buffer_keeps_only_the_end() -> None:
    t = TailBuffer(limit=16)
    for chunk in (b"a" * 10, b"b" * 10, b"c" * 3):
        t.feed(chunk)
    assert t.data == b"a" * 3 + b"b" * 10 + b"c" * 3 and t.total == 23
    t.feed(b"z" * 40)
    assert t.data == b"z" * 16


def test_usage_is_read_from_the_last_object_whatever_its_value_types() -> None:
    # the typed fast path takes integers and null; other shapes get the loose rules (numbers converted)
    assert parse_usage(b'{"usage":{"prompt_tokens":null,"prompt_tokens_details":null}}') == Usage(0, 0, 0)
    loose = (
        b'{"usage":{"prompt_tokens":"7","completion_tokens":2.0,'
        b'"prompt_tokens_details":{"cached_tokens":true}}}'
    )
    assert parse_usage(loose) == Usage(7, 2, 1)
    assert parse_usage(b'{"usage":{"prompt_tokens":"seven"}}') is None  # unusable: None, not an older one
    assert parse_usage(b'{"usage":{"prompt_tokens":1}} {"usage":{"x":"}\\"{"}') == Usage(0, 0, 0)
    assert parse_usage(b'{"usage":{"prompt_tokens":1}} {"usage":{"x":"\\"}') == Usage(1, 0, 0)  # unclosed
    assert parse_usage(b'{"usage":{"prompt_tokens":1}} {"usage":{"a":NaN}}') == Usage(0, 0, 0)  # json rules


def test_tail_buffer_keeps_chunks_and_joins_once() -> None:
    t = TailBuffer(limit=10)
    reused = bytearray(b"abcd")
    t.feed(reused)
    reused[:] = b"WXYZ"  # the caller reuses its buffer: the tail keeps what was fed
    for chunk in (b"", b"efgh", memoryview(b"ijkl")):
        t.feed(chunk)
    assert t.data == b"cdefghijkl" and t.total == 12
    t.feed(b"m")
    assert t.data == b"defghijklm"
    with pytest.raises(ValueError):
        TailBuffer(limit=0)
