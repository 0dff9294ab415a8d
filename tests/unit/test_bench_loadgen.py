"""Load generator pure parts: SSE decoding and per-request recording (no sockets, no sleeps)."""

from __future__ import annotations

import json

import pytest

from inferoute.bench.loadgen import RequestResult, SseDecoder, StreamRecorder, l4_spread


def sse(obj: object) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def token(text: str = "x") -> dict[str, object]:
    return {"choices": [{"index": 0, "text": text}]}


def usage(prompt: int, completion: int, cached: int) -> dict[str, object]:
    return {
        "choices": [],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        },
    }


def test_decoder_reassembles_events_split_anywhere() -> None:
    stream = sse(token("a")) + sse(token("b")) + b"data: [DONE]\n\n"
    for cut in range(1, len(stream)):
        d = SseDecoder()
        out = d.feed(stream[:cut]) + d.feed(stream[cut:]) + d.flush()
        assert out == [json.dumps(token("a")).encode(), json.dumps(token("b")).encode(), b"[DONE]"]


def test_decoder_handles_crlf_comments_and_an_unterminated_last_event() -> None:
    d = SseDecoder()
    out = d.feed(b": keep-alive\r\n\r\ndata: 1\r\n\r\ndata: 2")
    assert out == [b"1"]
    assert d.flush() == [b"2"]


def test_recorder_measures_ttft_itl_and_usage() -> None:
    r = RequestResult(index=0, group="g", model="m", scheduled=1.0)
    r.sent = 1.25
    rec = StreamRecorder(r)
    rec.on_payload(1.75, json.dumps(token()).encode())
    rec.on_payload(1.85, json.dumps(token()).encode())
    rec.on_payload(2.05, json.dumps(token()).encode())
    rec.on_payload(2.06, json.dumps(usage(100, 3, 64)).encode())
    rec.on_payload(2.07, b"[DONE]")
    out = rec.finish(2.1)
    assert out.ok
    assert out.ttft == pytest.approx(0.5)
    assert out.itls == pytest.approx([0.1, 0.2])
    assert out.mean_itl == pytest.approx(0.15)
    assert out.itl_max == pytest.approx(0.2)
    assert out.e2e == pytest.approx(0.85)
    assert (out.prompt_tokens, out.output_tokens, out.cached_tokens) == (100, 3, 64)
    assert out.send_lag == pytest.approx(0.25)
    assert out.row()["ttft"] == pytest.approx(0.5)


def test_recorder_reads_chat_deltas_and_counts_chunks_without_usage() -> None:
    r = RequestResult(0, "g", "m", 0.0)
    r.sent = 0.0
    rec = StreamRecorder(r)
    rec.on_payload(0.1, json.dumps({"choices": [{"delta": {"role": "assistant"}}]}).encode())
    rec.on_payload(0.2, json.dumps({"choices": [{"delta": {"content": "hi"}}]}).encode())
    rec.on_payload(0.3, json.dumps({"choices": [{"delta": {"content": "!"}}]}).encode())
    out = rec.finish(0.4)
    assert out.ttft == pytest.approx(0.2)  # the role-only chunk is not a token
    assert out.output_tokens == 2


def test_recorder_flags_error_events_empty_streams_and_garbage() -> None:
    r = RequestResult(0, "g", "m", 0.0)
    r.sent = 0.0
    rec = StreamRecorder(r)
    rec.on_payload(0.1, json.dumps({"error": {"message": "boom", "code": 500}}).encode())
    assert rec.finish(0.2).error == "stream"
    assert "boom" in r.error_message

    empty = StreamRecorder(RequestResult(1, "g", "m", 0.0))
    assert empty.finish(0.1).error == "empty"

    bad = StreamRecorder(RequestResult(2, "g", "m", 0.0))
    bad.on_payload(0.1, b"{not json")
    assert bad.finish(0.2).error == "stream"


def test_l4_spread_is_seeded_per_request_and_gives_every_router_its_share() -> None:
    one = l4_spread(2000, 2, seed=1)
    assert one == l4_spread(2000, 2, seed=1)  # the same for every contender of a run
    assert one != l4_spread(2000, 2, seed=2)
    assert l4_spread(10, 2, seed=1) == one[:10]  # by request index: a longer plan keeps the first choices
    assert set(one) == {0, 1} and 900 <= one.count(0) <= 1100
    three = l4_spread(3000, 3, seed=1)
    assert all(900 <= three.count(i) <= 1100 for i in range(3))
    assert max(len(run) for run in "".join(map(str, one)).replace("1", " ").split()) < 20  # not in blocks
    assert l4_spread(5, 1, seed=9) == [0] * 5 and l4_spread(0, 2, seed=1) == []
    with pytest.raises(ValueError, match="at least one"):
        l4_spread(5, 0, seed=1)
