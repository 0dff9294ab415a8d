"""Leader failover under load: SIGKILL the leading ``inferoute epp`` process while clients send requests
through ``inferoute gateway``; measure the time until requests are routed by the new leader and count the
requests that failed, with the gateway's picker failure mode open and closed.

Three real ``inferoute epp --pool-name --ha-enable-leader-election`` processes discover the pool from the
Kubernetes API emulator (which answers a stale Lease write with 409, so two standbys racing for the Lease
after a kill are resolved as by the API server). A small TCP forwarder stands in for the picker Service:
every 100 ms it probes each replica's ``/readyz`` (like a kubelet readiness probe feeding the Service's
endpoints) and sends new connections to a ready replica only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO

import aiohttp
from prometheus_client import CollectorRegistry

from inferoute.bench.gateway import tree_run_delay_seconds
from inferoute.gateway.app import start_gateway
from inferoute.gateway.config import parse_config
from inferoute.sim import SimConfig, SimPool
from kube_emulator import PODS_URL, POOLS_URL, KubeApi, kube_api, pod, pool
from tcp_relay import relay

PROBE_PERIOD = 0.1


def cpu_wait(*pids: int) -> float:
    """Seconds the threads of these processes have spent runnable but waiting for a CPU (Linux schedstat).
    On a loaded machine the takeover is late by about what the survivors and this process (the forwarder's
    prober, the API emulator, the gateways) waited for a CPU, so the bounds allow exactly that on top."""
    return sum(tree_run_delay_seconds(pid, descendants=False) for pid in pids)


class ServiceForwarder:
    """TCP proxy to whichever backend answers /readyz 200 (the Service's ready endpoints)."""

    def __init__(self, backends: list[tuple[int, int]]) -> None:
        self.backends = backends  # (grpc port, metrics port)
        self.ready: list[int] = []
        self.port = 0

    async def probe_forever(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.2)) as http:
            while True:
                ready = []
                for grpc_port, metrics_port in self.backends:
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                        async with http.get(f"http://127.0.0.1:{metrics_port}/readyz") as r:
                            if r.status == 200:
                                ready.append(grpc_port)
                self.ready = ready
                await asyncio.sleep(PROBE_PERIOD)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.ready:
            writer.close()
            return
        await relay(reader, writer, self.ready[0])


async def start_replica(name: str, api: KubeApi, log: IO[bytes]) -> asyncio.subprocess.Process:
    args = [
        "--pool-name", "pool", "--pool-namespace", "default", "--kubeconfig", str(api.kubeconfig),
        "--ha-enable-leader-election", "--ha-identity", name, "--profile", "round-robin",
        "--insecure-serving",
        "--host", "127.0.0.1", "--grpc-port", "0", "--health-port", "0", "--metrics-port", "0",
        "--grace", "0.5",
    ]  # fmt: skip
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "inferoute", "epp", *args,
        stdout=asyncio.subprocess.DEVNULL, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip


def _ready_ports(log: Path) -> tuple[int, int, int] | None:
    m = re.search(r"inferoute epp ready: ext_proc :(\d+), health :(\d+), metrics :(\d+)", log.read_text())
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


async def bound_ports(proc: asyncio.subprocess.Process, log: Path) -> tuple[int, int, int]:
    """The ports the replica bound, from its "inferoute epp ready" log line."""
    async with asyncio.timeout(30):
        while (ports := _ready_ports(log)) is None:
            assert proc.returncode is None, f"inferoute epp exited ({proc.returncode}); see {log}"
            await asyncio.sleep(0.05)
    return ports


async def streams(http: aiohttp.ClientSession, metrics_port: int) -> float:
    with contextlib.suppress(aiohttp.ClientError):
        async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as r:
            for line in (await r.text()).splitlines():
                if line.startswith("inferoute_extproc_streams_total "):
                    return float(line.split()[1])
    return 0.0


