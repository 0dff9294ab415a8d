"""Benchmark processes told their port on the command line: a port another process took in between is
detected (the answer came from someone else) and the program is started again on a new port."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from aiohttp import web

from inferoute.bench import peers
from inferoute.bench.peers import ManagedProcess, owns_ports, start_on_ports

SERVER = "import http.server, sys; http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), http.server.SimpleHTTPRequestHandler).serve_forever()"  # noqa: E501


async def test_a_port_someone_else_answers_on_is_not_taken_for_ours(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def foreign(_: web.Request) -> web.Response:
        return web.Response(text="not yours")

    app = web.Application()
    app.router.add_get("/", foreign)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    taken = runner.addresses[0][1]
    handed_out = iter([[taken]])  # the first candidate is the port another process holds
    real = peers.candidate_ports
    monkeypatch.setattr(peers, "candidate_ports", lambda n, **kw: next(handed_out, None) or real(n, **kw))
    started: list[int] = []

    def make(ports: list[int]) -> ManagedProcess:
        started.append(ports[0])
        return ManagedProcess(
            "http.server", [sys.executable, "-c", SERVER, str(ports[0])], tmp_path / "s.log"
        )

    try:
        proc, ports = await start_on_ports(make, lambda p: [f"http://127.0.0.1:{p[0]}/"])
        try:
            assert started[0] == taken and ports[0] != taken and started == [taken, ports[0]]
            assert proc.proc is not None and owns_ports(proc.proc.pid, ports)
        finally:
            await proc.stop()
    finally:
        await runner.cleanup()
