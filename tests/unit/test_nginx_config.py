"""``inferoute nginx-config``: the generated text (pure; ``nginx -t`` runs in interop tests)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from inferoute.integrations.nginx import NginxOptions, config_command, options_from_gateway_config, render


def block(conf: str, header: str) -> str:
    """The text of the ``header { ... }`` block (balanced braces)."""
    start = conf.index(header + " {")
    depth = 0
    for i in range(start, len(conf)):
        if conf[i] == "{":
            depth += 1
        elif conf[i] == "}":
            depth -= 1
            if depth == 0:
                return conf[start : i + 1]
    raise AssertionError(f"unbalanced block {header}")


def test_default_config_has_every_piece_in_order() -> None:
    conf = render(NginxOptions())
    assert conf.count("{") == conf.count("}")
    decider = block(conf, "location /v1/")
    assert "proxy_pass http://inferoute_decider;" in decider
    assert "proxy_request_buffering on;" in decider
    assert "error_page 502 504 = @inference_decider_unavailable;" in decider
    assert "client_max_body_size 10485760;" in conf  # the gateway's bbr.max_body_size default
    upstream = block(conf, "upstream inferoute_decider")
    assert "server 127.0.0.1:8081;" in upstream and "keepalive 64;" in upstream
    inference = block(conf, "location @inference")
    # the decider's headers are captured BEFORE proxy_pass replaces $upstream_http_*
    capture = inference.index("set $inference_upstream $upstream_http_x_inference_upstream;")
    assert capture < inference.index("proxy_pass http://$inference_upstream;")
    assert "set $inference_model $upstream_http_x_inference_model;" in inference
    assert "proxy_set_header X-Gateway-Model-Name $inference_model;" in inference
    assert "proxy_set_header X-Gateway-Destination-Endpoint $inference_upstream;" in inference
    assert 'proxy_set_header X-Inference-Upstream "";' in inference
    assert "proxy_buffering off;" in inference
    assert "post_action @inference_done;" in inference
    # no fallback: the model server's own errors pass through, NGINX's own 502/504 become JSON
    assert "proxy_intercept_errors off;" in inference
    assert "error_page 502 @inference_upstream_502;" in inference
    retry = block(conf, "location @inference_retry")
    assert "proxy_intercept_errors on;" in retry
    assert "error_page 500 502 503 = @inference_fallback_1_last;" in retry
    assert "set $inference_upstream $upstream_http_x_inference_upstream;" in retry
    last = block(conf, "location @inference_fallback_1_last")
    assert "set $inference_upstream $inference_fallback_1;" in last and "proxy_intercept_errors off;" in last
    assert "@inference_fallback_1_more" not in conf and "@inference_fallback_2" not in conf
    assert "proxy_set_header X-Inference-Retries 1;" in decider
    done = block(conf, "location @inference_done")
    assert "proxy_pass_request_body off;" in done and "rewrite ^ /_inferoute/done break;" in done
    log_format = conf[conf.index("log_format inference") : conf.index("access_log")]
    assert "$inference_upstream" in log_format and "$inference_model" in log_format
    assert "access_log /var/log/nginx/inference.log inference;" in conf
    assert "pid " not in conf  # not self-contained: the distribution's paths


def test_error_bodies_are_openai_json() -> None:
    conf = render(NginxOptions(retries=2))
    bodies = re.findall(r"return (\d{3}) '(\{.*?\})';", conf)
    statuses = {int(s) for s, _ in bodies}
    assert {404, 413, 502, 504} <= statuses
    for status, text in bodies:
        err = json.loads(text)["error"]
        assert err["code"] == int(status) and err["message"] and err["type"]


def test_retries_zero_and_fail_open_and_no_accounting() -> None:
    conf = render(NginxOptions(retries=0, default_upstream="10.0.0.9:8000", accounting=False))
    assert "@inference_fallback_1" not in conf and "location @inference_retry" not in conf
    assert "proxy_set_header X-Inference-Retries 0;" in conf
    assert "error_page 502 @inference_upstream_502;" in block(conf, "location @inference")
    assert "post_action" not in conf and "@inference_done" not in conf
    unavailable = block(conf, "location @inference_decider_unavailable")
    assert "set $inference_upstream 10.0.0.9:8000;" in unavailable
    assert "proxy_pass http://$inference_upstream;" in unavailable


def test_three_retries_chain_more_and_last_hops_through_maps() -> None:
    conf = render(NginxOptions(retries=3))
    assert (
        'map $inference_fallback_2 $inference_hop_1 { "" @inference_fallback_1_last; '
        "default @inference_fallback_1_more; }" in conf
    )
    assert "map $inference_fallback_3 $inference_hop_2" in conf and "$inference_hop_3" not in conf
    assert "error_page 500 502 503 = $inference_hop_1;" in block(conf, "location @inference_retry")
    assert "error_page 500 502 503 = $inference_hop_2;" in block(conf, "location @inference_fallback_1_more")
    assert "error_page 500 502 503 = @inference_fallback_3_last;" in block(
        conf, "location @inference_fallback_2_more"
    )
    assert "location @inference_fallback_3_more" not in conf
    for n in (1, 2, 3):
        assert f"location @inference_fallback_{n}_last {{" in conf


def test_syslog_reports_replace_post_action() -> None:
    conf = render(NginxOptions(report="syslog", decider="127.0.0.1:9100"))
    assert "post_action" not in conf and "location @inference_done" not in conf
    assert (
        "access_log syslog:server=127.0.0.1:9100,nohostname,tag=inferoute inference_report "
        "if=$inference_request;" in conf
    )
    assert "'inferoute-report|$inference_request|$upstream_addr|$upstream_status|'" in conf
    assert 'set $inference_request "";' in conf  # requests not routed by the decider send no report
    with pytest.raises(ValueError, match="--report"):
        render(NginxOptions(report="carrier-pigeon"))
    with pytest.raises(ValueError, match="decider-tls"):
        render(NginxOptions(report="syslog", decider_tls=True))


def test_fail_closed_decider_unavailable_answers_json() -> None:
    unavailable = block(render(NginxOptions()), "location @inference_decider_unavailable")
    assert "return 502" in unavailable and "return 504" in unavailable
    assert "default_type application/json;" in unavailable


def test_pass_headers_locations_tls_and_self_contained() -> None:
    conf = render(
        NginxOptions(
            locations=("/v1/", "/responses"),
            pass_headers=("X-Gateway-Inference-Objective",),
            self_contained=True,
            decider_tls=True,
            decider_ca="/etc/ca.pem",
            max_body_size=52428800,
        )
    )
    assert "location /responses {" in conf
    assert "set $inference_hdr_1 $upstream_http_x_inference_hdr_x_gateway_inference_objective;" in conf
    assert "proxy_set_header X-Gateway-Inference-Objective $inference_hdr_1;" in conf
    assert "proxy_pass https://inferoute_decider;" in conf
    assert "proxy_ssl_trusted_certificate /etc/ca.pem;" in conf and "proxy_ssl_verify on;" in conf
    assert "pid nginx.pid;" in conf and "client_body_temp_path temp/client_body;" in conf
    assert "client_max_body_size 52428800;" in conf


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        (NginxOptions(decider="nohost"), "--decider"),
        (NginxOptions(default_upstream="x"), "--default-upstream"),
        (NginxOptions(locations=("v1",)), "--location"),
        (NginxOptions(locations=("/_inferoute/x",)), "internal"),
        (NginxOptions(locations=()), "at least one"),
        (NginxOptions(model_header="bad header"), "invalid header"),
        (NginxOptions(retries=9), "--retries"),
        (NginxOptions(max_body_size=0), "--max-body-size"),
    ],
)
def test_invalid_options_are_refused(opts: NginxOptions, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render(opts)


def test_options_follow_the_gateway_config(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(
        "pool: {endpoints: [{address: 10.0.0.1, port: 8000}]}\n"
        "routes:\n"
        "  - {path: /v1/, bbr: {max_body_size: 1000, header_name: X-Model}}\n"
        "  - {path: /responses, bbr: {max_body_size: 5000}}\n"
    )
    opts = options_from_gateway_config(str(cfg), NginxOptions())
    assert opts.decider == "127.0.0.1:8080"  # the gateway's default listen
    cfg.write_text("listen: 0.0.0.0:9101\n" + cfg.read_text())
    assert options_from_gateway_config(str(cfg), NginxOptions()).decider == "127.0.0.1:9101"
    opts = options_from_gateway_config(str(cfg), NginxOptions())
    assert opts.locations == ("/v1/", "/responses")
    assert opts.max_body_size == 5000
    assert opts.model_header == "X-Model"


def test_cli_prints_the_config_and_rejects_bad_flags(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(
        config_command, ["--decider", "127.0.0.1:9100", "--listen", "9000", "--retries", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "server 127.0.0.1:9100;" in result.output and "listen 9000;" in result.output
    assert "location @inference_fallback_2_last" in result.output
    gw = tmp_path / "gw.yaml"
    gw.write_text("listen: 127.0.0.1:9200\nroutes: [{path: /v1/}]\n")
    from_file = runner.invoke(config_command, ["--config", str(gw)])
    assert "server 127.0.0.1:9200;" in from_file.output
    overridden = runner.invoke(config_command, ["--config", str(gw), "--decider", "127.0.0.1:9300"])
    assert "server 127.0.0.1:9300;" in overridden.output
    bad = runner.invoke(config_command, ["--location", "v1"])
    assert bad.exit_code == 2 and "--location" in bad.output


def test_the_yaml_examples_in_docs_nginx_md_are_valid_gateway_configs(tmp_path: Path) -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "nginx.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", doc, flags=re.S)
    assert len(blocks) >= 3
    for n, text in enumerate(blocks):
        path = tmp_path / f"example{n}.yaml"
        path.write_text(text)
        opts = options_from_gateway_config(str(path), NginxOptions())
        assert opts.locations and all(loc in text for loc in opts.locations)
        assert "location @inference {" in render(opts)
