"""The OpenAI / vLLM wire format: request validation and pre-encoded response pieces.

Requests are decoded with msgspec into small structs (unknown fields ignored, wrong types -> 400 naming the
field). Streaming responses are built from per-request byte templates so that one token costs one
``b"".join`` of three pre-encoded pieces; the token text comes from a fixed vocabulary of pre-encoded
JSON strings.

Chunks follow vLLM's OpenAI server byte for byte in structure::

    data: {"id":"chatcmpl-..","object":"chat.completion.chunk","created":1700000000,"model":"m",
           "choices":[{"index":0,"delta":{"content":" the"},"logprobs":null,"finish_reason":null}]}

the first chat chunk carries ``{"role":"assistant","content":""}``, the last token's chunk carries the
``finish_reason``, an optional usage chunk (``stream_options.include_usage``) has ``"choices":[]``, and the
stream ends with ``data: [DONE]``.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import msgspec

from inferoute.errors import InferouteError
from inferoute.sim.tokenizer import is_token_ids, piece_id, render_chat

# -- requests -----------------------------------------------------------------------------------------


class _Part(msgspec.Struct):
    type: str = "text"
    text: str | None = None


class _Message(msgspec.Struct):
    role: str
    content: str | list[_Part] | None = None


class _StreamOptions(msgspec.Struct):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Common(msgspec.Struct):
    model: str
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    ignore_eos: bool = False
    n: int = 1


class ChatBody(_Common):
    """``POST /v1/chat/completions`` fields the simulator reads."""

    messages: list[_Message] = []


class CompletionBody(_Common):
    """``POST /v1/completions`` fields the simulator reads."""

    prompt: str | list[Any] | None = None


_chat_decoder = msgspec.json.Decoder(ChatBody)
_completion_decoder = msgspec.json.Decoder(CompletionBody)


def _decode(decoder: msgspec.json.Decoder[Any], raw: bytes) -> Any:
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise InferouteError(400, f"Invalid request: {exc}", cause="invalid-request") from None
    except msgspec.DecodeError as exc:
        raise InferouteError(400, f"Invalid JSON body: {exc}", cause="invalid-json") from None


def _check_common(body: _Common) -> int | None:
    if body.n != 1:
        raise InferouteError(400, "The simulator supports only n=1.", cause="invalid-request", param="n")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_tokens is not None and max_tokens < 1:
        raise InferouteError(
            400,
            f"max_tokens must be at least 1, got {max_tokens}.",
            cause="invalid-request",
            param="max_tokens",
        )
    return max_tokens


def parse_chat(raw: bytes) -> tuple[ChatBody, str, int | None]:
    """Validate a chat body; returns it, the rendered prompt text and the requested max tokens."""
    body: ChatBody = _decode(_chat_decoder, raw)
    if not body.messages:
        raise InferouteError(
            400, "messages must be a non-empty list.", cause="invalid-request", param="messages"
        )
    turns: list[tuple[str, str]] = []
    for msg in body.messages:
        if isinstance(msg.content, list):
            text = "".join(p.text or "" for p in msg.content if p.type == "text")
        else:
            text = msg.content or ""
        turns.append((msg.role, text))
    return body, render_chat(turns), _check_common(body)


def parse_completion(raw: bytes) -> tuple[CompletionBody, str | list[int], int | None]:
    """Validate a completions body; the prompt is text or a list of token ids."""
    body: CompletionBody = _decode(_completion_decoder, raw)
    prompt = body.prompt
    if prompt is None:
        raise InferouteError(400, "prompt is required.", cause="invalid-request", param="prompt")
    if isinstance(prompt, list):
        if len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        elif not is_token_ids(prompt):
            raise InferouteError(
                400,
                "prompt must be a string, a one-element list of strings or a list of "
                "token ids (batched prompts are not simulated).",
                cause="invalid-request",
                param="prompt",
            )
    return body, prompt, _check_common(body)


class TokenizeBody(msgspec.Struct):
    """``POST /tokenize`` (vLLM's): a completion ``prompt`` or chat ``messages``."""

    model: str | None = None
    prompt: str | list[Any] | None = None
    messages: list[_Message] | None = None


_tokenize_decoder = msgspec.json.Decoder(TokenizeBody)


def parse_tokenize(raw: bytes) -> tuple[str | None, str | list[int]]:
    """The model (if named) and the text (rendered chat, or prompt) or token ids to count."""
    body: TokenizeBody = _decode(_tokenize_decoder, raw)
    if body.messages is not None:
        return body.model, parse_chat(msgspec.json.encode({"model": "", "messages": body.messages}))[1]
    if body.prompt is None:
        raise InferouteError(400, "prompt or messages is required.", cause="invalid-request", param="prompt")
    return body.model, parse_completion(msgspec.json.encode({"model": "", "prompt": body.prompt}))[1]


# -- responses ----------------------------------------------------------------------------------------

WORDS = (
    " the",
    " model",
    " server",
    " token",
    " request",
    " answer",
    " is",
    " a",
    " of",
    " and",
    " to",
    " in",
    " cache",
    " prefix",
    " quick",
    " brown",
    " fox",
    " jumps",
    " over",
    " lazy",
    " dog",
    ",",
    ".",
    " with",
    " for",
    " on",
    " it",
    " that",
    " this",
    " we",
    " you",
    " simulated",
)
_WORDS_JSON = tuple(json.dumps(w).encode() for w in WORDS)


def token_text(seed: int, i: int) -> str:
    """The text of output token ``i`` of a request whose text seed is ``seed``."""
    return WORDS[(seed + 7 * i) % len(WORDS)]


_WORD_IDS = tuple(piece_id(w) for w in WORDS)


def output_token_id(seed: int, i: int) -> int:
    """The token id of output token ``i`` (its text's id under the simulator's tokenizer): what the engine
    writes into the KV cache, so generated blocks can be prefix-cached."""
    return _WORD_IDS[(seed + 7 * i) % len(_WORD_IDS)]


def _token_json(seed: int, i: int) -> bytes:
    return _WORDS_JSON[(seed + 7 * i) % len(_WORDS_JSON)]


def new_id(prefix: str, request_id: str | None) -> str:
    """``chatcmpl-<x-request-id or random hex>``, like vLLM."""
    return f"{prefix}-{request_id or uuid.uuid4().hex}"


class ResponseWriter:
    """Pre-encoded pieces of one response (chat or completion, streamed or not)."""

    __slots__ = ("_created", "_head", "_id", "_last", "_mid", "_model", "chat", "schedule", "text_seed")

    def __init__(
        self, chat: bool, response_id: str, model: str, text_seed: int, schedule: bool = False
    ) -> None:
        self.chat = chat
        self.text_seed = text_seed
        self.schedule = schedule
        self._id = response_id
        self._model = model
        self._created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        self._head = (
            f'data: {{"id":{json.dumps(response_id)},"object":"{obj}","created":{self._created},'
            f'"model":{json.dumps(model)},"choices":[{{"index":0,'
        ).encode()
        self._head += b'"delta":{"content":' if chat else b'"text":'
        close = b"}" if chat else b""
        self._mid = close + b',"logprobs":null,"finish_reason":null'
        self._last = close + b',"logprobs":null,"finish_reason":"%s","stop_reason":null'

    def role_chunk(self) -> bytes:
        """The first chat chunk (role, empty content)."""
        return (
            self._head.replace(b'"delta":{"content":', b'"delta":{"role":"assistant","content":')
            + b'""'
            + self._mid
            + b"}]}\n\n"
        )

    def token_chunk(
        self, i: int, finish_reason: str | None, scheduled_at: float | None = None, written_at: float = 0.0
    ) -> bytes:
        """The SSE chunk of output token ``i`` (with the finish reason when it is the last).

        With ``scheduled_at`` (``emit_schedule``), the chunk also carries ``sim_scheduled_at`` (when the
        engine produced the token) and ``sim_written_at`` (when the server wrote it), CLOCK_MONOTONIC seconds.
        """
        tail = self._mid if finish_reason is None else self._last % finish_reason.encode()
        if scheduled_at is None:
            return b"".join((self._head, _token_json(self.text_seed, i), tail, b"}]}\n\n"))
        stamp = b'}],"sim_scheduled_at":%.6f,"sim_written_at":%.6f}\n\n' % (scheduled_at, written_at)
        return b"".join((self._head, _token_json(self.text_seed, i), tail, stamp))

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> bytes:
        """The final ``include_usage`` chunk."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        payload = {
            "id": self._id,
            "object": obj,
            "created": self._created,
            "model": self._model,
            "choices": [],
            "usage": usage(prompt_tokens, completion_tokens, cached_tokens),
        }
        return b"data: " + msgspec.json.encode(payload) + b"\n\n"

    def full_response(
        self, completion_tokens: int, finish_reason: str, prompt_tokens: int, cached_tokens: int
    ) -> bytes:
        """A non-streaming response body."""
        text = "".join(token_text(self.text_seed, i) for i in range(completion_tokens))
        choice: dict[str, Any]
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text, "tool_calls": []},
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": None,
            }
            obj = "chat.completion"
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": None,
                "prompt_logprobs": None,
            }
            obj = "text_completion"
        payload = {
            "id": self._id,
            "object": obj,
            "created": self._created,
            "model": self._model,
            "choices": [choice],
            "usage": usage(prompt_tokens, completion_tokens, cached_tokens),
        }
        return msgspec.json.encode(payload)


DONE = b"data: [DONE]\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """vLLM's usage object, with ``prompt_tokens_details.cached_tokens``."""
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def models_body(base: str, adapters: tuple[str, ...], max_model_len: int, created: int) -> bytes:
    """``GET /v1/models`` as vLLM answers it (adapters have the base model as ``parent``)."""

    def card(name: str, parent: str | None) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": name if parent is None else f"/adapters/{name}",
            "parent": parent,
            "max_model_len": max_model_len if parent is None else None,
        }

    data = [card(base, None), *(card(a, base) for a in adapters)]
    return msgspec.json.encode({"object": "list", "data": data})
