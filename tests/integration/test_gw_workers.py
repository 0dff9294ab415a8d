"""``inferoute gateway --workers 2``: two processes share one port (SO_REUSEPORT) and stop together."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from test_gw_support import backends

from inferoute.sim import DEFAULT_MODEL, SimConfig, SimPool
from inferoute.sim.server import POD_HEADER

INFEROUTE = Path(sys.executable).parent / "inferoute"


def _chat_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if "inferoute.gateway.access" in ln and "/v1/chat/" in ln]


async def _announced_port(proc: asyncio.subprocess.Process, log_path: Path) -> int:
    """The port the parent resolved ``:0`` to, from its start-up line."""
    deadline = time.monotonic() + 60
    while True:
        text = log_path.read_text()  # noqa: ASYNC240 (a small local file)
        found = re.search(r"listening on http://127\.0\.0\.1:(\d+) with 2 workers", text)
        if found:
            return int(found.group(1))
        assert proc.returncode is None and time.monotonic() < deadline, text
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def _two_workers(cfg: Path, log_path: Path) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """``inferoute gateway --config cfg --workers 2`` on a free port, logging to ``log_path``; yields it and
    its URL, then stops it with SIGTERM, which must end it with status 0 (killed if the test failed first)."""
    with log_path.open("w") as log:
        proc = await asyncio.create_subprocess_exec(
            *[str(INFEROUTE), "gateway", "--config", str(cfg), "--listen", "127.0.0.1:0"],
            *["--workers", "2"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc, f"http://127.0.0.1:{await _announced_port(proc, log_path)}"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_two_workers_share_the_port_and_stop_cleanly(tmp_path: Path) -> None:
    async with backends("a", "b") as (a, b):
        cfg = tmp_path / "gw.yaml"
        cfg.write_text(
            "pool:\n  endpoints:\n"
            f"    - {{name: a, address: 127.0.0.1, port: {a.port}}}\n"
            f"    - {{name: b, address: 127.0.0.1, port: {b.port}}}\n"
            "routes:\n  - {path: /, epp: {enabled: false}}\n"
        )
        log_path = tmp_path / "gw.log"
        async with _two_workers(cfg, log_path) as (proc, url):
            deadline = time.monotonic() + 60
            sent = 0
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
                # new connections until both workers have answered one (each starts in its own time) ...
                while not all(
                    any(f"gateway-worker-{w}" in ln for ln in _chat_lines(log_path.read_text()))
                    for w in (0, 1)
                ):
                    assert proc.returncode is None and time.monotonic() < deadline, log_path.read_text()
                    try:
                        async with s.post(url + "/v1/chat/completions", json={"model": "warm"}) as r:
                            assert r.status == 200
                            sent += 1
                    except aiohttp.ClientConnectionError:
                        await asyncio.sleep(0.05)  # no worker listens yet
                # ... then every request is answered
                for i in range(40):
                    async with s.post(url + "/v1/chat/completions", json={"model": f"m{i}"}) as r:
                        assert r.status == 200
        text = log_path.read_text()
    access = _chat_lines(text)
    assert len(access) == sent + 40
    assert any("gateway-worker-0" in ln for ln in access) and any("gateway-worker-1" in ln for ln in access)
    assert len(a.requests) + len(b.requests) == sent + 40 and a.requests and b.requests
    pids = re.search(r"with 2 workers \(pids (\d+),(\d+)\)", text)
    assert pids, text
    for pid in map(int, pids.groups()):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        raise AssertionError(f"worker {pid} still running")
    assert "Traceback" not in text


def _segments() -> set[Path]:
    return set(Path("/dev/shm").glob("inferoute-epp-sync-*"))


async def test_two_workers_embedded_pickers_share_what_they_learn(tmp_path: Path) -> None:
    """Each worker runs its own embedded picker; they share in-flight load and prefix placements through a
    shared-memory segment, so a document is routed to the same simulator whichever worker takes it. The
    segment is unlinked once both workers have it mapped (nothing left in /dev/shm, even after a SIGKILL)."""
    before = _segments()
    async with await SimPool.start(SimConfig(time_scale=0.02), replicas=3) as sims:
        eps = "".join(
            f"    - {{name: {e.name}, address: {e.address}, port: {e.port}}}\n" for e in sims.endpoints
        )
        cfg = tmp_path / "gw.yaml"
        cfg.write_text(
            f"pool:\n  endpoints:\n{eps}picker: {{refresh_interval: 0.02, sync_interval: 0.05}}\n"
            "routes:\n  - {path: /, epp: {endpoint: embedded}}\n"
        )
        log_path = tmp_path / "gw.log"
        async with _two_workers(cfg, log_path) as (_proc, url):
            pods: dict[int, list[str]] = {}
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:

                async def ask(doc: int, n: int) -> str:
                    text = f"Manual {doc}: the quick brown fox jumps over the lazy dog. " * 40 + f"Q{n}?"
                    body = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": text}]}
                    async with s.post(url + "/v1/chat/completions", json={**body, "max_tokens": 2}) as r:
                        assert r.status == 200, await r.text()
                        return r.headers[POD_HEADER]

                deadline = time.monotonic() + 60
                while not all(f"gateway-worker-{w}" in log_path.read_text() for w in (0, 1)):
                    assert time.monotonic() < deadline, log_path.read_text()
                    try:
                        await ask(99, 0)  # until both workers are up (each starts in its own time)
                    except aiohttp.ClientConnectionError:
                        await asyncio.sleep(0.05)
                # no pause for the workers' first scrapes: a picker keys placements as it will after them
                for doc in range(8):
                    pods[doc] = [await ask(doc, 0)]
                await asyncio.sleep(0.5)  # ten exchanges
                for doc in range(8):
                    pods[doc] += [await ask(doc, n) for n in range(1, 6)]  # new connections: both workers
            segments = _segments() - before
    access = _chat_lines(log_path.read_text())
    assert any("gateway-worker-0" in ln for ln in access) and any("gateway-worker-1" in ln for ln in access)
    assert all(len(set(p)) == 1 for p in pods.values()), pods  # one simulator per document, either worker
    assert len({p[0] for p in pods.values()}) > 1  # spread by the tie-break: the index decided, not a tie
    assert segments == set()  # unlinked once both workers mapped it
