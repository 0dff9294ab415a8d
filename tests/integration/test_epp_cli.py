"""``inferoute epp`` as a real process: TLS serving from --cert-path, health, a pick, /metrics, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from pathlib import Path

import aiohttp
import grpc
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inferoute.extproc.client import ChannelOptions, GrpcPicker
from inferoute.picking import Destination, PickRequest
from inferoute.sim import SimConfig, SimPool


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


async def _announced_ports(proc: asyncio.subprocess.Process, log: Path) -> tuple[int, int, int]:
    """ext_proc, health and metrics ports as the ready line states them (all were 0 on the command line)."""
    for _ in range(600):
        assert proc.returncode is None, f"inferoute epp exited ({proc.returncode}): {_tail(log)}"
        found = re.search(r"ready: ext_proc :(\d+), health :(\d+), metrics :(\d+)", _tail(log))
        if found:
            grpc_port, health_port, metrics_port = map(int, found.groups())
            assert 0 not in (grpc_port, health_port, metrics_port), found.group(0)
            return grpc_port, health_port, metrics_port
        await asyncio.sleep(0.1)
    raise AssertionError("inferoute epp never said it was ready; log tail:\n" + _tail(log))


async def _serving(port: int, proc: asyncio.subprocess.Process, log: Path) -> None:
    for _ in range(300):
        assert proc.returncode is None, f"inferoute epp exited ({proc.returncode}): {_tail(log)}"
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                resp = await health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=1
                )
            if resp.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError("inferoute epp never became ready; log tail:\n" + _tail(log))


async def test_epp_command_serves_tls_health_metrics_and_stops_on_sigterm(tmp_path: Path) -> None:
    ca = trustme.CA()
    certs = tmp_path / "certs"
    certs.mkdir()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    (certs / "tls.crt").write_bytes(leaf.cert_chain_pems[0].bytes())
    (certs / "tls.key").write_bytes(leaf.private_key_pem.bytes())
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    pool = await SimPool.start(SimConfig(time_scale=0.05), replicas=2, host="127.0.0.1", base_port=0)
    eps = [{"name": e.name, "address": e.address, "port": e.port} for e in pool.endpoints]
    (tmp_path / "endpoints.yaml").write_text(json.dumps({"endpoints": eps}))  # JSON is YAML
    log_file = (tmp_path / "epp.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "inferoute",
        "epp",
        "--endpoints",
        str(tmp_path / "endpoints.yaml"),
        "--profile",
        "round-robin",
        "--host",
        "127.0.0.1",
        *["--grpc-port", "0", "--health-port", "0", "--metrics-port", "0"],
        "--cert-path",
        str(certs),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=log_file,  # a file, not a pipe nobody reads: a chatty log must not block the process
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    client = None
    try:
        grpc_port, health_port, metrics_port = await _announced_ports(proc, tmp_path / "epp.log")
        client = GrpcPicker(
            ChannelOptions(f"127.0.0.1:{grpc_port}", ca_file=str(tmp_path / "ca.pem")), timeout_ms=5000
        )
        await _serving(health_port, proc, tmp_path / "epp.log")
        body = json.dumps({"model": SimConfig().model, "prompt": "hi"}).encode()
        seen = set()
        for _ in range(4):
            decision, session = await client.pick(PickRequest("POST", "/v1/completions", {"host": "x"}, body))
            assert isinstance(decision, Destination)
            seen.add(decision.endpoints[0])
            session.response_started(decision.endpoints[0], 200, {})
            session.response_finished()
        assert seen == {e.key for e in pool.endpoints}  # round robin over both replicas
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{metrics_port}/metrics") as r:
            text = await r.text()
        assert "inferoute_extproc_streams_total 4.0" in text
        assert 'inferoute_extproc_decisions_total{outcome="destination"} 4.0' in text
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if client is not None:
            await client.aclose()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await pool.aclose()
        log_file.close()


async def test_epp_command_rejects_conflicting_tls_flags(tmp_path: Path) -> None:
    (tmp_path / "e.yaml").write_text("endpoints: []\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "inferoute",
        "epp",
        "--endpoints",
        str(tmp_path / "e.yaml"),
        "--insecure-serving",
        "--cert-path",
        str(tmp_path),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2
    assert b"mutually exclusive" in err
