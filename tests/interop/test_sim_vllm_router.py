"""A real router in front of the simulator: vLLM Router (Rust, PyPI ``vllm-router``) health-checks the
replicas, then routes OpenAI SDK traffic to them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import sys
import tempfile
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO

import aiohttp
import pytest
from openai import AsyncOpenAI

from inferoute.bench.peers import listening_ports
from inferoute.sim import DEFAULT_MODEL, SimConfig, SimPool


def router_binary() -> str:
    found = Path(sys.executable).with_name("vllm-router")
    if found.exists():
        return str(found)
    path = shutil.which("vllm-router")
    if path is None:
        raise AssertionError("vllm-router is not installed: pip install vllm-router (make test-deps)")
    return path


@pytest.fixture
async def routed() -> AsyncIterator[str]:
    """Three replicas behind vllm-router (round robin); yields the router's base URL."""
    pool = await SimPool.start(SimConfig(time_scale=0.1), replicas=3)
    argv = [router_binary(), "--worker-urls", *pool.urls, "--policy", "round_robin", "--log-level", "warning"]
    proc, url = await start_router(argv)
    try:
        yield url
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await pool.aclose()


async def start_router(argv: list[str]) -> tuple[asyncio.subprocess.Process, str]:
    """Start a Rust router (it refuses port 0) on a port the OS just handed out; when another process took
    that port meanwhile, the router exits or someone else answers: try another. Returns the process and the
    URL that this process itself answers on."""
    for _ in range(10):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        with tempfile.TemporaryFile() as stderr:  # a file: nobody has to keep reading a pipe
            proc = await asyncio.create_subprocess_exec(
                *argv,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=stderr,
            )
            url = f"http://127.0.0.1:{port}"
            if await _healthy(url, proc, stderr):
                return proc, url
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    raise AssertionError("the router never answered on a port of its own")


async def _healthy(url: str, proc: asyncio.subprocess.Process, stderr: IO[bytes]) -> bool:
    """True once ``proc`` listens on the URL's port and answers /health; False when the port went to another
    process (the router exits with an address error, or never listens)."""
    port = int(url.rsplit(":", 1)[1])
    async with aiohttp.ClientSession() as http, asyncio.timeout(30):
        while True:
            if proc.returncode is not None:
                stderr.seek(0)
                err = stderr.read().decode(errors="replace")
                if "in use" in err.lower():
                    return False
                raise AssertionError(f"the router exited with {proc.returncode}: {err[-2000:]}")
            if port in listening_ports(proc.pid):
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    async with http.get(url + "/health") as r:
                        if r.status == 200:
                            return True
            await asyncio.sleep(0.1)


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


async def test_sglang_router_probes_are_answered_quietly(caplog: pytest.LogCaptureFixture) -> None:
    """sglang-router (the Rust router vllm-router forked) also probes its workers over HTTP/2 for gRPC and
    asks for SGLang's /get_model_info: the replicas refuse both (as vLLM does) without error tracebacks,
    and plain OpenAI traffic flows."""
    caplog.set_level(logging.DEBUG)
    async with await SimPool.start(SimConfig(time_scale=0.1), replicas=2) as pool:
        argv = [sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *pool.urls]
        proc, url = await start_router([*argv, "--policy", "round_robin"])
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
            if proc.returncode is None:
                proc.terminate()
                await proc.wait()
    assert pods == {"sim-0", "sim-1"}
    errors = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
