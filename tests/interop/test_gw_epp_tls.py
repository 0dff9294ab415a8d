"""The gateway asking a separate ``inferoute epp`` process over gRPC with TLS (a CA made in the test)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from prometheus_client import CollectorRegistry

from inferoute.gateway.app import RunningGateway, start_gateway
from inferoute.gateway.config import parse_config
from inferoute.sim import DEFAULT_MODEL, SimConfig, SimPool
from tcp_relay import relay

INFEROUTE = Path(sys.executable).parent / "inferoute"
CHAT = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@contextlib.contextmanager
def epp_process(
    tmp: Path,
    endpoints: list[Any],
    cert_dir: Path | None,
    env: dict[str, str] | None = None,
    *,
    grpc_port: int = 0,
) -> Iterator[int]:
    """``inferoute epp`` on ports the OS chooses (ext_proc on ``grpc_port`` if given); yields the ext_proc
    port its ready line states."""
    eps = tmp / "endpoints.yaml"
    eps.write_text(
        "endpoints:\n"
        + "".join(f"  - {{name: {e.name}, address: {e.address}, port: {e.port}}}\n" for e in endpoints)
    )
    log = (tmp / "epp.log").open("w+")
    proc = subprocess.Popen(
        [
            str(INFEROUTE),
            "epp",
            "--endpoints",
            str(eps),
            "--host",
            "127.0.0.1",
            *["--grpc-port", str(grpc_port), "--health-port", "0", "--metrics-port", "0"],
            *(["--cert-path", str(cert_dir)] if cert_dir else []),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while not (
            ready := re.search(r"inferoute epp ready: ext_proc :(\d+)", (tmp / "epp.log").read_text())
        ):
            assert proc.poll() is None, (tmp / "epp.log").read_text()
            assert time.monotonic() < deadline, "inferoute epp did not become ready"
            time.sleep(0.05)
        yield int(ready.group(1))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@contextlib.asynccontextmanager
async def gateway(
    pool: SimPool, epp: dict[str, Any], reg: CollectorRegistry
) -> AsyncIterator[RunningGateway]:
    cfg = parse_config(
        {
            "listen": "127.0.0.1:0",
            "pool": {
                "endpoints": [{"name": e.name, "address": e.address, "port": e.port} for e in pool.endpoints]
            },
            "routes": [{"path": "/v1/", "epp": {"timeout_ms": 3000, **epp}}],
        }
    )
    gw = await start_gateway(cfg, registry=reg)
    try:
        yield gw
    finally:
        await gw.aclose(grace=1.0)


async def test_gateway_with_remote_epp_over_tls_and_wrong_ca(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="inferoute.gateway.access")
    ca, other_ca = trustme.CA(), trustme.CA()
    cert_dir = tmp_path / "certs"
    cert_dir.mkdir()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    (cert_dir / "tls.crt").write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    (cert_dir / "tls.key").write_bytes(leaf.private_key_pem.bytes())
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    other_ca.cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
    async with await SimPool.start(SimConfig(time_scale=0.02), replicas=2) as pool:
        keys = {e.key for e in pool.endpoints}
        with epp_process(tmp_path, pool.endpoints, cert_dir) as grpc_port:
            target = f"127.0.0.1:{grpc_port}"
            good = CollectorRegistry()
            async with (
                gateway(pool, {"endpoint": target, "ca_file": str(tmp_path / "ca.pem")}, good) as gw,
                aiohttp.ClientSession() as s,
            ):
                for stream in (False, True):
                    async with s.post(gw.url + "/v1/chat/completions", json={**CHAT, "stream": stream}) as r:
                        assert r.status == 200, await r.text()
                        text = await r.text()
                        assert ("data: [DONE]" in text) is stream
            assert (
                good.get_sample_value("inferoute_gateway_requests_total", {"route": "/v1/", "code": "200"})
                == 2
            )
            assert any(f"upstream={k}" in ln for ln in caplog.messages for k in keys)

            caplog.clear()
            caplog.set_level(logging.WARNING)
            bad = CollectorRegistry()
            async with (
                gateway(pool, {"endpoint": target, "ca_file": str(tmp_path / "other-ca.pem")}, bad) as gw,
                aiohttp.ClientSession() as s,
                s.post(gw.url + "/v1/chat/completions", json=CHAT) as r,
            ):
                assert r.status == 502
                err = (await r.json())["error"]
            assert err["type"] == "bad_gateway_error"
            # the client learns the failure class, never the picker's address or TLS internals
            assert "TLS" in err["message"] and "127.0.0.1" not in err["message"]
            assert "CERTIFICATE" not in err["message"].upper()
            assert bad.get_sample_value("inferoute_gateway_errors_total", {"cause": "tls"}) == 1
            warnings = "\n".join(caplog.messages)
            # the root cause reaches the log (certificate verification), not just "unavailable"
            assert "failed (tls)" in warnings and "CERTIFICATE_VERIFY_FAILED" in warnings


async def test_ca_file_is_reloaded_when_it_changes(tmp_path: Path) -> None:
    """A gateway started with the wrong CA file recovers, without a restart, once the file is fixed."""
    from inferoute.epp.serving.server import EppServer, ServerOptions
    from inferoute.extproc.testing import RecordingPicker

    ca, other_ca = trustme.CA(), trustme.CA()
    cert_dir = tmp_path / "certs"
    cert_dir.mkdir()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    (cert_dir / "tls.crt").write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    (cert_dir / "tls.key").write_bytes(leaf.private_key_pem.bytes())
    ca_file = tmp_path / "ca.pem"
    other_ca.cert_pem.write_to_path(str(ca_file))  # wrong at first
    async with await SimPool.start(SimConfig(time_scale=0.02), replicas=1) as pool:
        picker = RecordingPicker([e.key for e in pool.endpoints])
        opts = ServerOptions(host="127.0.0.1", grpc_port=0, health_port=None, cert_path=str(cert_dir))
        server = await EppServer.start(picker, opts, CollectorRegistry())
        try:
            epp = {"endpoint": f"127.0.0.1:{server.grpc_port}", "ca_file": str(ca_file)}
            async with gateway(pool, epp, CollectorRegistry()) as gw, aiohttp.ClientSession() as s:
                async with s.post(gw.url + "/v1/chat/completions", json=CHAT) as r:
                    assert r.status == 502
                ca.cert_pem.write_to_path(str(ca_file))
                later = time.time() + 5
                os.utime(ca_file, (later, later))  # a new mtime even on coarse-grained file systems
                status = 0
                for _ in range(60):  # the channel re-checks its files about once a second
                    await asyncio.sleep(0.1)
                    async with s.post(gw.url + "/v1/chat/completions", json=CHAT) as r:
                        status = r.status
                    if status == 200:
                        break
                assert status == 200
        finally:
            await server.aclose(0)


class PickerAddress:
    """The picker's address for a gateway configured while the picker is down: a port the OS assigns to a
    socket this test holds. Until :meth:`relay_to` it only binds (connections are refused, as to a stopped
    picker, and no one else can take the port); then it listens and relays each connection, bytes as they
    are (TLS included), to the picker's own port -- which the picker bound itself (port 0, read back)."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def relay_to(self, port: int) -> None:
        async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self._writers.add(writer)
            await relay(reader, writer, port)

        self._server = await asyncio.start_server(connection, sock=self._sock)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()
        self._sock.close()


