"""Request validation and the byte-level response format (no sockets)."""

from __future__ import annotations

import json

import pytest

from inferoute.errors import InferouteError
from inferoute.sim.protocol import (
    DONE,
    ResponseWriter,
    models_body,
    parse_chat,
    parse_completion,
    token_text,
)


def sse(raw: bytes) -> dict[str, object]:
    assert raw.startswith(b"data: ") and raw.endswith(b"\n\n")
    payload = json.loads(raw[6:])
    assert isinstance(payload, dict)
    return payload


def test_parse_chat_renders_text_and_parts() -> None:
    body, text, max_tokens = parse_chat(
        json.dumps(
            {
                "model": "m",
                "max_completion_tokens": 9,
                "max_tokens": 3,
                "stream": True,
                "stream_options": {"include_usage": True},
                "temperature": 0.2,
                "messages": [
                    {"role": "system", "content": "S"},
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                    },
                ],
            }
        ).encode()
    )
    assert body.model == "m" and body.stream and body.stream_options and body.stream_options.include_usage
    assert max_tokens == 9  # max_completion_tokens wins
    assert "<|user|>\nab<|end|>" in text


def test_parse_completion_prompt_forms() -> None:
    assert parse_completion(b'{"model":"m","prompt":"hi"}')[1] == "hi"
    assert parse_completion(b'{"model":"m","prompt":["hi"]}')[1] == "hi"
    assert parse_completion(b'{"model":"m","prompt":[1,2,3],"max_tokens":4}')[1:] == ([1, 2, 3], 4)


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"{not json", "Invalid JSON"),
        (b'{"prompt":"x"}', "model"),
        (b'{"model":"m","prompt":"x","max_tokens":"ten"}', "max_tokens"),
        (b'{"model":"m","prompt":"x","max_tokens":0}', "at least 1"),
        (b'{"model":"m","prompt":"x","n":2}', "n=1"),
        (b'{"model":"m","prompt":["a","b"]}', "batched"),
        (b'{"model":"m"}', "prompt is required"),
    ],
)
def test_invalid_completion_bodies_are_400(raw: bytes, needle: str) -> None:
    with pytest.raises(InferouteError) as info:
        parse_completion(raw)
    assert info.value.status == 400
    assert needle in info.value.message
    assert json.loads(info.value.body())["error"]["type"] == "invalid_request_error"


def test_chat_without_messages_is_400() -> None:
    with pytest.raises(InferouteError) as info:
        parse_chat(b'{"model":"m","messages":[]}')
    assert info.value.status == 400 and info.value.param == "messages"


def test_chat_chunks() -> None:
    w = ResponseWriter(chat=True, response_id="chatcmpl-1", model='odd"name', text_seed=5)
    role = sse(w.role_chunk())
    assert role["object"] == "chat.completion.chunk" and role["model"] == 'odd"name'
    assert role["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    ]
    mid = sse(w.token_chunk(0, None))
    assert mid["choices"][0]["delta"] == {"content": token_text(5, 0)}  # type: ignore[index]
    last = sse(w.token_chunk(1, "length"))
    assert last["choices"][0]["finish_reason"] == "length"  # type: ignore[index]
    assert last["choices"][0]["stop_reason"] is None  # type: ignore[index]
    usage = sse(w.usage_chunk(10, 2, 8))
    assert usage["choices"] == []
    assert usage["usage"] == {
        "prompt_tokens": 10,
        "total_tokens": 12,
        "completion_tokens": 2,
        "prompt_tokens_details": {"cached_tokens": 8},
    }
    assert DONE == b"data: [DONE]\n\n"


def test_completion_chunks_and_schedule_field() -> None:
    w = ResponseWriter(chat=False, response_id="cmpl-1", model="m", text_seed=0, schedule=True)
    chunk = sse(w.token_chunk(3, None, scheduled_at=123.25, written_at=123.5))
    assert chunk["object"] == "text_completion"
    assert chunk["choices"] == [
        {"index": 0, "text": token_text(0, 3), "logprobs": None, "finish_reason": None}
    ]
    assert chunk["sim_scheduled_at"] == 123.25 and chunk["sim_written_at"] == 123.5


def test_full_responses() -> None:
    chat = json.loads(ResponseWriter(True, "chatcmpl-x", "m", 1).full_response(3, "stop", 7, 0))
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"]["content"] == "".join(token_text(1, i) for i in range(3))
    assert chat["usage"]["total_tokens"] == 10
    comp = json.loads(ResponseWriter(False, "cmpl-x", "m", 1).full_response(2, "length", 4, 4))
    assert comp["choices"][0]["text"] == token_text(1, 0) + token_text(1, 1)
    assert comp["usage"]["prompt_tokens_details"]["cached_tokens"] == 4


def test_models_body() -> None:
    body = json.loads(models_body("base", ("a", "b"), 4096, 1))
    assert [m["id"] for m in body["data"]] == ["base", "a", "b"]
    assert body["data"][0]["parent"] is None and body["data"][0]["max_model_len"] == 4096
    assert body["data"][1]["parent"] == "base"


def test_ids_from_client_headers_are_escaped() -> None:
    rid = 'chatcmpl-a"b\\c'
    w = ResponseWriter(chat=True, response_id=rid, model="m", text_seed=0)
    assert sse(w.role_chunk())["id"] == rid
    assert sse(w.token_chunk(0, "stop"))["id"] == rid
    assert json.loads(w.full_response(1, "stop", 1, 0))["id"] == rid
