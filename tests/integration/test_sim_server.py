"""The simulator's HTTP surface: errors, headers, metrics, disconnects, base ports and the CLI process."""

from __future__ import annotations

import asyncio
import errno
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from inferoute.sim import DEFAULT_MODEL, SimConfig, SimPool

M = DEFAULT_MODEL


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        yield s


async def metrics(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """Sample name (+ finished_reason/cause label) -> value."""
    async with http.get(url + "/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            extra = s.labels.get("finished_reason") or s.labels.get("cause")
            key = f"{s.name}{{{extra}}}" if extra else s.name
            if "le" not in s.labels:
                out[key] = s.value
    return out


async def wait_for(predicate: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    """Poll ``predicate`` (a scrape) until true; fail after ``within`` seconds."""
    async with asyncio.timeout(within):
        while not await predicate():  # noqa: ASYNC110 - polling an HTTP endpoint, there is no event to wait on
            await asyncio.sleep(0.02)


async def expect_error(r: aiohttp.ClientResponse, status: int, pod: str) -> dict[str, object]:
    assert r.status == status, await r.text()
    assert r.headers["x-inference-pod"] == pod
    assert r.headers["Content-Type"].startswith("application/json")
    body = await r.json()
    err = body["error"]
    assert err["code"] == status and isinstance(err["message"], str) and err["type"]
    return err  # type: ignore[no-any-return]


async def test_error_statuses_have_openai_bodies_and_pod_headers(http: aiohttp.ClientSession) -> None:
    cfg = SimConfig(time_scale=0.1, max_model_len=512)
    async with await SimPool.start(cfg, replicas=1) as pool:
        url = pool.urls[0]
        async with http.post(url + "/v1/completions", data=b"{oops") as r:
            await expect_error(r, 400, "sim-0")
        async with http.post(url + "/v1/chat/completions", json={"model": M, "messages": "hi"}) as r:
            await expect_error(r, 400, "sim-0")
        async with http.post(url + "/v1/completions", json={"model": "gpt-9", "prompt": "x"}) as r:
            err = await expect_error(r, 404, "sim-0")
            assert err["message"] == "The model `gpt-9` does not exist."
        async with http.post(url + "/v1/completions", json={"model": M, "prompt": "word " * 600}) as r:
            err = await expect_error(r, 400, "sim-0")
            assert "maximum context length is 512" in str(err["message"])
        async with http.post(
            url + "/v1/completions", json={"model": M, "prompt": "hi", "max_tokens": 600}
        ) as r:
            await expect_error(r, 400, "sim-0")
        async with http.get(url + "/v2/nothing") as r:
            await expect_error(r, 404, "sim-0")
        async with http.get(url + "/v1/completions") as r:
            await expect_error(r, 405, "sim-0")
        async with http.post(
            url + "/v1/completions", json={"model": M, "prompt": "hi"}, headers={"x-sim-force-status": "503"}
        ) as r:
            assert r.status == 200  # forced errors are off by default
        counts = await metrics(http, url)
        assert counts["inferoute_sim:errors_total{invalid-json}"] == 1
        assert counts["inferoute_sim:errors_total{unknown-model}"] == 1
        assert counts["inferoute_sim:errors_total{context-length}"] == 2


async def test_health_and_models(http: aiohttp.ClientSession) -> None:
    async with await SimPool.start(SimConfig(lora_adapters=("x", "y")), replicas=1) as pool:
        async with http.get(pool.urls[0] + "/health") as r:
            assert r.status == 200 and r.headers["x-inference-port"] == str(pool.endpoints[0].port)
        async with http.get(pool.urls[0] + "/v1/models") as r:
            body = await r.json()
        assert [m["id"] for m in body["data"]] == [M, "x", "y"]


async def test_forced_status_when_allowed(http: aiohttp.ClientSession) -> None:
    async with await SimPool.start(SimConfig(allow_forced_errors=True), replicas=2) as pool:
        async with http.post(
            pool.urls[1] + "/v1/chat/completions",
            json={"model": M, "messages": [{"role": "user", "content": "x"}]},
            headers={"x-sim-force-status": "503"},
        ) as r:
            await expect_error(r, 503, "sim-1")
        async with http.post(
            pool.urls[1] + "/v1/completions",
            json={"model": M, "prompt": "x"},
            headers={"x-sim-force-status": "teapot"},
        ) as r:
            await expect_error(r, 400, "sim-1")


async def test_failure_rate_injects_500_and_503(http: aiohttp.ClientSession) -> None:
    async with await SimPool.start(SimConfig(failure_rate=0.5, time_scale=0.01, seed=3), replicas=1) as pool:
        statuses: list[int] = []
        for _ in range(60):
            async with http.post(
                pool.urls[0] + "/v1/completions", json={"model": M, "prompt": "x", "max_tokens": 1}
            ) as r:
                statuses.append(r.status)
                if r.status != 200:
                    await expect_error(r, r.status, "sim-0")
    assert set(statuses) == {200, 500, 503}
    failed = sum(s != 200 for s in statuses)
    assert 15 <= failed <= 45  # binomial(60, 0.5): far outside 4 sigma otherwise


async def test_queue_full_is_429_and_disconnect_aborts(http: aiohttp.ClientSession) -> None:
    cfg = SimConfig(max_num_seqs=1, max_waiting=1, time_scale=0.2)
    async with await SimPool.start(cfg, replicas=1) as pool:
        url = pool.urls[0]
        body = {"model": M, "prompt": "hello", "max_tokens": 5000, "ignore_eos": True, "stream": True}
        running = await http.post(url + "/v1/completions", json=body)
        assert running.status == 200
        first = await running.content.readline()
        assert first.startswith(b"data: ")
        waiting = asyncio.create_task(http.post(url + "/v1/completions", json={**body, "stream": False}))
        try:

            async def one_waiting() -> bool:
                return (await metrics(http, url))["vllm:num_requests_waiting"] == 1

            await wait_for(one_waiting)
            async with http.post(url + "/v1/completions", json=body) as r:
                err = await expect_error(r, 429, "sim-0")
                assert err["type"] == "rate_limit_error"
        finally:
            waiting.cancel()
            running.close()

        async def all_aborted() -> bool:
            m = await metrics(http, url)
            return (
                m["vllm:num_requests_running"] == 0
                and m["vllm:num_requests_waiting"] == 0
                and m["inferoute_sim:aborted_requests_total"] == 2
            )

        await wait_for(all_aborted)
        m = await metrics(http, url)
        assert m["vllm:kv_cache_usage_perc"] == 0.0
        assert m["inferoute_sim:rejected_queue_full_total"] == 1


async def test_metrics_after_traffic(http: aiohttp.ClientSession) -> None:
    async with await SimPool.start(SimConfig(time_scale=0.1), replicas=1) as pool:
        url = pool.urls[0]
        prompt = "shared system prompt " * 50
        for _ in range(2):
            async with http.post(
                url + "/v1/completions",
                json={"model": M, "prompt": prompt, "max_tokens": 4, "ignore_eos": True},
            ) as r:
                assert r.status == 200
                usage = (await r.json())["usage"]
        m = await metrics(http, url)
    assert usage["prompt_tokens_details"]["cached_tokens"] > 0
    assert m["vllm:request_success_total{length}"] == 2
    assert m["vllm:generation_tokens_total"] == 8
    assert m["vllm:prompt_tokens_total"] == 2 * usage["prompt_tokens"]
    assert m["vllm:prefix_cache_hits_total"] == usage["prompt_tokens_details"]["cached_tokens"]
    assert m["vllm:prefix_cache_queries_total"] == 2 * usage["prompt_tokens"]
    assert m["vllm:time_to_first_token_seconds_count"] == 2
    assert m["vllm:e2e_request_latency_seconds_count"] == 2
    assert m["vllm:inter_token_latency_seconds_count"] == 6


async def test_base_port_gives_consecutive_ports(http: aiohttp.ClientSession) -> None:
    for _ in range(50):  # another process may hold a port of the range: then try another base
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        try:
            pool = await SimPool.start(SimConfig(), replicas=3, base_port=base)
            break
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
    else:
        raise AssertionError("no base port with 3 free ports after 50 tries")
    async with pool:
        assert [e.port for e in pool.endpoints] == [base, base + 1, base + 2]
        for i, ep in enumerate(pool.endpoints):
            async with http.get(f"http://127.0.0.1:{ep.port}/health") as r:
                assert r.headers["x-inference-pod"] == f"sim-{i}"


async def test_replicas_have_independent_state(http: aiohttp.ClientSession) -> None:
    async with await SimPool.start(SimConfig(time_scale=0.1), replicas=2) as pool:
        prompt = {"model": M, "prompt": "a long shared prefix " * 40, "max_tokens": 1}
        for url in (pool.urls[0], pool.urls[0], pool.urls[1]):
            async with http.post(url + "/v1/completions", json=prompt) as r:
                cached = (await r.json())["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached == 0  # replica 1 never saw the prefix replica 0 cached


def test_cli_runs_until_sigterm() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "inferoute",
            "sim",
            "--replicas",
            "2",
            "--port",
            "0",
            "--time-scale",
            "0.1",
            "--lora-adapters",
            "a,b",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        addrs = dict(part.split("=") for part in line.split())
        assert sorted(addrs) == ["sim-0", "sim-1"]

        async def check() -> None:
            async with aiohttp.ClientSession() as s:
                for name, addr in addrs.items():
                    async with s.post(
                        f"http://{addr}/v1/completions", json={"model": "b", "prompt": "hi", "max_tokens": 2}
                    ) as r:
                        assert r.status == 200 and r.headers["x-inference-pod"] == name
                        assert json.loads(await r.text())["model"] == "b"

        asyncio.run(check())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()


async def test_emit_schedule_stamps_every_token(http: aiohttp.ClientSession) -> None:
    cfg = SimConfig(time_scale=0.2, emit_schedule=True)
    async with await SimPool.start(cfg, replicas=1) as pool:
        body = {"model": M, "prompt": "tick", "max_tokens": 8, "ignore_eos": True, "stream": True}
        events = []
        async with http.post(pool.urls[0] + "/v1/completions", json=body) as r:
            async for line in r.content:
                if line.startswith(b"data: {"):
                    events.append((time.monotonic(), json.loads(line[6:])))
    assert len(events) == 8
    scheduled = [e["sim_scheduled_at"] for _, e in events]
    assert scheduled == sorted(scheduled) and len(set(scheduled)) == 8
    gaps = [b - a for a, b in itertools.pairwise(scheduled)]
    assert all(g == pytest.approx(0.2 * (0.010 + 0.00005), rel=0.01) for g in gaps)  # the modelled ITL
    for arrival, e in events:
        assert e["sim_written_at"] >= e["sim_scheduled_at"] - 0.002  # timers may fire up to 1 ms early
        assert arrival >= e["sim_written_at"]


async def test_late_timer_delivers_every_due_token_once(http: aiohttp.ClientSession) -> None:
    # Block the event loop mid-stream, so several engine steps are due when the replica's timer finally runs:
    # every token must still arrive once, in order, with its own scheduled stamp.
    cfg = SimConfig(time_scale=0.2, emit_schedule=True)
    async with await SimPool.start(cfg, replicas=1) as pool:
        body = {"model": M, "prompt": "tick", "max_tokens": 30, "ignore_eos": True, "stream": True}
        events = []
        async with http.post(pool.urls[0] + "/v1/completions", json=body) as r:
            async for line in r.content:
                if line.startswith(b"data: {"):
                    events.append(json.loads(line[6:]))
                    if len(events) == 3:
                        time.sleep(0.03)  # noqa: ASYNC251 - deliberately starve the loop (~15 steps)
    assert len(events) == 30
    scheduled = [e["sim_scheduled_at"] for e in events]
    assert scheduled == sorted(scheduled) and len(set(scheduled)) == 30
    written = [e["sim_written_at"] for e in events]
    assert len(set(written)) < 25  # the overdue tokens went out together
    assert events[-1]["choices"][0]["finish_reason"] == "length"


async def test_tokenize_counts_what_usage_reports(http: aiohttp.ClientSession) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is a KV cache?"},
    ]
    async with await SimPool.start(SimConfig(time_scale=0.1), replicas=1) as pool:
        url = pool.urls[0]
        async with http.post(url + "/tokenize", json={"model": M, "messages": messages}) as r:
            assert r.status == 200
            tok = await r.json()
        async with http.post(
            url + "/v1/chat/completions", json={"model": M, "messages": messages, "max_tokens": 1}
        ) as r:
            usage = (await r.json())["usage"]
        async with http.post(url + "/tokenize", json={"prompt": "hello world"}) as r:
            plain = await r.json()
        async with http.post(url + "/tokenize", json={"model": "other", "prompt": "x"}) as r:
            await expect_error(r, 404, "sim-0")
    assert tok["count"] == usage["prompt_tokens"] == len(tok["tokens"])
    assert tok["max_model_len"] == SimConfig().max_model_len
    assert plain["count"] == 2


async def test_http10_client_gets_an_unchunked_stream() -> None:
    # HTTP/1.0 has no chunked encoding: the stream is written through aiohttp and ends with the connection.
    async with await SimPool.start(SimConfig(time_scale=0.2), replicas=1) as pool:
        ep = pool.endpoints[0]
        reader, writer = await asyncio.open_connection(ep.address, ep.port)
        try:
            body = json.dumps(
                {"model": M, "prompt": "old client", "max_tokens": 6, "ignore_eos": True, "stream": True}
            ).encode()
            writer.write(
                b"POST /v1/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
            )
            raw = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
            await writer.wait_closed()
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and b"chunked" not in head.lower()
    events = [line for line in payload.split(b"\n\n") if line]
    assert len(events) == 7 and events[-1] == b"data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "text_completion" for e in events[:-1])


async def test_heterogeneous_pool_one_config_per_replica(http: aiohttp.ClientSession) -> None:
    fast, slow = SimConfig(time_scale=0.1), SimConfig(time_scale=0.1, step_base_s=0.5, model="slow-model")
    async with await SimPool.start([fast, slow]) as pool:
        assert len(pool.endpoints) == 2
        elapsed = []
        for url, model in zip(pool.urls, (M, "slow-model"), strict=True):
            t0 = time.monotonic()
            async with http.post(
                url + "/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 2}
            ) as r:
                assert r.status == 200
            elapsed.append(time.monotonic() - t0)
    assert elapsed[1] >= 0.1  # two steps of >= 50 ms each (0.5 s x time_scale 0.1)
    assert elapsed[1] > elapsed[0]  # the default replica's steps take ~3 ms
    with pytest.raises(ValueError):
        await SimPool.start([fast, slow], replicas=3)


async def test_lora_slot_wait_is_visible_in_metrics(http: aiohttp.ClientSession) -> None:
    cfg = SimConfig(lora_adapters=("sql", "chat"), max_loras=1, time_scale=0.2)
    async with await SimPool.start(cfg, replicas=1) as pool:
        url = pool.urls[0]
        body = {"prompt": "q", "max_tokens": 2000, "ignore_eos": True, "stream": True}
        running = await http.post(url + "/v1/completions", json={**body, "model": "sql"})
        waiting = asyncio.create_task(http.post(url + "/v1/completions", json={**body, "model": "chat"}))
        try:
            assert (await running.content.readline()).startswith(b"data: ")

            async def lora_info() -> dict[str, str]:
                async with http.get(url + "/metrics") as r:
                    text = await r.text()
                for fam in text_string_to_metric_families(text):
                    if fam.name == "vllm:lora_requests_info":
                        return dict(fam.samples[0].labels)
                return {}

            async def chat_waits() -> bool:
                return (await lora_info()).get("waiting_lora_adapters") == "chat"

            await wait_for(chat_waits)
            info = await lora_info()
            assert info["running_lora_adapters"] == "sql" and info["max_lora"] == "1"
            m = await metrics(http, url)
            assert m["inferoute_sim:lora_slot_waits_total"] == 1
            assert m["vllm:num_requests_running"] == 1 and m["vllm:num_requests_waiting"] == 1
        finally:
            waiting.cancel()
            running.close()
