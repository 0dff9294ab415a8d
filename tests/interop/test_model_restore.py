"""The client sees the model name it asked for, with the OpenAI SDK, streaming and not, in every data-plane
mode: the embedded gateway, the gateway with ``inferoute epp`` over gRPC, and real Envoy with
``inferoute epp`` (the picker rewrites the FULL_DUPLEX_STREAMED response body it echoes)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import openai
import pytest
from dataplanes import PLANES

from inferoute.sim import SimConfig, SimPool

CONFIG = """
plugins:
- type: queue-scorer
modelRewrites:
- name: alias
  rules:
  - matches: [{model: {type: Exact, value: food-review}}]
    targets: [{modelRewrite: food-v1}]
"""
SIM = SimConfig(time_scale=0.02, lora_adapters=("food-v1",), max_loras=1, seed=3)


@pytest.mark.parametrize("mode", list(PLANES))
async def test_openai_sdk_sees_the_model_it_asked_for(mode: str, tmp_path: Path) -> None:
    async with await SimPool.start(SIM, replicas=1) as pool, PLANES[mode](pool, CONFIG, tmp_path) as (url, _):
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
        try:
            for _ in range(100):  # the picker's first scrape
                try:
                    await client.models.list()
                    break
                except openai.APIError:
                    await asyncio.sleep(0.05)
            # the simulator serves food-v1 only (food-review would be a 404): every 200 below was rewritten
            resp = await client.chat.completions.create(
                model="food-review", messages=[{"role": "user", "content": "Say hello"}], max_tokens=8
            )
            assert resp.model == "food-review"
            assert resp.choices[0].message.content
            stream = await client.chat.completions.create(
                model="food-review",
                messages=[{"role": "user", "content": "Count to ten"}],
                max_tokens=12,
                stream=True,
                stream_options={"include_usage": True},
            )
            models = [chunk.model async for chunk in stream]
            assert len(models) >= 3 and set(models) == {"food-review"}
            completion = await client.completions.create(model="food-review", prompt="Once", max_tokens=4)
            assert completion.model == "food-review"
            # a request that was not rewritten keeps the server's answer untouched
            plain = await client.completions.create(model=SIM.model, prompt="Once", max_tokens=4)
            assert plain.model == SIM.model
        finally:
            await client.close()
