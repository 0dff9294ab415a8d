"""A real router in front of the simulator: vLLM Router (Rust, PyPI ``vllm-router``) health-checks the
replicas, then routes OpenAI SDK traffic to them."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from openai import AsyncOpenAI

from inferoute.bench.peers import Contender, start_router
from inferoute.sim import DEFAULT_MODEL, SimConfig, SimPool


@pytest.fixture
async def routed(tmp_path: Path) -> AsyncIterator[str]:
    """Three replicas behind vllm-router (round robin, the routing benchmark's command line); yields the
    router's base URL. The router refuses port 0: it is started on ports it is then seen to hold
    (``start_on_ports`` starts it again when another process took one)."""
    pool = await SimPool.start(SimConfig(time_scale=0.1), replicas=3)
    try:
        router = Contender("vllm-router", "vllm-router", "round_robin")
        proc, url = await start_router(router, "vllm-router", pool.urls, tmp_path, tmp_path / "router.log")
        try:
            yield url
        finally:
            await proc.stop()
    finally:
        await pool.aclose()


async def test_vllm_router_spreads_requests_over_sim_replicas(routed: str) -> None:
    url = routed
    served: Counter[str] = Counter()
    async with AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30) as client:
        models = await client.models.list()
        assert DEFAULT_MODEL in [m.id for m in models.data]
        for i in range(6):
            raw = await client.chat.completions.with_raw_response.create(
                model=DEFAULT_MODEL,
                messages=[{"role": "user", "content": f"question {i}"}],
                max_tokens=4,
                extra_body={"ignore_eos": True},
            )
            resp = raw.parse()
            assert resp.usage is not None and resp.usage.completion_tokens == 4
            served[raw.headers["x-inference-pod"]] += 1
        stream = await client.completions.create(
            model=DEFAULT_MODEL,
            prompt="stream through the router",
            max_tokens=6,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        texts = [chunk.choices[0].text async for chunk in stream if chunk.choices]
    assert len(texts) == 6
    assert served == {"sim-0": 2, "sim-1": 2, "sim-2": 2}  # round robin over the three replicas


async def test_router_relays_simulator_errors(routed: str) -> None:
    url = routed
    async with (
        aiohttp.ClientSession() as http,
        http.post(url + "/v1/completions", json={"model": "nope", "prompt": "x"}) as r,
    ):
        assert r.status == 404
        body = await r.json()
    assert body["error"]["message"] == "The model `nope` does not exist."


async def test_sglang_router_probes_are_answered_quietly(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """sglang-router (the Rust router vllm-router forked) also probes its workers over HTTP/2 for gRPC and
    asks for SGLang's /get_model_info: the replicas refuse both (as vLLM does) without error tracebacks,
    and plain OpenAI traffic flows."""
    caplog.set_level(logging.DEBUG)
    async with await SimPool.start(SimConfig(time_scale=0.1), replicas=2) as pool:
        router = Contender("sglang-router", "sglang-router", "round_robin")
        proc, url = await start_router(router, "sglang-router", pool.urls, tmp_path, tmp_path / "router.log")
        try:
            pods = set()
            async with aiohttp.ClientSession() as http:
                for _ in range(4):
                    async with http.post(
                        url + "/v1/completions",
                        json={"model": DEFAULT_MODEL, "prompt": "hi", "max_tokens": 2},
                    ) as r:
                        assert r.status == 200
                        assert (await r.json())["usage"]["completion_tokens"] >= 1
                        pods.add(r.headers["x-inference-pod"])
        finally:
            await proc.stop()
    assert pods == {"sim-0", "sim-1"}
    errors = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
