"""The ``openai`` SDK through the gateway, with the real embedded picker over real simulator replicas."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import openai
import pytest
from prometheus_client import CollectorRegistry

from inferoute.gateway.app import RunningGateway, start_gateway
from inferoute.gateway.config import default_config
from inferoute.sim import DEFAULT_MODEL, SimConfig, SimPool


@contextlib.asynccontextmanager
async def system(registry: CollectorRegistry) -> AsyncIterator[tuple[RunningGateway, SimPool]]:
    sim = SimConfig(lora_adapters=("sql-lora", "chat-lora"), max_loras=2, time_scale=0.02)
    async with await SimPool.start(sim, replicas=2) as pool:
        gw = await start_gateway(default_config(pool.endpoints, "127.0.0.1:0"), registry=registry)
        try:
            for _ in range(200):
                if await gw.route_table.ready():
                    break
                await asyncio.sleep(0.02)
            yield gw, pool
        finally:
            await gw.aclose(grace=1.0)


@pytest.mark.parametrize("model", [DEFAULT_MODEL, "sql-lora"])
async def test_openai_sdk_non_streaming_and_streaming(model: str) -> None:
    reg = CollectorRegistry()
    async with system(reg) as (gw, _pool):
        client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="not-needed", max_retries=0, timeout=30)
        try:
            resp = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Say hello"}], max_tokens=8
            )
            assert resp.model == model
            assert resp.choices[0].message.content
            assert resp.usage is not None and resp.usage.completion_tokens >= 1

            stream = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "Count to ten"}],
                max_tokens=12,
                stream=True,
                stream_options={"include_usage": True},
            )
            pieces = []
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    pieces.append(chunk.choices[0].delta.content)
            assert len(pieces) >= 2  # token by token, not one blob

            completion = await client.completions.create(model=model, prompt="Once upon a time", max_tokens=4)
            assert completion.choices[0].text
        finally:
            await client.close()
        # while it runs, the gateway's /metrics shows its own series and the embedded picker's
        async with aiohttp.ClientSession() as s, s.get(gw.url + "/metrics") as r:
            text = await r.text()
    assert 'inferoute_gateway_requests_total{code="200",route="/"} 3.0' in text
    scheduled = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("inference_objective_request_total{") and f'model_name="{model}"' in line
    ]
    assert sum(scheduled) == 3


async def test_openai_sdk_sees_openai_errors() -> None:
    reg = CollectorRegistry()
    async with system(reg) as (gw, _pool):
        client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=30)
        try:
            with pytest.raises(openai.APIStatusError) as e:
                await client.chat.completions.create(
                    model=DEFAULT_MODEL,
                    messages=[{"role": "user", "content": "x" * 11 * 1024 * 1024}],  # over the 10 MiB default
                )
        finally:
            await client.close()
    assert e.value.status_code == 413
    assert isinstance(e.value.body, dict) and "exceeds the limit" in e.value.body["message"]
