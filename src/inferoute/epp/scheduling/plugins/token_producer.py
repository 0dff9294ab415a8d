"""``token-producer``: the prompt's token ids before scheduling, as llm-d's data producer of that name.

For each request the picker asks one fresh endpoint's render endpoint (``/v1/completions/render`` or
``/v1/chat/completions/render``, vLLM's) for the token ids the server would run, so precise prefix matching
sees exactly the server's tokens (chat template included). When the call fails (timeout, error status, no
endpoint) the request is scheduled with the local tokenizer of ``precise-prefix-cache-producer`` instead.

Parameters: ``source`` (``render``; ``local`` skips the call and leaves tokenization to the producer),
``scheme`` (http), ``timeoutSeconds`` (2), ``modelName`` / ``uds`` (accepted: llm-d's sidecar options).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import ClassVar

from inferoute.endpoints import Endpoint
from inferoute.epp.plugin import Params, PluginDeps
from inferoute.epp.precise.tokenize import RenderTokenizer, parse_prompt

TYPE = "token-producer"
ROLE = "other"


class TokenProducer:
    type_name: ClassVar[str] = TYPE

    def __init__(self, name: str, render: RenderTokenizer | None) -> None:
        self.name = name
        self.render = render
        self._turn = itertools.count()

    async def prepare(self, body: bytes, endpoints: Sequence[Endpoint]) -> Sequence[int] | None:
        if self.render is None or not endpoints:
            return None
        prompt = parse_prompt(body)
        if prompt is None:
            return None
        if prompt.token_ids is not None:
            return prompt.token_ids
        ep = endpoints[next(self._turn) % len(endpoints)]
        return await self.render.tokenize(ep.key, body, prompt.chat)

    async def start(self, endpoints: Sequence[Endpoint]) -> None:
        return None

    def endpoints_changed(self, endpoints: Sequence[Endpoint]) -> None:
        return None

    async def aclose(self) -> None:
        if self.render is not None:
            await self.render.aclose()


def create(name: str, params: Params, deps: PluginDeps) -> TokenProducer:
    source = params.text("source", "render", choices=("render", "local"))
    scheme = params.text("scheme", "http", choices=("http", "https"))
    timeout = params.number("timeoutSeconds", 2.0, minimum=0.001)
    params.text("modelName", "")
    params.text("uds", "")
    return TokenProducer(name, RenderTokenizer(scheme, timeout) if source == "render" else None)
