"""Real Envoy verifying `inferoute epp`'s self-signed certificate with `envoy-config --epp-ca`: the right
certificate routes, a different one never reaches the picker (the reply is the JSON picker-failure error)."""

from __future__ import annotations

from pathlib import Path

import aiohttp
from prometheus_client import CollectorRegistry
from test_envoy_extproc import Backends, _payload, backends  # noqa: F401 - the fixture

from inferoute.epp.serving.server import EppServer, ServerOptions
from inferoute.epp.serving.tls import ensure_local_cert
from inferoute.extproc.testing import RecordingPicker
from inferoute.integrations.envoy import PICKER_FAILED, EnvoyProcess, bootstrap


async def test_envoy_verifies_the_picker_against_epp_ca(tmp_path: Path, backends: Backends) -> None:  # noqa: F811
    served = ensure_local_cert(tmp_path / "served")
    other = ensure_local_cert(tmp_path / "other")
    picker = RecordingPicker(backends.endpoints)
    epp = await EppServer.start(
        picker,
        ServerOptions(host="127.0.0.1", grpc_port=0, health_port=None, cert_path=str(served)),
        CollectorRegistry(),
    )
    try:
        for ca, expected in ((served, 200), (other, 500)):
            cfg = bootstrap(
                f"127.0.0.1:{epp.grpc_port}",
                0,
                admin_port=0,
                listen_address="127.0.0.1",
                epp_ca=str(ca / "tls.crt"),
                health_check_interval=0.5,
            )
            workdir = tmp_path / f"envoy-{expected}"
            workdir.mkdir()
            envoy = await EnvoyProcess.start(cfg, str(workdir))
            try:
                await envoy.wait_ready(30, epp_healthy=expected == 200)
                listen = await envoy.listener_port()
                async with (
                    aiohttp.ClientSession() as http,
                    http.post(f"http://127.0.0.1:{listen}/v1/completions", data=_payload()) as r,
                ):
                    assert r.status == expected, await r.text()
                    if expected == 500:
                        assert (await r.json())["error"]["message"] == PICKER_FAILED
            finally:
                await envoy.aclose()
    finally:
        await epp.aclose(0)
    assert len(picker.sessions) == 1  # only the verified Envoy reached the picker
