"""``inferoute nginx-config``: a complete, commented NGINX configuration driven by the inferoute decider.

Theory of operation: see :mod:`inferoute.gateway.nginx_decider` (the decider's side) and docs/nginx.md. This
module is pure text generation: :func:`render` turns :class:`NginxOptions` into an ``nginx.conf``; the click
command only parses flags (optionally reading the gateway config so body limits and header names agree).

The generated configuration, per inference location::

    location /v1/            -> proxy the buffered request to the decider (upstream inferoute_decider)
      decider answers X-Accel-Redirect: @inference       (or an error: passed to the client as is)
    location @inference      -> set $inference_upstream / $inference_model from the decider's headers,
                                proxy_pass http://$inference_upstream, stream the answer (proxy_buffering off)
      connect error / 500 / 502 / 503 before the first byte -> @inference_fallback_1_* ... (the fallbacks)
      post_action @inference_done -> one body-less report to the decider (releases the picker's accounting)
    decider unreachable      -> @inference_default (fail-open: --default-upstream) or a JSON 502/504
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import click

from inferoute.endpoints import hostport, split_hostport
from inferoute.errors import error_body
from inferoute.gateway.nginx_decider import protocol as d

DEFAULT_DECIDER = "127.0.0.1:8081"
DEFAULT_LISTEN = "8080"
UNREACHABLE = "the model server is unreachable"
DEFAULT_MAX_BODY = 10 * 1024 * 1024
"""Same default as the gateway's ``bbr.max_body_size`` (and the seed's ``inference_max_body_size``)."""


@dataclass(frozen=True, slots=True)
class NginxOptions:
    """Everything :func:`render` needs; defaults give a working local setup."""

    decider: str = DEFAULT_DECIDER
    """``host:port`` of ``inferoute gateway --mode nginx``."""
    listen: str = DEFAULT_LISTEN
    """NGINX ``listen`` argument (``8080``, ``127.0.0.1:8080``, ``[::]:8080``)."""
    locations: tuple[str, ...] = ("/v1/",)
    """Path prefixes routed through the decider (must match gateway routes)."""
    max_body_size: int = DEFAULT_MAX_BODY
    """``client_max_body_size``; keep it equal to the decider's ``bbr.max_body_size``."""
    model_header: str = "X-Gateway-Model-Name"
    """Request header carrying the model to the model server (``inference_bbr_header_name``)."""
    upstream_header: str = "X-Gateway-Destination-Endpoint"
    """Request header naming the chosen endpoint to the model server (the EPP header)."""
    pass_headers: tuple[str, ...] = ()
    """Extra request headers the picker may set (header mutations) that NGINX forwards."""
    retries: int = 1
    """Fallback endpoints tried after a connection failure or a 500/502/503 before the first byte (0: off)."""
    default_upstream: str | None = None
    """Fail-open target when the decider itself is unreachable (``inference_default_upstream``)."""
    decider_timeout: float = 10.0
    """Seconds NGINX waits for the decider's answer (give the picker timeout plus a margin)."""
    connect_timeout: float = 5.0
    read_timeout: float = 300.0
    """Longest silence between two chunks from the model server (long generations, slow first token)."""
    keepalive: int = 64
    """Idle keep-alive connections to the decider per worker."""
    worker_processes: str = "auto"
    accounting: bool = True
    """Completion reports to the decider (release the picker's in-flight accounting when a response ends)."""
    report: str = "post_action"
    """How reports travel: ``post_action`` (an HTTP request per response, reliable) or ``syslog`` (a UDP
    datagram from the access log: much cheaper, may be lost under overload -- the session then ends by the
    decider's completion timeout)."""
    self_contained: bool = False
    """Pid file, logs and temp directories relative to NGINX's prefix (``nginx -p DIR``), for local runs."""
    access_log: str | None = None
    """Access log (default ``logs/inference.log`` self-contained, else ``/var/log/nginx/inference.log``)."""
    extra_server: str = ""
    """Raw text appended inside ``server {}`` (extra locations, TLS)."""
    decider_tls: bool = False
    """``https`` to the decider, verified against ``decider_ca``."""
    decider_ca: str | None = None
    decider_server_name: str | None = None
    temp_dirs: tuple[str, ...] = field(default=("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))


_Writer = Callable[[str], None]


def _seconds(value: float) -> str:
    if value == int(value):
        return f"{int(value)}s"
    return f"{int(value * 1000)}ms"


def _quote(text: str) -> str:
    """An NGINX single-quoted string."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _json_error(status: int, message: str) -> str:
    return _quote(error_body(status, message).decode())


def _var(name: str) -> str:
    return "$upstream_http_" + d.header_variable(name)


def _pass_var(index: int) -> str:
    return f"$inference_hdr_{index}"


def _reports(opts: NginxOptions) -> str | None:
    """``post_action`` | ``syslog`` | None (no completion reports)."""
    return opts.report if opts.accounting else None


def _is_hostport(value: str) -> bool:
    try:
        host, port = split_hostport(value)
    except ValueError:
        return False
    return bool(host) and port is not None and 0 < port < 65536


LISTEN_PARAMETERS = re.compile(
    r"default_server|ssl|http2|quic|proxy_protocol|reuseport|deferred|bind|ipv6only=(?:on|off)"
    r"|(?:backlog|rcvbuf|sndbuf|fastopen)=\d+[kKmM]?|so_keepalive=(?:on|off|\d*:\d*:\d*)"
)
"""Parameters NGINX accepts after a ``listen`` address (``443 ssl http2``); anything else is refused."""


def _is_listen(value: str) -> bool:
    """NGINX's ``listen``: ``PORT``, ``HOST:PORT`` or ``[V6]:PORT``, then listen parameters such as ``ssl``
    (nothing a config could break on)."""
    address, *parameters = value.split(" ")
    if not all(LISTEN_PARAMETERS.fullmatch(p) for p in parameters):
        return False
    if address.isdigit():
        return 0 < int(address) < 65536
    if any(c.isspace() or c in ";{}'\"#$" for c in address):
        return False
    return _is_hostport(address)


def validate_options(opts: NginxOptions) -> None:
    """Raise ValueError for options NGINX would reject or that cannot work."""
    for flag, value in (("--decider", opts.decider), ("--default-upstream", opts.default_upstream)):
        if value is not None and not _is_hostport(value):
            raise ValueError(f"{flag}: expected HOST:PORT (port 1-65535), got {value!r}")
    if not _is_listen(opts.listen):
        raise ValueError(
            f"--listen: expected PORT, HOST:PORT or [V6]:PORT (port 1-65535), then NGINX listen parameters "
            f"(ssl, http2, reuseport, default_server, ...), got {opts.listen!r}"
        )
    if opts.worker_processes != "auto" and not (
        opts.worker_processes.isdigit() and int(opts.worker_processes) > 0
    ):
        raise ValueError(f"--workers: 'auto' or a number of processes >= 1, got {opts.worker_processes!r}")
    if not opts.locations:
        raise ValueError("at least one --location is required")
    for loc in opts.locations:
        if not loc.startswith("/") or any(c in loc for c in " ;{}'\""):
            raise ValueError(f"--location: expected a path prefix such as /v1/, got {loc!r}")
        if loc.startswith(d.INTERNAL_PREFIX) or (d.INTERNAL_PREFIX.startswith(loc) and loc != "/"):
            raise ValueError(f"--location {loc!r} overlaps the decider's internal paths {d.INTERNAL_PREFIX}")
    named = [
        ("--model-header (or bbr.header_name)", opts.model_header),
        ("epp.header_name", opts.upstream_header),
    ]
    for flag, name in [*named, *(("--pass-header", h) for h in opts.pass_headers)]:
        if not name or any(not (c.isalnum() or c == "-") for c in name):
            raise ValueError(f"{flag}: expected a header name (letters, digits, '-'), got {name!r}")
    if not 0 <= opts.retries <= 8:
        raise ValueError("--retries: 0..8")
    if opts.report not in ("post_action", "syslog"):
        raise ValueError(f"--report: post_action or syslog, got {opts.report!r}")
    if opts.decider_ca and not opts.decider_tls:
        raise ValueError(
            "--decider-ca needs --decider-tls (the decider is reached over plain HTTP without it)"
        )
    if opts.report == "syslog" and opts.decider_tls:
        raise ValueError(
            "--report syslog sends plain UDP to the decider; it cannot be combined with --decider-tls"
        )
    if opts.max_body_size <= 0:
        raise ValueError("--max-body-size must be > 0")


def render(opts: NginxOptions) -> str:
    """The complete ``nginx.conf`` text for ``opts`` (validated first)."""
    validate_options(opts)
    out: list[str] = []
    w = out.append
    w("# Generated by `inferoute nginx-config`: stock NGINX as the data plane, inferoute as the decider.")
    w(
        "# NGINX buffers each request, asks the decider (BBR + endpoint picker) where it goes, "
        "then proxies the same"
    )
    w("# buffered body to $inference_upstream and streams the answer. See docs/nginx.md.")
    w(f"worker_processes {opts.worker_processes};")
    if opts.self_contained:
        w("pid nginx.pid;                       # paths are relative to `nginx -p PREFIX`")
        w("error_log logs/error.log notice;")
    w("")
    w("events { worker_connections 4096; }")
    w("")
    w("http {")
    if opts.self_contained:
        for name in opts.temp_dirs:
            w(f"    {name}_temp_path temp/{name};")
        w("")
    _logs(w, opts)
    _error_body_map(w)
    _hop_maps(w, opts)
    w("    # The decider: `inferoute gateway --mode nginx --listen HOST:PORT`. Keep-alive connections to it.")
    w("    upstream inferoute_decider {")
    w(f"        server {opts.decider};")
    w(f"        keepalive {opts.keepalive};")
    w("    }")
    w("")
    _server(w, opts)
    w("}")
    return "\n".join(out) + "\n"


def _logs(w: _Writer, opts: NginxOptions) -> None:
    """The access log (and, with ``--report syslog``, the completion reports sent as log lines)."""
    access_log = opts.access_log or (
        "logs/inference.log" if opts.self_contained else "/var/log/nginx/inference.log"
    )
    w("    # One line per request: the model and $inference_upstream, the endpoint that served it")
    w("    # (the picker's choice, or the fallback used). $upstream_addr and $upstream_status list, in")
    if _reports(opts) == "post_action":
        w("    # order: the decider, every endpoint tried, then the completion report to the decider.")
    else:
        w("    # order: the decider, then every endpoint tried.")
    w("    log_format inference '$remote_addr [$time_local] \"$request\" $status $body_bytes_sent '")
    w('                         \'model="$inference_model" upstream="$inference_upstream" \'')
    w('                         \'upstream_addr="$upstream_addr" upstream_status="$upstream_status" \'')
    w("                         'rt=$request_time urt=\"$upstream_response_time\" id=$request_id';")
    if access_log != "off":
        w(f"    access_log {access_log} inference;")
    if _reports(opts) == "syslog":
        w("    # Completion reports: one UDP datagram per request routed by the decider, sent in NGINX's log")
        w("    # phase (after the response ended or the client went away) to the decider's port number.")
        w(
            "    log_format inference_report "
            "'inferoute-report|$inference_request|$upstream_addr|$upstream_status|'"
        )
        w("                                '$upstream_header_time|$request_completion|$status';")
        w(
            f"    access_log syslog:server={opts.decider},nohostname,tag=inferoute inference_report "
            "if=$inference_request;"
        )
    elif access_log == "off":
        w("    access_log off;")
    w("")


def _server(w: _Writer, opts: NginxOptions) -> None:
    """The ``server {}`` block: limits, error pages, the decider and inference locations."""
    w("    server {")
    w(f"        listen {opts.listen};")
    w("")
    w("        # Body limit: the same number as the decider's bbr.max_body_size (inference_max_body_size).")
    w("        # Bodies above client_body_buffer_size spill to a temp file, read once per hop, never copied.")
    w(f"        client_max_body_size {opts.max_body_size};")
    w("        client_body_buffer_size 1m;")
    w("")
    w("        # Defaults for the log format (requests answered before @inference have no upstream).")
    w('        set $inference_upstream "";')
    w('        set $inference_model "";')
    w('        set $inference_request "";')
    w("")
    w("        # Every error NGINX answers itself (a request it cannot parse, a URI or headers too long,")
    w("        # a body over the limit, ...) gets an OpenAI-style JSON body like the decider's: error_page")
    w(f"        # sends it to {ERROR_PREFIX}STATUS, answered from $inference_error_body. An internal URI,")
    w("        # not a named location: NGINX cannot jump to one before it has parsed the request's URI.")
    w("        # Locations with error_page lines of their own repeat these (NGINX does not merge the lists).")
    _error_pages(w, "        ")
    w("")
    for loc in opts.locations:
        _decider_location(w, opts, loc)
    _inference_location(w, opts)
    for i in range(1, opts.retries + 1):
        _fallback_location(w, opts, i)
    if _reports(opts) == "post_action":
        _done_location(w, opts)
    _decider_down_location(w, opts)
    _error_locations(w, opts)
    if "/" not in opts.locations:
        w("        # Paths outside the routed locations: a JSON 404, never NGINX's HTML page.")
        w("        location / {")
        w("            default_type application/json;")
        w(f"            return 404 {_json_error(404, 'no route for this path')};")
        w("        }")
    w("        # The decider's own paths (completion reports, health, metrics) are not for clients.")
    w(f"        location {d.INTERNAL_PREFIX} {{")
    w("            default_type application/json;")
    w(f"            return 404 {_json_error(404, 'not found')};")
    w("        }")
    if opts.extra_server:
        w("")
        w(opts.extra_server.rstrip())
    w("    }")


def _decider_scheme(opts: NginxOptions) -> str:
    return "https" if opts.decider_tls else "http"


def _decider_tls_lines(w: _Writer, opts: NginxOptions, indent: str) -> None:
    if not opts.decider_tls:
        return
    w(f"{indent}proxy_ssl_verify on;")
    if opts.decider_ca:
        w(f"{indent}proxy_ssl_trusted_certificate {opts.decider_ca};")
    w(f"{indent}proxy_ssl_server_name on;")
    if opts.decider_server_name:
        w(f"{indent}proxy_ssl_name {opts.decider_server_name};")
    w(f"{indent}proxy_ssl_session_reuse on;")


def _decider_location(w: _Writer, opts: NginxOptions, loc: str) -> None:
    w("        # Step 1: ask the decider. NGINX sends the buffered request (method, URI, headers, body).")
    w(f"        location {loc} {{")
    w(f"            proxy_pass {_decider_scheme(opts)}://inferoute_decider;")
    _decider_tls_lines(w, opts, "            ")
    w("            proxy_http_version 1.1;")
    w('            proxy_set_header Connection "";')
    w("            proxy_set_header Host $host;")
    w("            proxy_set_header X-Request-Id $request_id;")
    w(f"            proxy_set_header {d.RETRIES_HEADER} {opts.retries};   # fallbacks NGINX can walk")
    w(
        "            # MUST stay on: the body is read completely before the decider is asked, "
        "so NGINX can send"
    )
    w("            # the same bytes again to the chosen endpoint (off breaks bodies larger than one buffer).")
    w("            proxy_request_buffering on;")
    w(f"            proxy_connect_timeout {_seconds(min(opts.connect_timeout, opts.decider_timeout))};")
    w(f"            proxy_read_timeout {_seconds(opts.decider_timeout)};")
    w(f"            proxy_send_timeout {_seconds(opts.decider_timeout)};")
    w(
        "            # Decider errors (413, 429, 502, 503, 504 with a JSON body, no X-Accel-Redirect) "
        "reach the"
    )
    w("            # client as they are; only failures to reach the decider are handled here.")
    w("            proxy_intercept_errors off;")
    w("            error_page 502 504 = @inference_decider_unavailable;")
    _error_pages(w, "            ", handled=(502, 504))
    for name in (d.UPSTREAM_HEADER, d.FALLBACKS_HEADER, d.MODEL_HEADER, d.TOKEN_HEADER):
        w(f"            proxy_hide_header {name};")
    w("        }")
    w("")


def _proxy_to_endpoint(w: _Writer, opts: NginxOptions, target: str) -> None:
    """The shared body of @inference and its fallbacks: forward the request, stream the answer."""
    i = "            "
    w(f"{i}proxy_set_header {opts.model_header} $inference_model;   # empty value = header not sent")
    w(f"{i}proxy_set_header {opts.upstream_header} {target};")
    for name in CLEARED_HEADERS:  # a client cannot pass routing headers on
        if name.lower() != opts.upstream_header.lower():
            w(f'{i}proxy_set_header {name} "";')
    for n, name in enumerate(opts.pass_headers, start=1):
        w(f"{i}proxy_set_header {name} {_pass_var(n)};")
    w(f"{i}proxy_set_header Host $host;")
    w(f"{i}proxy_set_header X-Request-Id $request_id;        # as the gateway does")
    w(f"{i}proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;")
    w(f"{i}proxy_http_version 1.1;")
    w(f'{i}proxy_set_header Connection "";')
    w(f"{i}proxy_buffering off;              # stream SSE token by token")
    w(f"{i}proxy_cache off;")
    w(f"{i}proxy_connect_timeout {_seconds(opts.connect_timeout)};")
    w(f"{i}proxy_read_timeout {_seconds(opts.read_timeout)};")
    w(f"{i}proxy_send_timeout {_seconds(opts.read_timeout)};")
    w(f"{i}proxy_pass http://{target};")


NGINX_ERRORS: tuple[tuple[int, int, str], ...] = (
    (400, 400, "malformed HTTP request"),
    (401, 401, "authorization required"),
    (402, 402, "payment required"),
    (403, 403, "forbidden"),
    (404, 404, "not found"),
    (405, 405, "method not allowed"),
    (406, 406, "not acceptable"),
    (408, 408, "the request was not received in time"),
    (409, 409, "conflict"),
    (410, 410, "gone"),
    (411, 411, "a Content-Length header is required"),
    (412, 412, "precondition failed"),
    (413, 413, "request body exceeds the size limit"),
    (414, 414, "the request URI is too long"),
    (415, 415, "unsupported media type"),
    (416, 416, "requested range not satisfiable"),
    (421, 421, "misdirected request"),
    (429, 429, "too many requests"),
    (494, 431, "request headers too large"),
    (495, 400, "the client TLS certificate failed verification"),
    (496, 400, "a client TLS certificate is required"),
    (497, 400, "a plain HTTP request was sent to an HTTPS port"),
    (500, 500, "internal error in the proxy"),
    (501, 501, "not implemented (unsupported Transfer-Encoding or method)"),
    (502, 502, UNREACHABLE),
    (503, 503, "service unavailable"),
    (504, 504, "the model server timed out"),
    (505, 505, "HTTP version not supported"),
    (507, 507, "insufficient storage"),
)
"""Every error status NGINX can answer by itself (the statuses with a built-in HTML page in NGINX's
``ngx_http_special_response.c``) -> (the status the client gets, the message of its OpenAI-style JSON body).
NGINX's private codes become standard ones: 494 (request header too large) is 431, as the gateway answers;
495-497 (client-certificate and plain-HTTP-to-HTTPS errors) are 400, as NGINX itself sends them."""

ERROR_PREFIX = d.INTERNAL_PREFIX + "error/"
"""Internal URIs of the JSON error answers (``/_inferoute/error/414``); clients cannot reach them."""


def _error_pages(w: _Writer, indent: str, handled: tuple[int, ...] = ()) -> None:
    """``error_page`` lines sending every NGINX error not in ``handled`` to its JSON answer."""
    same = [str(s) for s, client, _ in NGINX_ERRORS if s == client and s not in handled]
    for n in range(0, len(same), 10):
        w(f"{indent}error_page {' '.join(same[n : n + 10])} {ERROR_PREFIX}$status;")
    for status, client, _ in NGINX_ERRORS:
        if status != client and status not in handled:
            w(f"{indent}error_page {status} ={client} {ERROR_PREFIX}{status};")


def _error_body_map(w: _Writer) -> None:
    w("    # The JSON body of each error NGINX answers itself, by the internal URI error_page sends it to.")
    w("    map $uri $inference_error_body {")
    w(f"        default {_json_error(500, 'internal error in the proxy')};")
    for status, client, message in NGINX_ERRORS:
        w(f"        {ERROR_PREFIX}{status} {_json_error(client, message)};")
    w("    }")
    w("")


CLEARED_HEADERS = (
    d.UPSTREAM_HEADER,
    "X-Gateway-Destination-Endpoint",
    "X-Gateway-Destination-Endpoint-Served",
    "X-Gateway-Destination-Endpoint-Subset",
)
"""Routing headers a client might send that never reach the model server (an empty value drops them)."""

RETRY_STATUSES = "500 502 503"
"""Statuses (NGINX's own or the model server's, before any byte reached the client) that move on to the next
endpoint -- the gateway's rule. 504 (a timeout: the model server may be working on it) does not."""


def _hop_target(opts: NginxOptions, n: int) -> str:
    """The named location of fallback ``n``: a map picks ``_more`` (another fallback follows) or ``_last``."""
    return f"@inference_fallback_{n}_last" if n == opts.retries else f"$inference_hop_{n}"


def _hop_maps(w: _Writer, opts: NginxOptions) -> None:
    if opts.retries < 2:
        return
    w("    # Fallback n intercepts 5xx (and walks on) only when fallback n+1 exists; the last hop passes the")
    w("    # model server's own error through.")
    for n in range(1, opts.retries):
        w(
            f"    map $inference_fallback_{n + 1} $inference_hop_{n} "
            f'{{ "" @inference_fallback_{n}_last; default @inference_fallback_{n}_more; }}'
        )
    w("")


def _capture(w: _Writer, opts: NginxOptions, i: str) -> None:
    w(f"{i}set $inference_upstream {_var(d.UPSTREAM_HEADER)};")
    w(f"{i}set $inference_model {_var(d.MODEL_HEADER)};")
    w(f"{i}set $inference_request {_var(d.TOKEN_HEADER)};")
    for n in range(1, opts.retries + 1):
        w(f"{i}set $inference_fallback_{n} {_var(d.FALLBACK_HEADER + str(n))};")
    for n, name in enumerate(opts.pass_headers, start=1):
        w(f"{i}set {_pass_var(n)} {_var(d.PASS_HEADER_PREFIX + name)};")


def _hop_errors(w: _Writer, opts: NginxOptions, i: str, next_hop: str | None) -> None:
    """error_page lines of one hop: walk on to ``next_hop``, or JSON errors for a last hop."""
    w(f"{i}recursive_error_pages on;")
    if next_hop is not None:
        w(f"{i}proxy_intercept_errors on;        # a 5xx before the first byte: next endpoint")
        w(f"{i}error_page {RETRY_STATUSES} = {next_hop};")
    else:
        w(f"{i}proxy_intercept_errors off;       # last endpoint: its own errors reach the client unchanged")
        w(f"{i}error_page 502 @inference_upstream_502;")
    w(f"{i}error_page 504 @inference_upstream_504;")
    if next_hop is None:  # with proxy_intercept_errors off these are NGINX's own errors only
        _error_pages(w, i, handled=(502, 504))
    if _reports(opts) == "post_action":
        w(f"{i}post_action @inference_done;      # report completion to the picker (see below)")


def _inference_location(w: _Writer, opts: NginxOptions) -> None:
    i = "            "
    w("        # Step 2: the decider answered `X-Accel-Redirect: @inference` (no fallback) or")
    w("        # `@inference_retry` (fallbacks follow). Copy its headers into variables FIRST: once")
    w("        # proxy_pass runs, $upstream_http_* describe the model server's response instead.")
    entries: list[tuple[str, str | None]] = [(d.ACCEL_LOCATION, None)]
    if opts.retries:
        entries.append((d.ACCEL_RETRY_LOCATION, _hop_target(opts, 1)))
    for name, next_hop in entries:
        w(f"        location {name} {{")
        _capture(w, opts, i)
        _hop_errors(w, opts, i, next_hop)
        _proxy_to_endpoint(w, opts, "$inference_upstream")
        w("        }")
        w("")


def _fallback_location(w: _Writer, opts: NginxOptions, n: int) -> None:
    i = "            "
    variants: list[tuple[str, str | None]] = [("last", None)]
    if n < opts.retries:
        variants.insert(0, ("more", _hop_target(opts, n + 1)))
    for variant, next_hop in variants:
        w(f"        # Fallback {n} (X-Inference-Fallback-{n}), {variant} hop.")
        w(f"        location @inference_fallback_{n}_{variant} {{")
        w(f"{i}set $inference_upstream $inference_fallback_{n};")
        _hop_errors(w, opts, i, next_hop)
        _proxy_to_endpoint(w, opts, "$inference_upstream")
        w("        }")
        w("")


def _done_location(w: _Writer, opts: NginxOptions) -> None:
    i = "            "
    w(
        "        # Step 3 (after the response, or after the client went away): "
        "one body-less report to the decider"
    )
    w("        # so the picker releases its in-flight accounting for the endpoint that served the request.")
    w("        location @inference_done {")
    w(f"{i}rewrite ^ {d.DONE_PATH} break;")
    w(f"{i}proxy_method POST;")
    w(f"{i}proxy_pass_request_body off;")
    w(f"{i}proxy_pass_request_headers off;")
    w(f'{i}proxy_set_header Content-Length "";')
    w(f"{i}proxy_set_header {d.TOKEN_HEADER} $inference_request;")
    w(f"{i}proxy_set_header {d.REPORT_SERVED} $upstream_addr;")
    w(f"{i}proxy_set_header {d.REPORT_STATUS} $upstream_status;")
    w(f"{i}proxy_set_header {d.REPORT_COMPLETION} $request_completion;")
    w(f"{i}proxy_set_header {d.REPORT_CLIENT_STATUS} $status;")
    w(f"{i}proxy_set_header {d.REPORT_HEADER_TIME} $upstream_header_time;")
    w(f"{i}proxy_http_version 1.1;")
    w(f'{i}proxy_set_header Connection "";')
    w(f"{i}proxy_connect_timeout {_seconds(min(opts.connect_timeout, opts.decider_timeout))};")
    w(f"{i}proxy_read_timeout {_seconds(opts.decider_timeout)};")
    w(f"{i}proxy_pass {_decider_scheme(opts)}://inferoute_decider;")
    _decider_tls_lines(w, opts, i)
    w("        }")
    w("")


def _decider_down_location(w: _Writer, opts: NginxOptions) -> None:
    i = "            "
    w("        # The decider could not be reached (502) or did not answer in time (504).")
    w("        location @inference_decider_unavailable {")
    if opts.default_upstream:
        w(
            f"{i}# Fail-open (inference_epp_failure_mode_allow on + inference_default_upstream): "
            "no BBR, no picker."
        )
        w(f"{i}set $inference_upstream {opts.default_upstream};")
        w(f'{i}set $inference_model "";')
        _error_pages(w, i)
        _proxy_to_endpoint(w, opts, "$inference_upstream")
    else:
        w(f"{i}# Fail-closed (inference_epp_failure_mode_allow off).")
        w(f"{i}default_type application/json;")
        w(
            f"{i}if ($upstream_status ~ 504$) "
            f"{{ return 504 {_json_error(504, 'the inference decider timed out')}; }}"
        )
        w(f"{i}return 502 {_json_error(502, 'the inference decider is unavailable')};")
    w("        }")
    w("")


def _error_locations(w: _Writer, opts: NginxOptions) -> None:
    i = "            "
    w("        # The JSON answers of NGINX's own errors. The status is the error's: error_page without '='")
    w("        # keeps it (or sets it, '=431'), whatever `return` says.")
    w(f"        location ^~ {ERROR_PREFIX} {{")
    w(f"{i}internal;")
    w(f"{i}default_type application/json;")
    w(f"{i}return 200 $inference_error_body;")
    w("        }")
    accounting = _reports(opts) == "post_action"
    w("        # The model server failed on the last hop: the same bodies, and the failed attempt is")
    w("        # reported to the picker.")
    messages = {status: message for status, _, message in NGINX_ERRORS}
    for status in (502, 504):
        w(f"        location @inference_upstream_{status} {{")
        w(f"{i}default_type application/json;")
        if accounting:
            w(f"{i}post_action @inference_done;")
        w(f"{i}return {status} {_json_error(status, messages[status])};")
        w("        }")
    w("")


# --- CLI ----------------------------------------------------------------------------------------------------


def options_from_gateway_config(path: str, base: NginxOptions) -> NginxOptions:
    """The decider address (the file's ``listen``), locations, body limit and header names from the gateway
    YAML the decider runs with."""
    from inferoute.gateway.config import load_config, parse_listen

    cfg = load_config(path, check_files=False)  # the decider's certificates may live on another machine
    host, port = parse_listen(cfg.listen)
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    base = replace(base, decider=hostport(host, port))  # where `inferoute gateway --mode nginx` listens
    if not cfg.routes:
        return base
    limit = max(r.bbr.max_body_size for r in cfg.routes)
    first = cfg.routes[0]
    return replace(
        base,
        locations=tuple(r.path for r in cfg.routes),
        max_body_size=limit,
        model_header=first.bbr.header_name,
        upstream_header=first.epp.header_name,
    )


@click.command("nginx-config")
@click.option(
    "--decider",
    default=None,
    help=f"HOST:PORT of the decider [default: the --config file's listen, else {DEFAULT_DECIDER}].",
)
@click.option(
    "--listen",
    default=DEFAULT_LISTEN,
    show_default=True,
    help="NGINX's listen: PORT, HOST:PORT or [V6]:PORT, optionally followed by listen parameters "
    "('443 ssl http2').",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Gateway YAML: take locations, body limit and header names from it.",
)
@click.option("--location", "locations", multiple=True, help="Path prefix routed via the decider (repeat).")
@click.option(
    "--max-body-size",
    type=click.IntRange(min=1),
    default=None,
    help="Bytes; same as the decider's bbr.max_body_size [default: the --config file's, else 10485760].",
)
@click.option("--model-header", default=None, help="Model header sent to the model server.")
@click.option("--pass-header", "pass_headers", multiple=True, help="Picker-set header to forward (repeat).")
@click.option(
    "--retries",
    type=click.IntRange(0, 8),
    default=1,
    show_default=True,
    help="Fallback endpoints tried after a connect error or 500/502/503 before the first byte.",
)
@click.option("--default-upstream", default=None, help="Fail-open HOST:PORT when the decider is unreachable.")
@click.option(
    "--decider-timeout",
    type=click.FloatRange(0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds NGINX waits for the decider (keep above epp.timeout_ms).",
)
@click.option(
    "--read-timeout",
    type=click.FloatRange(0, min_open=True),
    default=300.0,
    show_default=True,
    help="Longest silence from the model server, seconds.",
)
@click.option(
    "--report",
    type=click.Choice(["post_action", "syslog"]),
    default="post_action",
    show_default=True,
    help="How completion reports reach the decider: an HTTP post_action (reliable) or a syslog UDP datagram.",
)
@click.option(
    "--no-accounting", is_flag=True, help="No completion reports (sessions end by the decider's timeout)."
)
@click.option("--self-contained", is_flag=True, help="pid/logs/temp paths relative to `nginx -p PREFIX`.")
@click.option(
    "--workers", default="auto", show_default=True, help="NGINX worker_processes: auto or a number."
)
@click.option("--decider-tls", is_flag=True, help="HTTPS to the decider.")
@click.option(
    "--decider-ca",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="CA file (PEM) to verify the decider's certificate (with --decider-tls).",
)
def config_command(
    decider: str | None,
    listen: str,
    config_path: str | None,
    locations: tuple[str, ...],
    max_body_size: int | None,
    model_header: str | None,
    pass_headers: tuple[str, ...],
    retries: int,
    default_upstream: str | None,
    decider_timeout: float,
    read_timeout: float,
    report: str,
    no_accounting: bool,
    self_contained: bool,
    workers: str,
    decider_tls: bool,
    decider_ca: str | None,
) -> None:
    """Print an NGINX configuration that routes with inferoute (the seed module's $inference_upstream)."""
    opts = NginxOptions(
        listen=listen,
        pass_headers=pass_headers,
        retries=retries,
        default_upstream=default_upstream,
        decider_timeout=decider_timeout,
        read_timeout=read_timeout,
        accounting=not no_accounting,
        report=report,
        self_contained=self_contained,
        worker_processes=workers,
        decider_tls=decider_tls,
        decider_ca=None
        if decider_ca is None
        else os.path.abspath(decider_ca),  # NGINX: relative to its prefix
    )
    if config_path:
        opts = options_from_gateway_config(config_path, opts)
    if decider is not None:
        opts = replace(opts, decider=decider)
    if locations:
        opts = replace(opts, locations=locations)
    if max_body_size is not None:
        opts = replace(opts, max_body_size=max_body_size)
    if model_header:
        opts = replace(opts, model_header=model_header)
    try:
        text = render(opts)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    click.echo(text, nl=False)


__all__ = ["NginxOptions", "config_command", "options_from_gateway_config", "render", "validate_options"]
