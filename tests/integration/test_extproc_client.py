"""GrpcPicker (data-plane side) against the EPP ext_proc server over real gRPC on 127.0.0.1, incl. TLS."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from prometheus_client import CollectorRegistry

from inferoute.epp.serving.server import EppServer, ServerOptions
from inferoute.errors import InferouteError
from inferoute.extproc.client import ChannelOptions, GrpcPicker
from inferoute.extproc.testing import FAIL_HEADER, REJECT_HEADER, SELECTION_HEADER, RecordingPicker
from inferoute.picking import Destination, PickerError, PickRequest, Reject

PODS = ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"]


def _request(body: bytes = b'{"model":"m","prompt":"hi"}', **headers: str) -> PickRequest:
    h = {"host": "gw", "content-type": "application/json"}
    h.update({k.replace("_", "-"): v for k, v in headers.items()})
    return PickRequest("POST", "/v1/completions", h, body, request_id="rid-7")


async def _start(picker: RecordingPicker, **kw: object) -> EppServer:
    opts = ServerOptions(host="127.0.0.1", grpc_port=0, health_port=None, **kw)  # type: ignore[arg-type]
    return await EppServer.start(picker, opts, CollectorRegistry())


@pytest.fixture
async def plain() -> AsyncIterator[tuple[EppServer, RecordingPicker]]:
    picker = RecordingPicker(PODS)
    server = await _start(picker, insecure=True)
    try:
        yield server, picker
    finally:
        await server.aclose(0)


@pytest.mark.parametrize("mode", ["full_duplex", "buffered", "headers_only"])
async def test_round_trip_and_response_phase(plain, mode) -> None:  # type: ignore[no-untyped-def]
    server, picker = plain
    registry = CollectorRegistry()
    client = GrpcPicker(
        ChannelOptions(f"127.0.0.1:{server.grpc_port}", tls=False),
        timeout_ms=5000,
        body_mode=mode,
        registry=registry,
    )
    try:
        body = json.dumps({"model": "m", "prompt": "p" * 300_000}).encode()  # several chunks
        decision, session = await client.pick(_request(body, **{SELECTION_HEADER: "10.0.0.2,10.0.0.3"}))
        assert isinstance(decision, Destination)
        assert decision.endpoints == ("10.0.0.2:8000", "10.0.0.3:8000")
        assert decision.body is None  # the picker did not change it (full duplex echo compared equal)
        seen = picker.sessions[-1]
        assert seen.request.request_id == "rid-7" and seen.request.path == "/v1/completions"
        assert seen.request.body == (b"" if mode == "headers_only" else body)
        session.response_started("10.0.0.2:8000", 200, {"content-type": "text/event-stream"})
        session.response_chunk(b"data: a\n\n")
        session.response_chunk(b"data: [DONE]\n\n")
        session.response_finished()
        await asyncio.wait_for(seen.ended.wait(), 10)
        assert seen.finished and seen.served == "10.0.0.2:8000" and seen.status == 200
        assert seen.chunks == [b"data: a\n\n", b"data: [DONE]\n\n"]
        assert (
            registry.get_sample_value("inferoute_picker_client_requests_total", {"outcome": "destination"})
            == 1
        )
    finally:
        await client.aclose()


async def test_concurrent_picks_share_one_channel(plain) -> None:  # type: ignore[no-untyped-def]
    server, picker = plain
    client = GrpcPicker(ChannelOptions(f"127.0.0.1:{server.grpc_port}", tls=False), timeout_ms=10_000)
    try:
        results = await asyncio.gather(*(client.pick(_request()) for _ in range(50)))
        assert all(isinstance(d, Destination) and d.endpoints[0] in PODS for d, _ in results)
        for _, s in results:
            s.aborted("test")
        await asyncio.wait_for(asyncio.gather(*(log.ended.wait() for log in picker.sessions)), 10)
        assert all(log.aborted for log in picker.sessions)
        assert client._channel.generation == 0  # one channel for all picks
    finally:
        await client.aclose()


async def test_subset_hint_and_reject(plain) -> None:  # type: ignore[no-untyped-def]
    server, _ = plain
    client = GrpcPicker(ChannelOptions(f"127.0.0.1:{server.grpc_port}", tls=False), timeout_ms=5000)
    try:
        req = _request()
        req.subset = ("10.0.0.3",)
        decision, _ = await client.pick(req)
        assert isinstance(decision, Destination) and decision.endpoints == ("10.0.0.3:8000",)
        req.subset = ()
        decision, session = await client.pick(req)
        assert isinstance(decision, Reject) and decision.status == 503
        assert json.loads(decision.body)["error"]["code"] == 503
        assert decision.headers["content-type"] == "application/json"
        session.response_finished()  # ending the session of a Reject is allowed and harmless
        decision, _ = await client.pick(_request(**{REJECT_HEADER: "429"}))
        assert isinstance(decision, Reject) and decision.status == 429
    finally:
        await client.aclose()


async def test_picker_failure_and_timeout_and_unavailable(plain, refused_port) -> None:  # type: ignore[no-untyped-def]
    server, picker = plain
    client = GrpcPicker(ChannelOptions(f"127.0.0.1:{server.grpc_port}", tls=False), timeout_ms=300)
    try:
        with pytest.raises(PickerError) as info:
            await client.pick(_request(**{FAIL_HEADER: "1"}))
        assert info.value.cause == "unavailable" and "test picker asked to fail" in str(info.value)
        picker.delay = 2.0
        with pytest.raises(PickerError) as info:
            await client.pick(_request())
        assert info.value.timeout and info.value.cause == "timeout"
    finally:
        await client.aclose()
    down = GrpcPicker(ChannelOptions(f"127.0.0.1:{refused_port()}", tls=False), timeout_ms=3000)
    try:
        with pytest.raises(PickerError) as info:
            await down.pick(_request())
        assert info.value.cause == "unavailable" and not info.value.timeout
        assert "127.0.0.1" in str(info.value)
    finally:
        await down.aclose()


def _write_pair(d: Path, cert: trustme.LeafCert) -> None:
    d.mkdir(exist_ok=True)
    (d / "tls.crt").write_bytes(cert.cert_chain_pems[0].bytes())
    (d / "tls.key").write_bytes(cert.private_key_pem.bytes())


async def test_tls_with_test_ca_and_wrong_ca_fails_clearly(tmp_path: Path) -> None:
    ca, other_ca = trustme.CA(), trustme.CA()
    _write_pair(tmp_path / "srv", ca.issue_cert("localhost", "127.0.0.1"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    other_ca.cert_pem.write_to_path(str(tmp_path / "other.pem"))
    server = await _start(RecordingPicker(PODS), cert_path=str(tmp_path / "srv"))
    target = f"127.0.0.1:{server.grpc_port}"
    good = GrpcPicker(ChannelOptions(target, ca_file=str(tmp_path / "ca.pem")), timeout_ms=5000)
    bad = GrpcPicker(ChannelOptions(target, ca_file=str(tmp_path / "other.pem")), timeout_ms=5000)
    plaintext = GrpcPicker(ChannelOptions(target, tls=False), timeout_ms=3000)
    try:
        decision, _ = await good.pick(_request())
        assert isinstance(decision, Destination)
        with pytest.raises(PickerError) as info:
            await bad.pick(_request())
        assert info.value.cause == "tls", info.value
        assert "CERTIFICATE_VERIFY_FAILED" in str(info.value).upper() or "verify" in str(info.value).lower()
        with pytest.raises(PickerError) as info:
            await plaintext.pick(_request())
        assert not info.value.timeout
    finally:
        for c in (good, bad, plaintext):
            await c.aclose()
        await server.aclose(0)


async def test_client_cert_and_reload_of_ca_file(tmp_path: Path) -> None:
    ca, other_ca = trustme.CA(), trustme.CA()
    _write_pair(tmp_path / "srv", ca.issue_cert("localhost", "127.0.0.1"))
    client_cert = ca.issue_cert("gateway.test")
    client_cert.cert_chain_pems[0].write_to_path(str(tmp_path / "client.crt"))
    client_cert.private_key_pem.write_to_path(str(tmp_path / "client.key"))
    ca_file = tmp_path / "ca.pem"
    other_ca.cert_pem.write_to_path(str(ca_file))  # wrong at first
    server = await _start(RecordingPicker(PODS), cert_path=str(tmp_path / "srv"))
    opts = ChannelOptions(
        f"127.0.0.1:{server.grpc_port}",
        ca_file=str(ca_file),
        cert_file=str(tmp_path / "client.crt"),
        key_file=str(tmp_path / "client.key"),
        server_name="localhost",
    )
    client = GrpcPicker(opts, timeout_ms=5000, tls_reload_interval=0.0)  # check files on every pick
    try:
        with pytest.raises(PickerError) as info:
            await client.pick(_request())
        assert info.value.cause == "tls"
        ca.cert_pem.write_to_path(str(ca_file))
        st = os.stat(ca_file)
        os.utime(ca_file, (st.st_atime, st.st_mtime + 5))  # make the change visible even on coarse clocks
        decision, _ = await client.pick(_request())
        assert isinstance(decision, Destination)
        assert client._channel.generation == 1
    finally:
        await client.aclose()
        await server.aclose(0)


async def test_self_signed_default_serves_tls(tmp_path: Path) -> None:
    """No cert path and not insecure: the server answers a TLS handshake with a self-signed certificate (a
    test that could pass with nothing listening would only check that plaintext fails)."""
    server = await _start(RecordingPicker(PODS))
    plaintext = GrpcPicker(ChannelOptions(f"127.0.0.1:{server.grpc_port}", tls=False), timeout_ms=3000)
    try:
        pem = await asyncio.to_thread(ssl.get_server_certificate, ("127.0.0.1", server.grpc_port), timeout=10)
        cert = x509.load_pem_x509_certificate(pem.encode())
        assert cert.issuer == cert.subject  # self-signed
        with pytest.raises(PickerError):
            await plaintext.pick(_request())
    finally:
        await plaintext.aclose()
        await server.aclose(0)


@pytest.mark.parametrize("transport", ["h2", "grpcio"])
async def test_server_reloads_its_certificate_when_the_files_change(tmp_path: Path, transport: str) -> None:
    first, second = trustme.CA(), trustme.CA()
    srv = tmp_path / "srv"
    _write_pair(srv, first.issue_cert("localhost", "127.0.0.1"))
    first.cert_pem.write_to_path(str(tmp_path / "first.pem"))
    second.cert_pem.write_to_path(str(tmp_path / "second.pem"))
    server = await _start(RecordingPicker(PODS), cert_path=str(srv), transport=transport)
    target = f"127.0.0.1:{server.grpc_port}"
    old = GrpcPicker(ChannelOptions(target, ca_file=str(tmp_path / "first.pem")), timeout_ms=5000)
    new = GrpcPicker(ChannelOptions(target, ca_file=str(tmp_path / "second.pem")), timeout_ms=5000)
    try:
        assert isinstance((await old.pick(_request()))[0], Destination)
        with pytest.raises(PickerError) as info:
            await new.pick(_request())
        assert info.value.cause == "tls"
        _write_pair(srv, second.issue_cert("localhost", "127.0.0.1"))  # rotate (e.g. a renewed secret)
        for f in ("tls.crt", "tls.key"):
            st = os.stat(srv / f)
            os.utime(srv / f, (st.st_atime, st.st_mtime + 5))
        await new.aclose()
        new = GrpcPicker(ChannelOptions(target, ca_file=str(tmp_path / "second.pem")), timeout_ms=5000)
        assert isinstance((await new.pick(_request()))[0], Destination)  # new handshakes use the new cert
    finally:
        await old.aclose()
        await new.aclose()
        await server.aclose(0)


async def test_server_requires_client_certificates_with_client_ca(tmp_path: Path) -> None:
    """``--client-ca``: a client without a certificate, or with one from another CA, cannot reach the picker;
    one signed by the configured CA can."""
    server_ca, client_ca, rogue_ca = trustme.CA(), trustme.CA(), trustme.CA()
    srv = tmp_path / "srv"
    _write_pair(srv, server_ca.issue_cert("localhost", "127.0.0.1"))
    server_ca.cert_pem.write_to_path(str(tmp_path / "server-ca.pem"))
    client_ca.cert_pem.write_to_path(str(tmp_path / "client-ca.pem"))
    for name, ca in (("good", client_ca), ("rogue", rogue_ca)):
        leaf = ca.issue_cert("gateway.example")
        leaf.cert_chain_pems[0].write_to_path(str(tmp_path / f"{name}.crt"))
        leaf.private_key_pem.write_to_path(str(tmp_path / f"{name}.key"))
    server = await _start(
        RecordingPicker(PODS), cert_path=str(srv), client_ca=str(tmp_path / "client-ca.pem")
    )
    target = f"127.0.0.1:{server.grpc_port}"

    def picker(cert: str | None) -> GrpcPicker:
        files = {"cert_file": str(tmp_path / f"{cert}.crt"), "key_file": str(tmp_path / f"{cert}.key")}
        opts = ChannelOptions(target, ca_file=str(tmp_path / "server-ca.pem"), **(files if cert else {}))
        return GrpcPicker(opts, timeout_ms=5000)

    pickers = [picker("good"), picker(None), picker("rogue")]
    try:
        assert isinstance((await pickers[0].pick(_request()))[0], Destination)
        for refused in pickers[1:]:
            with pytest.raises(PickerError):
                await refused.pick(_request())
    finally:
        for p in pickers:
            await p.aclose()
        await server.aclose(0)


@pytest.mark.parametrize(
    ("transport", "client_ca", "needle"),
    [("carrier-pigeon", None, "choose one of h2, grpcio"), ("grpcio", "ca.pem", "need the h2 transport")],
)
async def test_server_option_errors_are_clear(transport: str, client_ca: str | None, needle: str) -> None:
    with pytest.raises(InferouteError) as info:
        await _start(RecordingPicker(PODS), insecure=False, transport=transport, client_ca=client_ca)
    assert info.value.cause == "config" and needle in info.value.message
