"""Gateway config loading: defaults, the issue's example, clear errors, route matching."""

from __future__ import annotations

from pathlib import Path

import pytest

from inferoute.endpoints import Endpoint
from inferoute.errors import InferouteError
from inferoute.gateway.config import (
    DEFAULT_LISTEN,
    default_config,
    load_config,
    load_config_text,
    parse_config,
    parse_listen,
    target_of,
    with_listen,
)

ISSUE_EXAMPLE = """
listen: 127.0.0.1:8080
pool:
  endpoints: [{name: pod-0, address: 127.0.0.1, port: 8100}]
picker: {config_file: epp.yaml}
routes:
  - path: /v1/
    bbr: {enabled: true, header_name: X-Gateway-Model-Name, max_body_size: 10485760, default_model: unknown,
          endpoint: null, chunk_size: 65536, timeout_ms: 200, failure_mode_allow: true}
    epp: {enabled: true, endpoint: embedded, header_name: x-gateway-destination-endpoint, timeout_ms: 200,
          failure_mode_allow: false, tls: true, ca_file: null, body: full_duplex}
    default_upstream: null
"""


def test_issue_example_loads(tmp_path: Path) -> None:
    f = tmp_path / "gw.yaml"
    f.write_text(ISSUE_EXAMPLE)
    (tmp_path / "epp.yaml").write_text("")  # the files a config names must exist
    cfg = load_config(f)
    assert cfg.listen == "127.0.0.1:8080"
    assert cfg.endpoints() == [Endpoint("pod-0", "127.0.0.1", 8100)]
    assert cfg.picker.config_file == str(tmp_path / "epp.yaml")  # relative to the config file
    route = cfg.routes[0]
    assert route.bbr.max_body_size == 10485760 and route.epp.endpoint == "embedded"
    assert route.epp.body == "full_duplex" and route.epp.tls is True


def test_defaults() -> None:
    cfg = default_config([Endpoint("a", "127.0.0.1", 9000)])
    assert cfg.listen == DEFAULT_LISTEN == "127.0.0.1:8080"
    r = cfg.routes[0]
    assert r.path == "/" and r.bbr.enabled and r.bbr.header_name == "X-Gateway-Model-Name"
    assert r.bbr.default_model == "unknown" and r.bbr.max_body_size == 10 * 1024 * 1024
    assert r.epp.endpoint == "embedded" and r.epp.timeout_ms == 200 and r.epp.failure_mode_allow is False
    assert r.epp.header_name == "x-gateway-destination-endpoint"


def test_longest_prefix_wins() -> None:
    cfg = load_config_text("routes: [{path: /}, {path: /v1/}, {path: /v1/chat/}]")
    assert cfg.route_for("/v1/chat/completions").path == "/v1/chat/"  # type: ignore[union-attr]
    assert cfg.route_for("/v1/models").path == "/v1/"  # type: ignore[union-attr]
    assert cfg.route_for("/x").path == "/"  # type: ignore[union-attr]
    assert load_config_text("routes: [{path: /v1/}]").route_for("/x") is None


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("bogus: 1", "bogus"),
        ("routes: [{path: /x, bbr: {timeout_ms: fast}}]", "$.routes[0].bbr.timeout_ms"),
        ("routes: [{path: /x, epp: {body: streamed}}]", "$.routes[0].epp.body"),
        ("routes: [{path: x}]", "must start with '/'"),
        ("routes: [{path: /x}, {path: /x}]", "duplicate route"),
        ("routes: [{path: /x, epp: {endpoint: null}}]", "required when epp.enabled"),
        ("routes: [{path: /x, epp: {endpoint: 'grpc://h:1'}}]", "scheme must be http:// or https://"),
        ("routes: [{path: /x, epp: {endpoint: 'host-only'}}]", "expected host:port"),
        ("routes: [{path: /x, epp: {endpoint: '10.0.0.1:9002,epp-b:9002'}}]", "takes IP addresses"),
        ("routes: [{path: /x, epp: {endpoint: '10.0.0.1:9002,10.0.0.2'}}]", "comma list of ip:port"),
        ("routes: [{path: /x, epp: {cert_file: c.pem}}]", "cert_file and key_file go together"),
        ("routes: [{path: /x, default_upstream: nope}]", "default_upstream"),
        ("pool: {allowed_cidrs: [10.0.0.0/33]}", "allowed_cidrs[0]"),
        ("pool: {endpoints: [{address: 1.2.3.4}]}", "port"),
        ("listen: nowhere", "listen"),
        ("workers: 0", "workers"),
        ("routes: [", "invalid YAML"),
    ],
)
def test_errors_name_the_key(text: str, needle: str) -> None:
    with pytest.raises(InferouteError) as e:
        load_config_text(text)
    assert e.value.status == 500 and e.value.cause == "config"
    assert needle in e.value.message


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InferouteError) as e:
        load_config(tmp_path / "nope.yaml")
    assert "cannot read" in e.value.message


def test_listen_and_targets() -> None:
    assert parse_listen("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_listen("[::1]:8080") == ("::1", 8080)
    assert with_listen(default_config(), "0.0.0.0:9").listen == "0.0.0.0:9"
    assert target_of("https://epp:9002") == ("epp:9002", True)
    assert target_of("http://epp:9002/") == ("epp:9002", False)
    assert target_of("epp:9002") == ("epp:9002", None)
    # picker replicas: one gRPC target listing them (the channel balances over those that are up)
    assert target_of("http://10.0.0.1:9002, 10.0.0.2:9002") == ("ipv4:10.0.0.1:9002,10.0.0.2:9002", False)
    assert target_of("[::1]:1,[::1]:2") == ("ipv6:[::1]:1,[::1]:2", None)
    load_config_text("routes: [{path: /x, epp: {endpoint: 'http://127.0.0.1:1,127.0.0.1:2'}}]")


def test_the_documented_example_loads() -> None:
    import re

    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", doc, re.S)
    assert block, "docs/configuration.md lost its example"
    cfg = load_config_text(block.group(1))
    assert cfg.routes[0].path == "/v1/" and len(cfg.endpoints()) == 2


def test_app_protocol_is_http_or_h2c() -> None:
    assert parse_config({}).pool.app_protocol == "http"
    cfg = parse_config({"pool": {"app_protocol": "h2c"}})
    assert cfg.pool.app_protocol == "h2c"
    with pytest.raises(InferouteError, match=r"at `\$\.pool\.app_protocol`"):
        parse_config({"pool": {"app_protocol": "kubernetes.io/h2c"}})  # the controller translates it
    backends = [{"app_protocol": "h2", "epp": {"enabled": False}}]
    with pytest.raises(InferouteError, match=r"at `\$\.routes\[0\]\.backends\[0\]\.app_protocol`"):
        parse_config({"routes": [{"path": "/", "backends": backends}]})


def test_a_section_left_empty_takes_its_defaults() -> None:
    """``picker:`` with every key commented out is YAML null: the section's defaults, not a type error."""
    cfg = load_config_text("picker:\n  # sync_redis: redis://10.0.0.9:6379/0\nlimits:\nroutes: [{path: /}]\n")
    assert cfg.picker.sync_redis is None and cfg.picker.refresh_interval == 0.05
    with pytest.raises(InferouteError, match=r"at `\$\.listen`"):  # a value, not a section, stays required
        parse_config({"listen": None})
