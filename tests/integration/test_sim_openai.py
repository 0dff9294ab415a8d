"""The simulator over real HTTP, with the official openai SDK as the client."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
from openai import AsyncOpenAI

from inferoute.sim import DEFAULT_MODEL, SimConfig, SimPool

LONG_PROMPT = " ".join(f"word{i % 97} lorem ipsum dolor sit amet" for i in range(700))


@pytest.fixture
async def pool() -> AsyncIterator[SimPool]:
    p = await SimPool.start(SimConfig(time_scale=0.5, lora_adapters=("sql-lora",), seed=7), replicas=2)
    try:
        yield p
    finally:
        await p.aclose()


def client(pool: SimPool, i: int = 0) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=pool.urls[i] + "/v1", api_key="unused", max_retries=0, timeout=30)


async def test_pool_endpoints_are_distinct_and_named(pool: SimPool) -> None:
    eps = pool.endpoints
    assert [e.name for e in eps] == ["sim-0", "sim-1"]
    assert all(e.address == "127.0.0.1" and e.port > 0 for e in eps)
    assert eps[0].port != eps[1].port


async def test_chat_non_streaming(pool: SimPool) -> None:
    async with client(pool, 1) as c:
        raw = await c.chat.completions.with_raw_response.create(
            model=DEFAULT_MODEL,
            messages=[{"role": "user", "content": "Say hi"}],
            max_tokens=7,
            extra_body={"ignore_eos": True},
        )
        resp = raw.parse()
    assert raw.headers["x-inference-pod"] == "sim-1"
    assert raw.headers["x-inference-port"] == str(pool.endpoints[1].port)
    assert resp.object == "chat.completion"
    assert resp.model == DEFAULT_MODEL
    assert resp.choices[0].finish_reason == "length"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content
    assert resp.usage is not None
    assert resp.usage.completion_tokens == 7
    assert resp.usage.prompt_tokens > 3
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 7


async def test_completions_streaming_with_usage(pool: SimPool) -> None:
    async with client(pool) as c:
        stream = await c.completions.create(
            model=DEFAULT_MODEL,
            prompt="Once upon a time",
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        texts: list[str] = []
        reasons: list[str | None] = []
        usage = None
        async for chunk in stream:
            if chunk.choices:
                texts.append(chunk.choices[0].text)
                reasons.append(chunk.choices[0].finish_reason)
            else:
                usage = chunk.usage
    assert len(texts) == 12 and all(texts)
    assert reasons[:-1] == [None] * 11 and reasons[-1] == "length"
    assert usage is not None and usage.completion_tokens == 12


async def test_chat_streaming_role_then_tokens(pool: SimPool) -> None:
    async with client(pool) as c:
        stream = await c.chat.completions.create(
            model="sql-lora",
            messages=[{"role": "user", "content": "list tables"}],
            max_completion_tokens=5,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        chunks = [ch async for ch in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    contents = [ch.choices[0].delta.content for ch in chunks[1:]]
    assert len(contents) == 5 and all(contents)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(ch.model == "sql-lora" for ch in chunks)


async def test_models_lists_base_and_adapters(pool: SimPool) -> None:
    async with client(pool) as c:
        models = await c.models.list()
    ids = [m.id for m in models.data]
    assert ids == [DEFAULT_MODEL, "sql-lora"]


async def _ttft_and_cached(c: AsyncOpenAI) -> tuple[float, int]:
    start = time.monotonic()
    stream = await c.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": LONG_PROMPT}],
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    ttft = None
    cached = -1
    async for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.monotonic() - start
        if chunk.usage is not None and chunk.usage.prompt_tokens_details is not None:
            cached = chunk.usage.prompt_tokens_details.cached_tokens or 0
    assert ttft is not None
    return ttft, cached


async def test_same_long_prompt_twice_hits_the_prefix_cache() -> None:
    # Real time scale, so the modelled prefill (~0.4 s for ~4,900 tokens) dwarfs CPU contention on the host.
    async with await SimPool.start(SimConfig(), replicas=1) as pool, client(pool) as c:
        ttft1, cached1 = await _ttft_and_cached(c)
        ttft2, cached2 = await _ttft_and_cached(c)
    assert cached1 == 0
    assert cached2 > 3000  # all full blocks but the last are reused
    assert ttft1 > 0.3, ttft1
    assert ttft2 < ttft1 / 2, (ttft1, ttft2)
