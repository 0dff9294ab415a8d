"""``inferoute gateway --workers 2``: two processes share one port (SO_REUSEPORT) and stop together."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
from test_gw_support import backends

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
        with log_path.open("w") as log:
            proc = await asyncio.create_subprocess_exec(
                *[str(INFEROUTE), "gateway", "--config", str(cfg), "--listen", "127.0.0.1:0"],
                *["--workers", "2"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            url = f"http://127.0.0.1:{await _announced_port(proc, log_path)}"
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
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
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
