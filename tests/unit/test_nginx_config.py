"""``inferoute nginx-config``: what the generated configuration does, checked on its parsed structure (every
jump lands on a location, the decision is read before it is overwritten, the fallback chain) and by the real
NGINX (``nginx -t``); requests through it run in tests/interop/test_nginx_decider.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from inferoute.gateway.nginx_decider import protocol
from inferoute.integrations.nginx import (
    ERROR_PREFIX,
    NGINX_ERRORS,
    NginxOptions,
    config_command,
    options_from_gateway_config,
    render,
)


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


Directive = tuple[str, ...]
_TOKEN = re.compile(r"#[^\n]*|'[^']*'|\"[^\"]*\"|[{};]|[^\s{};]+")


def directives(conf: str) -> dict[str, list[Directive]]:
    """Every block of ``conf`` by its header (``location @inference``, ``http``, ...) -> its own directives
    in order, as token tuples (NGINX's grammar: words, quoted strings, comments, ``;`` ends a directive,
    ``{ }`` a block)."""
    out: dict[str, list[Directive]] = {"": []}
    stack = [""]
    words: list[str] = []
    for tok in _TOKEN.findall(conf):
        if tok.startswith("#"):
            continue
        if tok == ";":
            out[stack[-1]].append(tuple(words))
            words = []
        elif tok == "{":
            header = " ".join(words)
            out.setdefault(header, [])
            stack.append(header)
            words = []
        elif tok == "}":
            assert not words, f"unterminated directive {words} in {stack[-1]}"
            stack.pop()
        else:
            words.append(tok)
    assert stack == [""] and not words, "unbalanced braces"
    return out


def named_targets(tree: dict[str, list[Directive]]) -> set[str]:
    """Every ``@location`` the configuration jumps to: error_page targets, post_action, map values."""
    found = set()
    for header, body in tree.items():
        for d in body:
            if d[0] in ("error_page", "post_action") or header.startswith("map "):
                found.update(w for w in d if w.startswith("@"))
    return found


OPTION_SETS = [
    NginxOptions(),
    NginxOptions(retries=0, default_upstream="10.0.0.9:8000", accounting=False),
    NginxOptions(retries=3),
    NginxOptions(retries=8, report="syslog", decider="127.0.0.1:9100"),
    NginxOptions(locations=("/v1/", "/responses"), pass_headers=("X-Gateway-Inference-Objective",)),
]


@pytest.mark.parametrize("opts", OPTION_SETS)
def test_every_jump_lands_on_a_location_that_exists(opts: NginxOptions) -> None:
    tree = directives(render(opts))
    locations = {h.removeprefix("location ") for h in tree if h.startswith("location @")}
    assert named_targets(tree) <= locations
    # the decider's two redirect answers land on locations that exist
    retry = opts.retries > 0
    assert protocol.ACCEL_LOCATION in locations and (protocol.ACCEL_RETRY_LOCATION in locations) == retry


@pytest.mark.parametrize("opts", OPTION_SETS)
def test_the_decision_is_read_before_proxy_pass_replaces_it(opts: NginxOptions) -> None:
    """$upstream_http_* names the *last* upstream's headers: the decider's headers must be copied into
    variables before the location proxies to the model server, and only headers of the protocol are read."""
    tree = directives(render(opts))
    readable = {
        protocol.header_variable(h)
        for h in (protocol.UPSTREAM_HEADER, protocol.MODEL_HEADER, protocol.TOKEN_HEADER)
    }
    for name in (protocol.ACCEL_LOCATION, protocol.ACCEL_RETRY_LOCATION):
        body = tree.get(f"location {name}")
        if body is None:
            continue
        kinds = [d[0] for d in body]
        assert kinds.index("set") < kinds.index("proxy_pass")
        reads = {
            w.removeprefix("$upstream_http_") for d in body for w in d if w.startswith("$upstream_http_")
        }
        assert reads & readable == readable
        assert all(
            r in readable
            or r.startswith(protocol.header_variable(protocol.FALLBACK_HEADER))
            or r.startswith(protocol.header_variable(protocol.PASS_HEADER_PREFIX))
            for r in reads
        ), reads
        sent = {d[1].lower(): d[2] for d in body if d[0] == "proxy_set_header"}
        assert sent[protocol.UPSTREAM_HEADER.lower()] == '""'  # the decision never reaches the model server
        assert sent[opts.model_header.lower()] == "$inference_model"


def test_the_fallback_chain_walks_every_announced_fallback_once() -> None:
    for retries in range(1, 9):
        tree = directives(render(NginxOptions(retries=retries)))
        announced = [
            d for d in tree["location /v1/"] if d[:2] == ("proxy_set_header", protocol.RETRIES_HEADER)
        ]
        assert announced == [("proxy_set_header", protocol.RETRIES_HEADER, str(retries))]
        last = {h for h in tree if re.fullmatch(r"location @inference_fallback_\d+_last", h)}
        assert last == {f"location @inference_fallback_{n}_last" for n in range(1, retries + 1)}
        for n in range(1, retries + 1):  # each hop proxies to its own fallback and passes its errors on
            body = tree[f"location @inference_fallback_{n}_last"]
            assert ("set", "$inference_upstream", f"$inference_fallback_{n}") in body
            assert ("proxy_intercept_errors", "off") in body


def test_error_bodies_are_openai_json() -> None:
    conf = render(NginxOptions(retries=2))
    bodies = re.findall(r"return (\d{3}) '(\{.*?\})';", conf)
    statuses = {int(s) for s, _ in bodies}
    assert {404, 502, 504} <= statuses
    for status, text in bodies:
        err = json.loads(text)["error"]
        assert err["code"] == int(status) and err["message"] and err["type"]
    mapped = dict(d[:2] for d in directives(conf)["map $uri $inference_error_body"])
    for status, client, _ in NGINX_ERRORS:
        err = json.loads(mapped[f"{ERROR_PREFIX}{status}"].strip("'"))["error"]
        assert err["code"] == client and err["message"] and err["type"]


def _error_targets(body: list[Directive]) -> dict[int, str]:
    """status -> where the location's error_page lines send it (``=CODE`` kept with the target)."""
    out: dict[int, str] = {}
    for d in body:
        if d[0] == "error_page":
            codes = [w for w in d[1:-1] if w.isdigit()]
            target = " ".join(w for w in d[1:] if not w.isdigit())
            out.update({int(c): target for c in codes})
    return out


