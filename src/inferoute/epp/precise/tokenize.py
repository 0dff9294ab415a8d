"""Tokenizing an incoming request for precise prefix matching: the token ids the model server will see.

Three ways, as llm-d offers (its ``token-producer``):

* :class:`RenderTokenizer` — ask a model server: ``POST /v1/completions/render`` or
  ``/v1/chat/completions/render`` with the request body, read ``prompt_token_ids`` (or ``token_ids``) from
  the answer (a list of such objects is accepted too). Exact for any model, one HTTP round trip per request.
* :class:`SimTokenizer` — the simulator's deterministic tokenizer and chat rendering, in process.
* :class:`HFTokenizer` — a Hugging Face ``tokenizer.json`` (the ``tokenizers`` library) plus a Jinja2 chat
  template (``tokenizer_config.json``'s ``chat_template``), in process, no download.

:func:`parse_prompt` extracts what is to be tokenized from an OpenAI body: a completions ``prompt`` (text or
token ids) or chat ``messages`` (text content; text parts joined).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import msgspec

from inferoute.sim.tokenizer import encode as sim_encode
from inferoute.sim.tokenizer import is_token_ids, render_chat
from inferoute.sim.tokenizer import piece_matches as sim_piece_matches
from inferoute.sim.tokenizer import pieces as sim_pieces


@dataclass(frozen=True, slots=True)
class Prompt:
    model: str
    text: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    token_ids: tuple[int, ...] | None = None

    @property
    def chat(self) -> bool:
        return self.messages is not None


class _Body(msgspec.Struct):
    model: Any = None
    prompt: Any = None
    messages: Any = None


def _content(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(
            p.get("text") or "" for p in value if isinstance(p, dict) and p.get("type", "text") == "text"
        )
    return ""


def parse_prompt(body: bytes | memoryview) -> Prompt | None:
    """What to tokenize in an OpenAI completions or chat body; None when there is nothing usable."""
    try:
        doc = msgspec.json.decode(body, type=_Body)
    except msgspec.DecodeError:
        return None
    return _prompt(doc.model if isinstance(doc.model, str) else "", doc.prompt, doc.messages)


def parse_prompt_value(raw: bytes | memoryview, model: str) -> Prompt | None:
    """:func:`parse_prompt` for the raw JSON of the ``prompt`` or ``messages`` member alone (what the
    director keeps of a request), decoded once."""
    if not raw:
        return None
    try:
        value = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return None
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        return _prompt(model, None, value)
    return _prompt(model, value, None)


def _prompt(model: str, prompt: object, messages: object) -> Prompt | None:
    if isinstance(messages, list):
        turns = tuple(
            (str(m.get("role", "user")), _content(m.get("content"))) for m in messages if isinstance(m, dict)
        )
        return Prompt(model, messages=turns) if turns else None
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return Prompt(model, text=prompt)
    if isinstance(prompt, list) and is_token_ids(prompt):
        return Prompt(model, token_ids=tuple(prompt))
    return None


class LocalTokenizer(Protocol):
    """An in-process tokenizer. ``encode(p) == encode_text(*text(p))[0]`` for prompts that are not token ids;
    the split lets :class:`~inferoute.epp.precise.prefixcache.TokenPrefixCache` reuse the tokens of a text
    prefix seen before."""

    def encode(self, prompt: Prompt) -> list[int]: ...

    def text(self, prompt: Prompt) -> tuple[str, bool]:
        """The text the server tokenizes (chat rendered) and whether special tokens are added to it."""
        ...

    def encode_text(self, text: str, special: bool) -> tuple[list[int], list[int]]:
        """Token ids of ``text`` and the character offset where each ends."""
        ...


class SimTokenizer:
    """The simulator's tokenizer (``inferoute.sim.tokenizer``): exact for ``inferoute sim`` servers. Its
    pieces come from one left-to-right regular-expression scan, so text cut at a piece end tokenizes the
    same."""

    def encode(self, prompt: Prompt) -> list[int]:
        if prompt.token_ids is not None:
            return list(prompt.token_ids)
        if prompt.messages is not None:
            return sim_encode(render_chat(prompt.messages))
        return sim_encode(prompt.text or "")

    def text(self, prompt: Prompt) -> tuple[str, bool]:
        if prompt.messages is not None:
            return render_chat(prompt.messages), False
        return prompt.text or "", False

    def encode_text(self, text: str, special: bool) -> tuple[list[int], list[int]]:
        ids = sim_encode(text)
        ends = list(itertools.accumulate(map(len, sim_pieces(text))))
        if len(ends) != len(ids) or (ends and ends[-1] != len(text)):  # a character no piece covers
            ends = [m.end() for m in sim_piece_matches(text)]
        return ids, ends


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` plus a Jinja2 chat template (rendered with ``messages``,
    ``add_generation_prompt=True``, ``bos_token`` and ``eos_token``, as ``apply_chat_template`` does)."""

    def __init__(
        self, tokenizer_file: str, chat_template: str | None = None, bos_token: str = "", eos_token: str = ""
    ) -> None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(tokenizer_file)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self._template = env.from_string(chat_template) if chat_template else None
        self._bos = bos_token
        self._eos = eos_token

    def encode(self, prompt: Prompt) -> list[int]:
        if prompt.token_ids is not None:
            return list(prompt.token_ids)
        text, special = self.text(prompt)
        return list(self._tok.encode(text, add_special_tokens=special).ids)

    def text(self, prompt: Prompt) -> tuple[str, bool]:
        if prompt.messages is None:
            return prompt.text or "", True
        if self._template is None:
            raise ValueError("chat request but no chat template configured")
        text = self._template.render(
            messages=[{"role": r, "content": c} for r, c in prompt.messages],
            add_generation_prompt=True,
            bos_token=self._bos,
            eos_token=self._eos,
        )
        return text, False

    def encode_text(self, text: str, special: bool) -> tuple[list[int], list[int]]:
        enc = self._tok.encode(text, add_special_tokens=special)
        return list(enc.ids), [end for _, end in enc.offsets]


def render_token_ids(doc: object) -> list[int] | None:
    """The token ids in a render endpoint's answer (an object, or a list whose first item is one)."""
    if isinstance(doc, list) and doc:
        doc = doc[0]
    if not isinstance(doc, dict):
        return None
    for key in ("prompt_token_ids", "token_ids"):
        ids = doc.get(key)
        if isinstance(ids, list) and (not ids or is_token_ids(ids)):
            return ids
    return None


class RenderTokenizer:
    """Tokenizes through a model server's render endpoint (one POST per request)."""

    def __init__(self, scheme: str = "http", timeout: float = 2.0) -> None:
        self.scheme = scheme
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self.failures = 0

    async def tokenize(self, endpoint: str, body: bytes, chat: bool) -> list[int] | None:
        """Token ids from ``endpoint`` (``host:port``), or None when it fails (the caller falls back)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        path = "/v1/chat/completions/render" if chat else "/v1/completions/render"
        try:
            async with self._session.post(
                f"{self.scheme}://{endpoint}{path}", data=body, headers={"content-type": "application/json"}
            ) as r:
                if r.status != 200:
                    self.failures += 1
                    return None
                ids = render_token_ids(msgspec.json.decode(await r.read()))
        except (aiohttp.ClientError, TimeoutError, msgspec.DecodeError):
            self.failures += 1
            return None
        if ids is None:
            self.failures += 1
        return ids

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