async def load(url: str, stop: asyncio.Event, results: list[tuple[float, int]]) -> None:
    body = {"model": SimConfig().model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with aiohttp.ClientSession() as http:
        while not stop.is_set():
            async with http.post(url + "/v1/chat/completions", json=body) as resp:
                await resp.read()
                results.append((time.monotonic(), resp.status))


@contextlib.asynccontextmanager
async def cluster(tmp_path: Path) -> AsyncIterator[tuple[KubeApi, SimPool]]:
    async with kube_api(tmp_path) as api, await SimPool.start(SimConfig(time_scale=0.02)) as sims:
        ep = sims.endpoints[0]
        await api.create(POOLS_URL, pool(ports=(ep.port,)))
        await api.create(PODS_URL, pod("sim-0", ep.address))
        yield api, sims


async def kill_leader(
    procs: list[asyncio.subprocess.Process],
    ports: list[tuple[int, int, int]],
    fwd: ServiceForwarder,
    gw_url: str,
) -> tuple[float | None, float, float, list[int]]:
    """Load through the gateway at ``gw_url``, SIGKILL the leading replica, and wait until a surviving replica
    is ready (the Service switched: ``takeover``) and has served a stream (``failover``, both in seconds after
    the kill); returns them, the seconds the survivors and this process waited for a CPU meanwhile, and the
    status of every request sent after the kill."""
    async with asyncio.timeout(15):
        while not fwd.ready:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    leader = next(i for i, p in enumerate(ports) if p[0] == fwd.ready[0])
    survivors = [i for i, p in enumerate(procs) if i != leader and p.returncode is None]
    stop, results = asyncio.Event(), []
    clients = [asyncio.create_task(load(gw_url, stop, results)) for _ in range(4)]
    await asyncio.sleep(0.5)  # steady load (hundreds of requests) before the kill
    async with aiohttp.ClientSession() as http:

        async def served() -> float:
            return sum([await streams(http, ports[i][2]) for i in survivors])

        before = await served()
        pids = (os.getpid(), *(procs[i].pid for i in survivors))
        waited = -cpu_wait(*pids)
        t_kill = time.monotonic()
        procs[leader].send_signal(signal.SIGKILL)
        takeover = None
        async with asyncio.timeout(10):
            while await served() <= before:
                if takeover is None and any(ports[i][0] in fwd.ready for i in survivors):
                    takeover = time.monotonic() - t_kill
                await asyncio.sleep(0.02)
        failover = time.monotonic() - t_kill
        waited += cpu_wait(*pids)
    await asyncio.sleep(0.25)
    stop.set()
    await asyncio.gather(*clients)
    await procs[leader].wait()
    return takeover, failover, waited, [s for t, s in results if t >= t_kill]


async def test_leader_killed_under_load(tmp_path: Path) -> None:
    """Three replicas; the leader is killed twice: first under load through a fail-open gateway, then the new
    leader under load through a fail-closed one (one start-up for both measurements)."""
    async with cluster(tmp_path) as (api, sims), contextlib.AsyncExitStack() as stack:
        logs = [tmp_path / f"r{i}.log" for i in range(3)]
        files = [stack.enter_context(log.open("wb")) for log in logs]
        procs = [await start_replica(f"r{i}", api, files[i]) for i in range(3)]
        ports = [await bound_ports(p, log) for p, log in zip(procs, logs, strict=True)]
        fwd = ServiceForwarder([(p[0], p[2]) for p in ports])
        server = await asyncio.start_server(fwd.handle, "127.0.0.1", 0)
        prober = asyncio.create_task(fwd.probe_forever())
        ep = sims.endpoints[0]
        gateways = {}
        for fail_open in (True, False):
            cfg = parse_config({
                "listen": "127.0.0.1:0",
                "pool": {"endpoints": [{"name": "sim-0", "address": ep.address, "port": ep.port}]},
                "routes": [{"path": "/", "epp": {"endpoint": f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}",
                                                  "timeout_ms": 1000, "failure_mode_allow": fail_open}}],
            })  # fmt: skip
            gateways[fail_open] = await start_gateway(cfg, registry=CollectorRegistry())
        measured = {}
        try:
            for fail_open in (True, False):
                measured[fail_open] = await kill_leader(procs, ports, fwd, gateways[fail_open].url)
        finally:
            for gw in gateways.values():
                await gw.aclose(grace=1.0)
            prober.cancel()
            server.close()
            for p in procs:
                if p.returncode is None:
                    p.send_signal(signal.SIGTERM)
                await p.wait()
    for fail_open, (takeover, failover, waited, after) in measured.items():
        failed = sum(1 for s in after if s != 200)
        print(
            f"fail-{'open' if fail_open else 'closed'}: standby ready (Service switched) {takeover:.2f} s, "
            f"new leader routes {failover:.2f} s after SIGKILL; "
            f"{failed} of {len(after)} requests after the kill failed; {waited:.2f} s waiting for a CPU"
        )
        # the picker's part: Lease takeover + readiness within the 2.5 s bound plus one probe period, plus
        # what the processes involved waited for a CPU (about 0 on an idle machine, seconds at load 10)
        assert takeover is not None and takeover < 4.0 + waited
        # end to end it adds the gateway's gRPC reconnect backoff (at most 0.5 s after failed attempts)
        assert failover < 5.0 + waited
        if fail_open:
            assert failed == 0