@pytest.mark.parametrize("opts", OPTION_SETS)
def test_every_nginx_error_has_a_json_answer_wherever_error_pages_are_set(opts: NginxOptions) -> None:
    """NGINX does not merge error_page lists: the server and every location that sets its own and passes
    upstream errors through (proxy_intercept_errors off) must still cover every status NGINX answers."""
    tree = directives(render(opts))
    server = tree["server"]
    keys = {d[0] for d in tree["map $uri $inference_error_body"]}
    checked = 0
    for header, body in tree.items():
        targets = _error_targets(body)
        if header != "server" and (not targets or ("proxy_intercept_errors", "on") in body):
            continue
        checked += 1
        for status, client, _ in NGINX_ERRORS:
            assert status in targets, (header, status)
            target = targets[status]
            if "@" in target:
                continue  # the decider's fallback or a reported upstream failure (checked elsewhere)
            expected = f"{ERROR_PREFIX}$status" if status == client else f"={client} {ERROR_PREFIX}{status}"
            assert target == expected, (header, status, target)
            assert f"{ERROR_PREFIX}{status}" in keys
    assert checked >= 3 and server
    internal = tree[f"location ^~ {ERROR_PREFIX}"]
    assert ("internal",) in internal and ("return", "200", "$inference_error_body") in internal


def test_retries_zero_and_fail_open_and_no_accounting() -> None:
    conf = render(NginxOptions(retries=0, default_upstream="10.0.0.9:8000", accounting=False))
    assert "@inference_fallback_1" not in conf and "location @inference_retry" not in conf
    assert "proxy_set_header X-Inference-Retries 0;" in conf
    assert "error_page 502 @inference_upstream_502;" in block(conf, "location @inference")
    assert "post_action" not in conf and "@inference_done" not in conf
    unavailable = block(conf, "location @inference_decider_unavailable")
    assert "set $inference_upstream 10.0.0.9:8000;" in unavailable
    assert "proxy_pass http://$inference_upstream;" in unavailable


def test_three_retries_chain_more_and_last_hops_through_maps() -> None:  # the map trick, spelled out
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
        (NginxOptions(model_header="bad header"), "header name"),
        (NginxOptions(retries=9), "--retries"),
        (NginxOptions(max_body_size=0), "--max-body-size"),
        (NginxOptions(pass_headers=("x;y",)), "--pass-header"),
        (NginxOptions(decider_ca="/etc/ca.pem"), "--decider-ca needs --decider-tls"),
        (NginxOptions(listen="443 ssl; include /etc/passwd"), "--listen"),
        (NginxOptions(listen="443 sslx"), "--listen"),
        (NginxOptions(listen="443  ssl"), "--listen"),
    ],
)
def test_invalid_options_are_refused(opts: NginxOptions, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render(opts)


@pytest.mark.parametrize(
    "listen", ["443 ssl http2", "[::]:8443 ssl reuseport", "80 default_server backlog=511"]
)
def test_listen_takes_nginx_listen_parameters(listen: str) -> None:
    assert f"listen {listen};" in render(NginxOptions(listen=listen))


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


def test_the_gateway_files_in_docs_nginx_md_are_valid_gateway_configs(tmp_path: Path) -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "nginx.md").read_text()
    blocks = re.findall(r"^cat > gateway.yaml <<'EOF'\n(.*?)^EOF$", doc, flags=re.S | re.M)
    assert len(blocks) >= 4  # the quick start and the three ngx-inference examples
    for n, text in enumerate(blocks):
        path = tmp_path / f"example{n}.yaml"
        path.write_text(text)
        opts = options_from_gateway_config(str(path), NginxOptions())
        assert opts.locations and all(loc in text for loc in opts.locations)
        assert "location @inference {" in render(opts)
