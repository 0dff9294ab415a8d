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
from typing import Any

import aiohttp
from test_gw_support import backends

INFEROUTE = Path(sys.executable).parent / "inferoute"


async def test_two_workers_share_the_port_and_stop_cleanly(tmp_path: Path, free_port: Any) -> None:
    async with backends("a", "b") as (a, b):
        cfg = tmp_path / "gw.yaml"
        cfg.write_text(
            "pool:\n  endpoints:\n"
            f"    - {{name: a, address: 127.0.0.1, port: {a.port}}}\n"
            f"    - {{name: b, address: 127.0.0.1, port: {b.port}}}\n"
            "routes:\n  - {path: /, epp: {enabled: false}}\n"
        )
        port = free_port()
        log_path = tmp_path / "gw.log"
        with log_path.open("w") as log:
            proc = await asyncio.create_subprocess_exec(
                *[str(INFEROUTE), "gateway", "--config", str(cfg), "--listen", f"127.0.0.1:{port}"],
                *["--workers", "2"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
                while True:
                    assert proc.returncode is None, log_path.read_text()
                    try:
                        async with s.get(url + "/healthz") as r:
                            if r.status == 200:
                                break
                    except aiohttp.ClientConnectionError:
                        pass
                    assert time.monotonic() < deadline, log_path.read_text()
                    await asyncio.sleep(0.1)
                # both workers must be listening before we count who answers
                await asyncio.sleep(1.0)
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
    access = [ln for ln in text.splitlines() if "inferoute.gateway.access" in ln]
    assert len(access) == 40
    assert any("gateway-worker-0" in ln for ln in access) and any("gateway-worker-1" in ln for ln in access)
    assert len(a.requests) + len(b.requests) == 40 and a.requests and b.requests
    pids = re.search(r"with 2 workers \(pids (\d+),(\d+)\)", text)
    assert pids, text
    for pid in map(int, pids.groups()):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        raise AssertionError(f"worker {pid} still running")
    assert "Traceback" not in text
