"""Flow control behind stock NGINX: the decider's embedded picker queues, and its drops reach the client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import msgspec
import pytest
from nginx_harness import NginxFactory, listening_socket

from inferoute.gateway.config import default_config
from inferoute.gateway.nginx_decider.server import start_decider
from inferoute.integrations.nginx import NginxOptions, render
from inferoute.sim import DEFAULT_MODEL, SimConfig, SimPool

CONFIG = """
featureGates: [flowControl]
plugins:
- type: queue-scorer
- {type: concurrency-detector, parameters: {maxConcurrency: 1}}
flowControl: {maxRequests: 4}
"""


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[NginxFactory]:
    with NginxFactory(tmp_path) as factory:
        yield factory


async def test_queued_request_expires_with_the_drop_reason_through_nginx(nginx: NginxFactory) -> None:
    async with await SimPool.start(SimConfig(time_scale=0.1), replicas=1) as pool:
        cfg = default_config(pool.endpoints, "127.0.0.1:0", path="/v1/")
        cfg = msgspec.structs.replace(cfg, picker=msgspec.structs.replace(cfg.picker, config_text=CONFIG))
        running = await start_decider(cfg)
        try:
            sock = listening_socket()
            port = sock.getsockname()[1]
            opts = NginxOptions(
                decider=f"127.0.0.1:{running.port}",
                listen=f"127.0.0.1:{port}",
                self_contained=True,
                worker_processes="1",
            )
            await asyncio.to_thread(nginx, render(opts), [sock])
            url = f"http://127.0.0.1:{port}/v1/completions"
            async with aiohttp.ClientSession() as http:
                deadline = time.monotonic() + 10
                while True:  # the picker is ready once it has scraped the replica
                    async with http.post(
                        url, json={"model": DEFAULT_MODEL, "prompt": "x", "max_tokens": 1}
                    ) as r:
                        if r.status == 200:
                            break
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
                long = {"model": DEFAULT_MODEL, "prompt": "x", "max_tokens": 3000, "ignore_eos": True}
                blocker = asyncio.ensure_future(http.post(url, json=long))
                await asyncio.sleep(0.3)
                short = {"model": DEFAULT_MODEL, "prompt": "y", "max_tokens": 1}
                async with http.post(url, json=short, headers={"x-llm-d-request-ttl-ms": "200"}) as r:
                    assert r.status == 429, await r.text()
                    assert r.headers["x-llm-d-request-dropped-reason"] == "rejected-ttl-expired"
                    assert (await r.json())["error"]["code"] == 429
                blocker.cancel()
        finally:
            await running.aclose()
