"""Parse an OpenAI completions / chat request: only ``model``, the prompt bytes and ``stream``.

msgspec decodes into a struct that keeps ``prompt`` and ``messages`` as raw JSON (``msgspec.Raw``): no Python
strings are built for the prompt, the prefix hash runs over the raw bytes, and a 200 KB prompt costs a
validating scan only. Chat prompts are the JSON of the ``messages`` array, as GIE's approximate prefix
producer.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from inferoute.errors import InferouteError

CHARS_PER_TOKEN = 4


class _Body(msgspec.Struct):
    model: object = None
    prompt: msgspec.Raw = msgspec.Raw(b"")
    messages: msgspec.Raw = msgspec.Raw(b"")
    input: msgspec.Raw = msgspec.Raw(b"")
    stream: object = False


_decoder = msgspec.json.Decoder(_Body)


@dataclass(frozen=True, slots=True)
class ParsedBody:
    model: str
    prompt: bytes
    """Raw JSON bytes of ``prompt`` (completions), ``messages`` (chat) or ``input`` (responses/embeddings)."""
    stream: bool

    @property
    def prompt_tokens(self) -> int:
        """Token estimate (bytes / 4, GIE's approximation)."""
        return (len(self.prompt) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


def parse_body(body: bytes) -> ParsedBody:
    """Decode a request body. Raises :class:`InferouteError` 400 when it is not a JSON object or has no
    string ``model``."""
    try:
        parsed = _decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise InferouteError(400, f"failed to parse request body: {exc}", cause="bad-request") from exc
    if parsed.model is None:
        raise InferouteError(400, "model not found in request body", cause="bad-request", param="model")
    if not isinstance(parsed.model, str) or not parsed.model:
        raise InferouteError(400, "model must be a non-empty string", cause="bad-request", param="model")
    raw = parsed.prompt or parsed.messages or parsed.input
    prompt = bytes(raw) if raw and bytes(raw) != b"null" else b""
    return ParsedBody(parsed.model, prompt, parsed.stream is True)
