"""The generated Envoy bootstrap and TLS material (pure: no sockets, no processes)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from cryptography import x509

from inferoute.epp.serving.tls import self_signed
from inferoute.integrations.envoy import bootstrap, command


def _filters(cfg: dict) -> list[dict]:  # type: ignore[type-arg]
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm["http_filters"]  # type: ignore[no-any-return]


def _cluster(cfg: dict, name: str) -> dict:  # type: ignore[type-arg]
    return next(c for c in cfg["static_resources"]["clusters"] if c["name"] == name)


def test_routes_by_metadata_and_strips_client_header_before_ext_proc() -> None:
    cfg = bootstrap("10.0.0.9:9002", 8080)
    names = [f["name"] for f in _filters(cfg)]
    assert names == [
        "envoy.filters.http.header_mutation",
        "envoy.filters.http.ext_proc",
        "envoy.filters.http.router",
    ]
    removed = [m["remove"] for m in _filters(cfg)[0]["typed_config"]["mutations"]["request_mutations"]]
    assert "x-gateway-destination-endpoint" in removed
    pool = _cluster(cfg, "inference_pool")
    assert pool["type"] == "ORIGINAL_DST"
    assert pool["original_dst_lb_config"] == {
        "metadata_key": {"key": "envoy.lb", "path": [{"key": "x-gateway-destination-endpoint"}]}
    }
    assert "use_http_header" not in json.dumps(pool)


def test_ext_proc_full_duplex_with_trailers_metadata_and_served_attribute() -> None:
    ext = _filters(bootstrap("epp:9002", 8080))[1]["typed_config"]
    mode = ext["processing_mode"]
    assert mode["request_body_mode"] == "FULL_DUPLEX_STREAMED" and mode["request_trailer_mode"] == "SEND"
    assert mode["response_body_mode"] == "FULL_DUPLEX_STREAMED" and mode["response_trailer_mode"] == "SEND"
    assert ext["metadata_options"]["receiving_namespaces"]["untyped"] == ["envoy.lb"]
    assert ext["response_attributes"] == ["upstream.address", "response.code_details"]
    assert ext["failure_mode_allow"] is False and ext["message_timeout"] == "10s"
    light = _filters(bootstrap("epp:9002", 8080, response_phase="headers"))[1]["typed_config"][
        "processing_mode"
    ]
    assert light["response_body_mode"] == "NONE" and light["response_trailer_mode"] == "SKIP"
    assert light["response_header_mode"] == "SEND"
    off = _filters(bootstrap("epp:9002", 8080, response_phase="none"))[1]["typed_config"]["processing_mode"]
    assert off["response_header_mode"] == "SKIP" and off["response_body_mode"] == "NONE"


def test_epp_cluster_http2_tls_health_checked_unless_insecure() -> None:
    epp = _cluster(bootstrap("epp.example:9002", 8080), "epp")
    assert epp["transport_socket"]["typed_config"]["common_tls_context"]["alpn_protocols"] == ["h2"]
    assert (
        epp["health_checks"][0]["grpc_health_check"]["service_name"]
        == "envoy.service.ext_proc.v3.ExternalProcessor"
    )
    opts = epp["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in opts["explicit_http_config"]
    addr = epp["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert addr == {"address": "epp.example", "port_value": 9002}
    assert "transport_socket" not in _cluster(bootstrap("epp:9002", 8080, insecure=True), "epp")


def test_command_prints_json_and_rejects_missing_port() -> None:
    result = CliRunner().invoke(
        command, ["--epp", "127.0.0.1:9002", "--listen", "8081", "--admin-port", "9901"]
    )
    assert result.exit_code == 0, result.output
    cfg = json.loads(result.stdout)  # the configuration alone on stdout
    assert cfg["admin"]["address"]["socket_address"]["port_value"] == 9901
    assert "will not verify the picker's certificate" in result.stderr  # without --epp-ca: said, not silent
    bad = CliRunner().invoke(command, ["--epp", "127.0.0.1", "--listen", "8081"])
    assert bad.exit_code != 0 and "HOST:PORT" in bad.output


@pytest.mark.parametrize("host", ["epp.internal", "10.1.2.3"])
def test_self_signed_certificate_names(host: str) -> None:
    pair = self_signed([host])
    cert = x509.load_pem_x509_certificate(pair.cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = {str(v) for v in san.get_values_for_type(x509.DNSName)} | {
        str(v) for v in san.get_values_for_type(x509.IPAddress)
    }
    assert {"localhost", "127.0.0.1", host} <= names
    assert b"PRIVATE KEY" in pair.key_pem


def test_static_endpoints_use_override_host_on_metadata_with_retries(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = bootstrap("epp:9002", 8080, endpoints=["10.0.0.1:8000", "10.0.0.2:8000"], retries=3)
    pool = _cluster(cfg, "inference_pool")
    assert pool["type"] == "STATIC"
    policy = pool["load_balancing_policy"]["policies"][0]["typed_extension_config"]
    assert policy["name"] == "envoy.load_balancing_policies.override_host"
    assert policy["typed_config"]["override_host_sources"] == [
        {"metadata": {"key": "envoy.lb", "path": [{"key": "x-gateway-destination-endpoint"}]}}
    ]
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]["retry_policy"]["num_retries"] == 3
    f = tmp_path / "eps.yaml"
    f.write_text("endpoints:\n  - {address: 10.0.0.9, port: 8001}\n")
    out = CliRunner().invoke(command, ["--epp", "e:1", "--listen", "1", "--endpoints", str(f)])
    assert out.exit_code == 0, out.output
    assert "10.0.0.9" in out.output and "override_host" in out.output
    f.write_text("endpoints:\n  - {address: 10.0.0.9}\n")
    bad = CliRunner().invoke(command, ["--epp", "e:1", "--listen", "1", "--endpoints", str(f)])
    assert bad.exit_code != 0 and "port" in bad.output
