"""``inferoute epp --workers 2`` as a real program: one ext_proc port served by two processes, both converging
on the same precise prefix index from the simulators' KV events, one shared-memory segment, one metrics
endpoint labelling each worker's series, and workers that die with their parent."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yaml
from test_sim_kvevents_zmq import CFG

from inferoute.bench.peers import listening_ports
from inferoute.endpoints import Endpoint
from inferoute.extproc.channel import ChannelOptions
from inferoute.extproc.client import GrpcPicker
from inferoute.picking import Destination, PickRequest
from inferoute.sim import DEFAULT_MODEL, SimPool

READY = re.compile(
    rb"inferoute epp ready: ext_proc :(\d+), health :(\d+), metrics :(\d+)"
    rb"(?: \((\d+) workers, pids ([\d,]+)\))?"
)


def endpoints_file(path: Path, eps: list[Endpoint]) -> Path:
    doc = [{"name": e.name, "address": e.address, "port": e.port, "labels": dict(e.labels)} for e in eps]
    path.write_text(yaml.safe_dump({"endpoints": doc}))
    return path


class Epp:
    def __init__(self, proc: asyncio.subprocess.Process, log: Path, match: re.Match[bytes]) -> None:
        self.proc, self.log = proc, log
        self.grpc_port, self.health_port, self.metrics_port = (int(match[i]) for i in (1, 2, 3))
        self.pids = [int(p) for p in match[5].split(b",")] if match[5] else [proc.pid]


async def start_epp(tmp: Path, eps: list[Endpoint], *extra: str, name: str = "epp") -> Epp:
    log = tmp / f"{name}.log"
    args = ["--profile", "precise", "--endpoints", str(endpoints_file(tmp / f"{name}-endpoints.yaml", eps))]
    args += ["--insecure-serving", "--host", "127.0.0.1", "--grpc-port", "0", "--health-port", "0"]
    args += ["--metrics-port", "0", "--grace", "0.5", *extra]
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "inferoute", "epp", *args, stdout=out, stderr=out
        )
    async with asyncio.timeout(60):
        while not (m := READY.search(log.read_bytes())):
            if proc.returncode is not None:
                raise AssertionError(log.read_text())
            await asyncio.sleep(0.05)
    return Epp(proc, log, m)


@pytest.fixture
async def sims() -> AsyncIterator[SimPool]:
    async with await SimPool.start(CFG, replicas=3) as pool:
        yield pool


def ask(doc: str) -> PickRequest:
    body = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": doc + " Question?"}]}
    return PickRequest("POST", "/v1/chat/completions", {}, json.dumps(body).encode())


async def decide_on_new_connection(port: int, request: PickRequest) -> str:
    """One decision over a fresh gRPC connection (the kernel hands each connection to one worker)."""
    picker = GrpcPicker(ChannelOptions(f"127.0.0.1:{port}", tls=False), timeout_ms=2000)
    try:
        decision, session = await picker.pick(request)
        assert isinstance(decision, Destination)
        session.aborted("test")
        return decision.endpoints[0]
    finally:
        await picker.aclose()


async def worker_streams(http: aiohttp.ClientSession, port: int) -> dict[str, float]:
    async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.text()
    found = re.findall(r'inferoute_extproc_streams_total\{worker="(\d+)"\} ([\d.e+]+)', text)
    return {w: float(v) for w, v in found}


async def test_two_workers_one_port_same_precise_index_die_with_parent(sims: SimPool, tmp_path: Path) -> None:
    epp = await start_epp(tmp_path, sims.endpoints, "--workers", "2")
    try:
        assert len(epp.pids) == 2 and epp.proc.pid not in epp.pids
        for pid in epp.pids:  # one port, two listening processes
            assert epp.grpc_port in listening_ports(pid), epp.log.read_text()
            assert _maps_the_unlinked_segment(pid)
        doc = "Reference manual of the quick brown fox. " * 60
        async with aiohttp.ClientSession() as http:
            # another router sends the document to replica 2: only the KV events can tell the workers
            body = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": doc}], "max_tokens": 2}
            async with http.post(sims.urls[2] + "/v1/chat/completions", json=body) as r:
                assert r.status == 200
            key2 = sims.endpoints[2].key
            decisions: list[str] = []
            async with asyncio.timeout(20):
                while (
                    True
                ):  # until every connection of a round is routed by the index, and both workers served
                    decisions = [await decide_on_new_connection(epp.grpc_port, ask(doc)) for _ in range(6)]
                    streams = await worker_streams(http, epp.metrics_port)
                    if set(decisions) == {key2} and len(streams) == 2 and min(streams.values()) > 0:
                        break
            async with http.get(f"http://127.0.0.1:{epp.metrics_port}/readyz") as r:
                assert r.status == 200
        os.kill(epp.proc.pid, signal.SIGKILL)  # the parent dies without a word: the workers follow
        await epp.proc.wait()
        async with asyncio.timeout(10):
            while any(_alive(pid) for pid in epp.pids):  # noqa: ASYNC110 - polling another process
                await asyncio.sleep(0.05)
    finally:
        if epp.proc.returncode is None:
            epp.proc.kill()
            await epp.proc.wait()


def _maps_the_unlinked_segment(pid: int) -> bool:
    """The worker maps the shared-memory segment, which the parent already unlinked."""
    with open(f"/proc/{pid}/maps") as f:
        return any("inferoute-epp-sync-" in line and "(deleted)" in line for line in f)


def _alive(pid: int) -> bool:
    """Not a zombie (a reaped or never-reaped dead worker does not serve)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def test_sigterm_stops_every_worker_cleanly(sims: SimPool, tmp_path: Path) -> None:
    epp = await start_epp(tmp_path, sims.endpoints[:1], "--workers", "2")
    epp.proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(15):
        assert await epp.proc.wait() == 0
    assert not any(_alive(pid) for pid in epp.pids)


async def test_a_worker_that_dies_stops_the_others_and_the_parent_fails(
    sims: SimPool, tmp_path: Path
) -> None:
    epp = await start_epp(tmp_path, sims.endpoints[:1], "--workers", "2")
    os.kill(epp.pids[0], signal.SIGKILL)
    async with asyncio.timeout(15):
        assert await epp.proc.wait() == 128 + signal.SIGKILL  # the dead worker's status, not a clean 0
    assert not _alive(epp.pids[1])
    assert "epp-worker-0 exited (status -9): stopping the other workers" in epp.log.read_text()
