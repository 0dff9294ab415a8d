"""Discovery under load: ``inferoute gateway`` -> ``inferoute epp --pool-name`` (ext_proc) -> simulator pods.

Three simulator replicas play three pods: each listens on its own loopback address (127.0.0.1-3) and the
same port, which the InferencePool names as its targetPort, so the fake pods' podIPs are real. While clients
send chat completions through the gateway, a pod turns unready and another is deleted, and a new pod
appears; the test measures when each change stops (or starts) the traffic at that pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry

from inferoute.epp.cli import EppRunOptions, run
from inferoute.gateway.app import start_gateway
from inferoute.gateway.config import parse_config
from inferoute.sim import SimConfig, SimPool
from kube_emulator import PODS_URL, POOLS_URL, kube_api, pod, pool, ready_patch

IPS = ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4")


def port_free_on_all(ips: tuple[str, ...]) -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind((ips[0], 0))
            port = int(s.getsockname()[1])
        try:
            with contextlib.ExitStack() as stack:
                for ip in ips:
                    t = stack.enter_context(socket.socket())
                    t.bind((ip, port))
            return port
        except OSError:
            continue
    raise AssertionError("no port free on every loopback address")


@contextlib.asynccontextmanager
async def pods(port: int) -> AsyncIterator[dict[str, list[float]]]:
    """One simulator per IP; yields ip -> arrival times (monotonic) of the requests it received."""
    arrivals: dict[str, list[float]] = {ip: [] for ip in IPS}
    async with contextlib.AsyncExitStack() as stack:
        for ip in IPS:
            sim = await SimPool.start(SimConfig(time_scale=0.02), host=ip, base_port=port)
            await stack.enter_async_context(sim)
            engine = sim.replicas[0].engine
            submit = engine.submit

            def counted(req: Any, now: float, _submit: Any = submit, _ip: str = ip) -> None:
                arrivals[_ip].append(time.monotonic())
                _submit(req, now)

            engine.submit = counted  # type: ignore[method-assign]
        yield arrivals


async def load(url: str, stop: asyncio.Event, statuses: list[int]) -> None:
    body = {"model": SimConfig().model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    async with aiohttp.ClientSession() as http:
        while not stop.is_set():
            async with http.post(url + "/v1/chat/completions", json=body) as resp:
                await resp.read()
                statuses.append(resp.status)


async def test_endpoint_changes_under_load_reach_no_removed_pod(tmp_path: Path) -> None:
    port = port_free_on_all(IPS)
    async with kube_api(tmp_path) as api, pods(port) as arrivals:
        await api.create(POOLS_URL, pool(ports=(port,)))
        for i, ip in enumerate(IPS[:3]):
            await api.create(PODS_URL, pod(f"p{i}", ip))
        stop_epp = asyncio.Event()
        opts = EppRunOptions(
            None, None, "round-robin", "127.0.0.1", 0, 0, 0, None, True, 0.05,
            "pool", 1.0, discover=True, pool_namespace="default", kubeconfig=str(api.kubeconfig),
        )  # fmt: skip
        ready_line = _ReadyLine()
        logging.getLogger("inferoute.epp.cli").addHandler(ready_line)
        logging.getLogger("inferoute.epp.cli").setLevel(logging.INFO)
        epp = asyncio.create_task(run(opts, stop_epp))
        grpc_port = (await asyncio.wait_for(asyncio.shield(ready_line.ports), 30))[0]
        logging.getLogger("inferoute.epp.cli").removeHandler(ready_line)
        cfg = parse_config(
            {
                "listen": "127.0.0.1:0",
                "pool": {"endpoints": [], "allowed_cidrs": ["127.0.0.0/8"]},
                "routes": [
                    {"path": "/", "epp": {"endpoint": f"http://127.0.0.1:{grpc_port}", "timeout_ms": 2000}}
                ],
            }
        )
        gw = await start_gateway(cfg, registry=CollectorRegistry())
        stop, statuses = asyncio.Event(), []
        try:
            await _until_all_serve(gw.url, arrivals, IPS[:3])
            clients = [asyncio.create_task(load(gw.url, stop, statuses)) for _ in range(8)]
            await asyncio.sleep(0.5)
            t_unready = time.monotonic()
            await api.patch(PODS_URL, "p0", ready_patch(False))
            t_deleted = time.monotonic()
            await api.delete(PODS_URL, "p1")
            t_added = time.monotonic()
            await api.create(PODS_URL, pod("p3", IPS[3]))
            await asyncio.sleep(1.5)
            stop.set()
            await asyncio.gather(*clients)
        finally:
            await gw.aclose(grace=1.0)
            stop_epp.set()
            await epp
    last_unready = max(arrivals[IPS[0]]) - t_unready
    last_deleted = max(arrivals[IPS[1]]) - t_deleted
    first_added = min(t for t in arrivals[IPS[3]] if t > t_added) - t_added
    print(f"last request to the unready pod {last_unready * 1000:.0f} ms after the change, to the deleted "
          f"pod {last_deleted * 1000:.0f} ms after, first to the new pod {first_added * 1000:.0f} ms after; "
          f"{len(statuses)} requests")  # fmt: skip
    assert last_unready < 1.0 and last_deleted < 1.0 and first_added < 1.0
    assert len(arrivals[IPS[2]]) > 50 and set(statuses) == {200}


async def _until_all_serve(url: str, arrivals: dict[str, list[float]], ips: tuple[str, ...]) -> None:
    """Send requests until every pod got one (the picker has discovered them all and is ready)."""
    body = {"model": SimConfig().model, "prompt": "hi", "max_tokens": 1}
    async with aiohttp.ClientSession() as http, asyncio.timeout(10):
        while not all(arrivals[ip] for ip in ips):
            async with http.post(url + "/v1/completions", json=body) as resp:
                await resp.read()
            await asyncio.sleep(0.02)


class _ReadyLine(logging.Handler):
    """The ports the picker bound, from its "inferoute epp ready" line (it runs in this process)."""

    def __init__(self) -> None:
        super().__init__()
        self.ports: asyncio.Future[tuple[int, ...]] = asyncio.get_running_loop().create_future()

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("inferoute epp ready") and not self.ports.done():
            self.ports.set_result(tuple(int(p) for p in record.args))  # type: ignore[union-attr]
