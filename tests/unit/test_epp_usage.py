"""Token usage from response tails (SSE and JSON)."""

from __future__ import annotations

from inferoute.epp.requestcontrol.usage import TailBuffer, parse_usage


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
