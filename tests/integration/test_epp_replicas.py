"""Two ``inferoute epp`` replicas behind one ``inferoute gateway`` (``epp.endpoint`` listing both): one is
killed and restarted under load. The restarted replica rebuilds its precise prefix index from the simulators'
replay sockets, and within a second of coming up it decides as the survivor does. In-flight load goes through
a real redis-server (``--sync-redis``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

import aiohttp
from prometheus_client import CollectorRegistry
from test_epp_workers import Epp, ask, start_epp, worker_streams
from test_sim_kvevents_zmq import CFG

from inferoute.endpoints import Endpoint
from inferoute.extproc.channel import ChannelOptions
from inferoute.extproc.client import GrpcPicker
from inferoute.gateway.app import start_gateway
from inferoute.gateway.config import GatewayConfig, parse_config
from inferoute.picking import Destination
from inferoute.sim import DEFAULT_MODEL, SimPool
from redis_server import redis_server

DOCS = [f"Manual {i}: the quick brown fox, chapter {i}. " * 60 for i in range(3)]


async def load(url: str, stop: asyncio.Event, statuses: list[int]) -> None:
    n = 0
    async with aiohttp.ClientSession() as http:
        while not stop.is_set():
            n += 1
            messages = [{"role": "user", "content": f"{DOCS[n % len(DOCS)]} Question {id(stop)}-{n}?"}]
            body = {"model": DEFAULT_MODEL, "messages": messages, "max_tokens": 2}
            async with http.post(url + "/v1/chat/completions", json=body) as r:
                await r.read()
                statuses.append(r.status)


async def decisions(picker: GrpcPicker) -> list[str]:
    out = []
    for doc in DOCS:
        decision, session = await picker.pick(ask(doc))
        assert isinstance(decision, Destination)
        session.aborted("probe")
        out.append(decision.endpoints[0])
    return out


async def streams(http: aiohttp.ClientSession, epp: Epp) -> float:
    """ext_proc streams the replica served (a single-process replica: the plain series)."""
    async with http.get(f"http://127.0.0.1:{epp.metrics_port}/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith("inferoute_extproc_streams_total "):
                return float(line.split()[1])
    return 0.0


def gateway_config(pool: list[Endpoint], pickers: list[Epp]) -> GatewayConfig:
    """One route whose picker is both replicas (fail-open: a dead replica costs no request)."""
    listed = ",".join(f"127.0.0.1:{p.grpc_port}" for p in pickers)
    epp = {"endpoint": f"http://{listed}", "timeout_ms": 2000, "failure_mode_allow": True}
    eps = [{"name": e.name, "address": e.address, "port": e.port} for e in pool]
    return parse_config(
        {"listen": "127.0.0.1:0", "pool": {"endpoints": eps}, "routes": [{"path": "/", "epp": epp}]}
    )


async def first_agreement(
    survivor: Epp, restarted: Epp, up: float
) -> tuple[float, float, list[str], list[str]]:
    """Rounds of the same questions to both replicas until they decide alike; returns (seconds from ``up`` to
    the start of the agreeing round, to its end, the restarted replica's decisions, the survivor's)."""
    a, b = (
        GrpcPicker(ChannelOptions(f"127.0.0.1:{e.grpc_port}", tls=False), timeout_ms=2000)
        for e in (survivor, restarted)
    )
    try:
        async with asyncio.timeout(10):
            while True:
                asked = time.monotonic()
                theirs, ours = await decisions(b), await decisions(a)
                if theirs == ours:
                    return asked - up, time.monotonic() - up, theirs, ours
    finally:
        await a.aclose()
        await b.aclose()


async def until_served(http: aiohttp.ClientSession, epp: Epp, n: float) -> None:
    async with asyncio.timeout(20):
        while await streams(http, epp) < n:  # noqa: ASYNC110 - another process's counter
            await asyncio.sleep(0.05)


async def test_replica_killed_and_restarted_under_load_agrees_with_the_survivor(tmp_path: Path) -> None:
    with redis_server(tmp_path) as redis_url:
        async with await SimPool.start(CFG, replicas=3) as sims, contextlib.AsyncExitStack() as stack:
            sync = ("--sync-redis", redis_url)
            a, b = await asyncio.gather(
                start_epp(tmp_path, sims.endpoints, *sync, name="a"),
                start_epp(tmp_path, sims.endpoints, *sync, name="b"),
            )
            gw = await start_gateway(gateway_config(sims.endpoints, [a, b]), registry=CollectorRegistry())
            stack.push_async_callback(gw.aclose, 1.0)
            stop, statuses = asyncio.Event(), []
            clients = [asyncio.create_task(load(gw.url, stop, statuses)) for _ in range(4)]
            async with aiohttp.ClientSession() as http:
                await until_served(http, a, 5)
                await until_served(http, b, 5)  # both replicas take traffic
                os.kill(b.proc.pid, signal.SIGKILL)
                await b.proc.wait()
                await asyncio.sleep(0.5)  # the gateway keeps routing through the survivor
                same_port = ("--grpc-port", str(b.grpc_port))
                b2 = await start_epp(tmp_path, sims.endpoints, *sync, *same_port, name="b2")
                up = time.monotonic()
                stack.callback(lambda: b2.proc.returncode is None and b2.proc.terminate())
                agreed, answered, theirs, ours = await first_agreement(a, b2, up)
                await until_served(http, b2, 5)  # the gateway uses the restarted replica again
                assert await worker_streams(http, a.metrics_port) == {}  # one process: no worker label
            stop.set()
            await asyncio.gather(*clients)
            for epp in (a, b2):
                epp.proc.terminate()
                await epp.proc.wait()
    print(
        f"restarted replica agrees from {agreed:.2f} s after its ready line (answered {answered:.2f} s): "
        f"{theirs}"
    )
    assert ours == theirs
    assert len(set(ours)) > 1  # the documents live on different replicas: the index, not a tie, decided
    # the goal is 1 s (measured 0.00-0.71 s at load average 11 on 2 shared cores); the bound leaves room for a
    # loaded machine, where a Python process start alone can take seconds
    assert agreed < 2.0
    assert statuses and set(statuses) == {200}  # fail-open: the kill cost no request