async def _gateway_url(log: Path, proc: subprocess.Popen[bytes]) -> str:
    """The gateway's URL (it was told to listen on port 0) from its start-up line."""
    deadline = time.monotonic() + 60
    while not (found := re.search(r"gateway listening on (http://\S+)", log.read_text())):  # noqa: ASYNC240
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()  # noqa: ASYNC240
        await asyncio.sleep(0.05)
    return found.group(1)


async def test_default_settings_pair_gateway_and_epp_over_verified_tls(tmp_path: Path) -> None:
    """`inferoute gateway` and `inferoute epp` with default TLS settings: the picker's self-signed certificate
    (kept in the state directory) is trusted by the gateway on the same machine -- verified, not skipped.
    While the picker is down the gateway's /readyz says not ready (fail-closed) and requests get a 502 whose
    body names the failure class only."""
    env = {**os.environ, "INFEROUTE_STATE_DIR": str(tmp_path / "state")}
    async with await SimPool.start(SimConfig(time_scale=0.02), replicas=2) as pool:
        picker = PickerAddress()
        grpc_port = picker.port
        (tmp_path / "gw.yaml").write_text(
            "listen: 127.0.0.1:0\npool:\n  endpoints:\n"
            + "".join(
                f"    - {{name: {e.name}, address: {e.address}, port: {e.port}}}\n" for e in pool.endpoints
            )
            + f"routes:\n  - path: /v1/\n    epp: {{endpoint: 127.0.0.1:{grpc_port}, timeout_ms: 3000}}\n"
        )
        gw_log = (tmp_path / "gw.log").open("w+")
        gw = subprocess.Popen(  # noqa: ASYNC220 - started once, not awaited
            [str(INFEROUTE), "gateway", "--config", str(tmp_path / "gw.yaml")],
            stdout=gw_log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            url = await _gateway_url(tmp_path / "gw.log", gw)
            async with aiohttp.ClientSession() as s:
                status = await _until(s, url + "/healthz", {200})
                async with s.get(url + "/readyz") as r:
                    assert r.status == 503, "ready while the picker is unreachable"
                async with s.post(url + "/v1/chat/completions", json=CHAT) as r:
                    assert r.status == 502
                    err = (await r.json())["error"]
                assert err["message"] == "the endpoint picker is unavailable", err
                with epp_process(tmp_path, pool.endpoints, None, env) as picker_port:
                    await picker.relay_to(picker_port)
                    status = await _until(s, url + "/readyz", {200})
                    assert status == 200, (tmp_path / "gw.log").read_text()
                    for stream in (False, True):
                        async with s.post(url + "/v1/chat/completions", json={**CHAT, "stream": stream}) as r:
                            assert r.status == 200, await r.text()
                            assert ("data: [DONE]" in await r.text()) is stream
                assert (tmp_path / "state" / "epp-tls" / "tls.crt").exists()
                assert await _until(s, url + "/readyz", {503}) == 503  # picker gone: not ready again
        finally:
            picker.close()
            gw.send_signal(signal.SIGTERM)
            gw.wait(timeout=20)
            gw_log.close()


async def _until(s: aiohttp.ClientSession, url: str, statuses: set[int], within: float = 30.0) -> int:
    deadline = time.monotonic() + within
    status = 0
    while time.monotonic() < deadline:
        try:
            async with s.get(url) as r:
                status = r.status
        except aiohttp.ClientConnectionError:
            status = 0
        if status in statuses:
            return status
        await asyncio.sleep(0.05)
    return status
