"""Typed gateway configuration: one YAML file, validated into msgspec structs.

Every key is documented in ``docs/configuration.md``. Loading never half-works: an unknown key, a
wrong type or an impossible value raises :class:`~inferoute.errors.InferouteError` (status 500, cause
``config``) whose message names the offending path, e.g.
``config: Expected `int`, got `str` - at `$.routes[0].bbr.timeout_ms```.

Routes behave like NGINX ``location`` prefixes: the longest matching ``path`` wins
(:meth:`GatewayConfig.route_for`).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml

from inferoute.endpoints import Endpoint, hostport, parse_endpoints, split_hostport
from inferoute.epp.sync.options import REDIS_SCHEMES
from inferoute.errors import ConfigError, InferouteError, read_text_file
from inferoute.picking import DESTINATION_HEADER

DEFAULT_LISTEN = "127.0.0.1:8080"
"""Where ``inferoute up`` and ``inferoute gateway`` listen unless told otherwise."""

EMBEDDED = "embedded"
"""``epp.endpoint`` value meaning: call the picker in process (no gRPC hop)."""


AppProtocol = Literal["http", "h2c"]
"""The protocol spoken to model servers (an InferencePool's ``appProtocol``: ``http`` or
``kubernetes.io/h2c``)."""


class _Base(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class EndpointConfig(_Base):
    """One pool member (same shape as the picker's static endpoints file)."""

    address: str
    port: int
    name: str | None = None
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    namespace: str | None = None


class PoolConfig(_Base):
    """What the picker may choose from, and the allow-list of destinations the gateway will ever
    connect to."""

    endpoints: list[EndpointConfig] = msgspec.field(default_factory=list)
    allowed_cidrs: list[str] = msgspec.field(default_factory=list)
    """Extra destinations (beyond the pool's own ``ip:port``) a picker may return, e.g. ``10.0.0.0/8``."""
    app_protocol: AppProtocol = "http"
    """How the gateway talks to this pool's model servers (and to ``default_upstream`` of routes without
    ``backends``): ``http`` (HTTP/1.1) or ``h2c`` (HTTP/2 cleartext, prior knowledge)."""


class PickerConfig(_Base):
    """The embedded picker (``epp.endpoint: embedded``)."""

    config_file: str | None = None
    """EndpointPickerConfig YAML for the embedded picker; None = the picker's defaults."""
    config_text: str | None = None
    """The same, inline (wins over ``config_file``)."""
    refresh_interval: float = 0.05
    """Seconds between metrics scrapes of each pool endpoint."""
    staleness_threshold: float = 2.0
    """Seconds after which an endpoint's metrics count as stale."""
    pool_name: str = "default"
    sync_redis: str | None = None
    """Share in-flight load and prefix placements with every other picker (gateway replicas and workers,
    ``inferoute epp`` replicas) using this Redis/Valkey: ``redis://HOST:PORT/DB``, ``rediss://...`` or
    ``unix:///PATH``."""
    sync_interval: float = 0.2
    """Seconds between two exchanges with the other pickers."""


class BBRConfig(_Base):
    """Body-based routing: find the top-level ``model`` and set it as a request header."""

    enabled: bool = True
    header_name: str = "X-Gateway-Model-Name"
    max_body_size: int = 10 * 1024 * 1024
    default_model: str = "unknown"
    endpoint: str | None = None
    """Remote BBR ext_proc server (``host:port``, ``http://`` or ``https://``); None = in process."""
    chunk_size: int = 65536
    timeout_ms: int = 200
    failure_mode_allow: bool = True
    """Remote BBR only: on failure use ``default_model`` (true) or answer 502/504 (false)."""
    tls: bool = False
    """Remote BBR only: TLS to the BBR server (the seed's BBR was plaintext)."""
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None


class EPPConfig(_Base):
    """The endpoint picker for this route."""

    enabled: bool = True
    endpoint: str | None = EMBEDDED
    """``embedded`` (in process), or an ext_proc gRPC target ``host:port`` / ``http://...`` /
    ``https://...``."""
    header_name: str = DESTINATION_HEADER
    timeout_ms: int = 200
    failure_mode_allow: bool = False
    tls: bool = True
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None
    body: Literal["full_duplex", "headers_only"] = "full_duplex"


class BackendConfig(_Base):
    """One weighted backend of a route: a pool with its own picker (a Gateway API ``backendRef`` to an
    InferencePool; ``inferoute controller`` writes these). Requests are shared between a route's backends in
    proportion to ``weight`` (smooth weighted round robin); a backend of weight 0 gets none."""

    name: str = ""
    """For logs, e.g. ``NAMESPACE/POOL``."""
    weight: int = 1
    epp: EPPConfig = msgspec.field(default_factory=EPPConfig)
    """This backend's picker (``embedded`` is not allowed here: one embedded picker serves ``pool``)."""
    endpoints: list[EndpointConfig] = msgspec.field(default_factory=list)
    """The pool's members: the only destinations its picker may return (plus ``pool.allowed_cidrs``), and
    the round-robin targets when the picker fails open or ``epp.enabled`` is false."""
    default_upstream: str | None = None
    app_protocol: AppProtocol = "http"
    """``http`` (HTTP/1.1) or ``h2c`` (HTTP/2 cleartext, prior knowledge) to this backend's endpoints."""


class RouteConfig(_Base):
    """A path prefix with its own BBR / EPP settings (an NGINX ``location``)."""

    path: str = "/"
    bbr: BBRConfig = msgspec.field(default_factory=BBRConfig)
    epp: EPPConfig = msgspec.field(default_factory=EPPConfig)
    default_upstream: str | None = None
    """``ip:port`` used when the picker fails in fail-open mode, or when ``epp.enabled`` is false."""
    backends: list[BackendConfig] = msgspec.field(default_factory=list)
    """Weighted backends; when set they replace ``epp``/``default_upstream`` and the global ``pool`` for
    this route (``epp.body`` still says whether the body is read before picking)."""
    trust_client_headers: bool = False
    """Pass clients' picker-control headers (``x-gateway-model-name-rewrite``, ``x-llm-d-model-name-rewrite``,
    ``x-gateway-model-name``) to the picker and upstream; by default they are stripped."""


class LimitsConfig(_Base):
    max_concurrent_requests: int = 4096
    """Requests in flight per worker process beyond which the gateway answers 503."""
    max_header_bytes: int = 32768
    """Total size of the request headers in bytes; more → 431 (a single line over this + 1 KiB is
    refused by the HTTP parser itself with a plain 400)."""
    max_headers: int = 100
    """Number of request header fields; more → 431."""
    body_read_timeout: float = 60.0
    """Seconds to receive a whole request body, read before picking or streamed to the model server as it
    arrives; slower → 408 (a client trickling its body must not hold a request slot for ever)."""
    header_read_timeout: float = 10.0
    """Seconds from a connection's start (or the first byte of a later request on it) to the end of the
    request headers; slower → the connection is closed (408 when part of a request had arrived)."""
    idle_timeout: float = 75.0
    """Seconds a keep-alive connection may wait for its next request before it is closed."""
    max_requests_per_connection: int = 1000
    """Requests on one connection; the last is answered with ``Connection: close``."""
    max_connections: int = 8192
    """Open client connections per worker, lowered to (RLIMIT_NOFILE - 256) / 2 (each may hold one upstream
    connection). At the limit a new connection replaces the longest-idle one; when all are busy it is
    closed at once."""


class TimeoutsConfig(_Base):
    """Upstream (model server) timeouts in seconds."""

    connect: float = 5.0
    response_headers: float = 300.0
    """From the request sent to the upstream's status line (time to first byte)."""
    read_idle: float = 300.0
    """Longest silence between two response chunks."""


class UpstreamConfig(_Base):
    max_connections_per_upstream: int = 0
    """Connections (busy + idle keep-alive) per upstream endpoint; 0 = unlimited. Over it, requests wait."""
    keepalive_timeout: float = 60.0
    """Seconds an idle keep-alive connection to an upstream is kept."""


class GatewayConfig(_Base):
    """The whole gateway file."""

    listen: str = DEFAULT_LISTEN
    workers: int = 1
    pool: PoolConfig = msgspec.field(default_factory=PoolConfig)
    picker: PickerConfig = msgspec.field(default_factory=PickerConfig)
    routes: list[RouteConfig] = msgspec.field(default_factory=list)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    timeouts: TimeoutsConfig = msgspec.field(default_factory=TimeoutsConfig)
    upstream: UpstreamConfig = msgspec.field(default_factory=UpstreamConfig)
    access_log: bool = True
    metrics_path: str = "/metrics"

    def endpoints(self) -> list[Endpoint]:
        """The pool as :class:`Endpoint` objects."""
        return parse_endpoints([msgspec.to_builtins(e) for e in self.pool.endpoints], "pool.endpoints")

    def route_for(self, path: str) -> RouteConfig | None:
        """Longest-prefix match, like NGINX prefix locations."""
        best: RouteConfig | None = None
        for r in self.routes:
            if path.startswith(r.path) and (best is None or len(r.path) > len(best.path)):
                best = r
        return best

    def listen_hostport(self) -> tuple[str, int]:
        return parse_listen(self.listen)


def max_workers() -> int:
    """The most worker processes a gateway starts: 4 per CPU. More only add memory and context switches (and a
    typo such as ``--workers 100000`` would fork until the machine stalls)."""
    return 4 * (os.cpu_count() or 1)


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``) → (host, port); port 0 means "pick a free one"."""
    try:
        host, port = split_hostport(value)
    except ValueError:
        port = None
    if port is None or not 0 <= port < 65536:
        raise ConfigError(f"listen: expected HOST:PORT (port 0-65535), got {value!r}")
    return host or "0.0.0.0", port


def _fail(message: str) -> InferouteError:
    return ConfigError(message)


def _check_target(where: str, value: str | None, allow_embedded: bool) -> None:
    if value is None or (allow_embedded and value == EMBEDDED):
        return
    rest = value.split("://", 1)[1] if "://" in value else value
    if "://" in value and not value.startswith(("http://", "https://")):
        raise _fail(f"{where}: scheme must be http:// or https://, got {value!r}")
    items = rest.rstrip("/").split(",")
    for item in items:
        try:
            host, port = split_hostport(item.strip())
        except ValueError:
            host, port = "", None
        if not host or port is None:
            raise _fail(f"{where}: expected host:port (or a comma list of ip:port), got {value!r}")
        if len(items) > 1 and not _is_ip(host):
            raise _fail(
                f"{where}: a list of picker replicas takes IP addresses ({host!r} is a name: give one name "
                "whose DNS answer lists the replicas)"
            )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _check_ipport(where: str, value: str | None) -> None:
    if value is None:
        return
    try:
        host, port = split_hostport(value)
    except ValueError:
        host, port = "", None
    if not host or port is None or not 0 < port < 65536:
        raise _fail(f"{where}: expected ip:port, got {value!r}")


def validate(cfg: GatewayConfig) -> GatewayConfig:
    """Semantic checks msgspec's type validation cannot express. Returns ``cfg`` unchanged."""
    parse_listen(cfg.listen)
    cfg.endpoints()
    if not 1 <= cfg.workers <= max_workers():
        raise _fail(f"workers: 1..{max_workers()} (4 per CPU on this machine), got {cfg.workers}")
    for i, cidr in enumerate(cfg.pool.allowed_cidrs):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError as exc:
            raise _fail(f"pool.allowed_cidrs[{i}]: {exc}") from exc
    seen: set[str] = set()
    for i, r in enumerate(cfg.routes):
        at = f"routes[{i}]"
        if not r.path.startswith("/"):
            raise _fail(f"{at}.path: must start with '/', got {r.path!r}")
        if r.path in seen:
            raise _fail(f"{at}.path: duplicate route {r.path!r}")
        seen.add(r.path)
        _check_route_values(at, r)
        _check_target(f"{at}.bbr.endpoint", r.bbr.endpoint, allow_embedded=False)
        _check_target(f"{at}.epp.endpoint", r.epp.endpoint, allow_embedded=True)
        _check_ipport(f"{at}.default_upstream", r.default_upstream)
        if r.epp.enabled and r.epp.endpoint is None:
            raise _fail(
                f"{at}.epp.endpoint: required when epp.enabled (use 'embedded' for the in-process picker)"
            )
        if (r.epp.cert_file is None) != (r.epp.key_file is None):
            raise _fail(f"{at}.epp: cert_file and key_file go together (client certificate for mTLS)")
        _check_backends(at, r.backends)
    _check_numbers(cfg)
    redis = cfg.picker.sync_redis
    if redis is not None and not redis.startswith(REDIS_SCHEMES):
        raise _fail(
            f"picker.sync_redis: expected redis://HOST:PORT/DB, rediss://... or unix:///PATH, got {redis!r}"
        )
    if not cfg.metrics_path.startswith("/"):
        raise _fail(f"metrics_path: must start with '/', got {cfg.metrics_path!r}")
    return cfg


_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
"""The characters of an HTTP header name (RFC 9110 ``token``)."""


def _check_route_values(at: str, r: RouteConfig) -> None:
    """A route's numbers and header names, each error naming its key."""
    if r.bbr.max_body_size < 0:
        raise _fail(f"{at}.bbr.max_body_size: must be >= 0, got {r.bbr.max_body_size}")
    if r.bbr.chunk_size <= 0:
        raise _fail(f"{at}.bbr.chunk_size: must be > 0, got {r.bbr.chunk_size}")
    for key, value in (("bbr.timeout_ms", r.bbr.timeout_ms), ("epp.timeout_ms", r.epp.timeout_ms)):
        if value <= 0:
            raise _fail(f"{at}.{key}: must be > 0, got {value}")
    for key, name in (("bbr.header_name", r.bbr.header_name), ("epp.header_name", r.epp.header_name)):
        if not name or not set(name) <= _TOKEN_CHARS:
            raise _fail(f"{at}.{key}: expected an HTTP header name (letters, digits, '-'), got {name!r}")
    if any(ord(c) < 32 or ord(c) == 127 for c in r.bbr.default_model):
        raise _fail(f"{at}.bbr.default_model: control characters cannot go into a header")


# section -> (keys that must be > 0, keys that must be >= 1, keys that must be >= 0)
_NUMBERS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "picker": (("refresh_interval", "staleness_threshold", "sync_interval"), (), ()),
    "limits": (
        ("body_read_timeout", "header_read_timeout", "idle_timeout"),
        ("max_concurrent_requests", "max_header_bytes", "max_headers", "max_requests_per_connection",
         "max_connections"),
        (),
    ),
    "timeouts": (("connect", "response_headers", "read_idle"), (), ()),
    "upstream": (("keepalive_timeout",), (), ("max_connections_per_upstream",)),
}  # fmt: skip


def _check_numbers(cfg: GatewayConfig) -> None:
    for section, (positive, at_least_one, non_negative) in _NUMBERS.items():
        values = getattr(cfg, section)
        for keys, low, rule in (
            (positive, 0.0, "> 0"),
            (at_least_one, 1.0, ">= 1"),
            (non_negative, 0.0, ">= 0"),
        ):
            for key in keys:
                v = getattr(values, key)
                if not (v > low if rule == "> 0" else v >= low):  # NaN fails too
                    raise _fail(f"{section}.{key}: must be {rule}, got {v}")


def _check_backends(at: str, backends: Sequence[BackendConfig]) -> None:
    for j, b in enumerate(backends):
        if b.weight < 0:
            raise _fail(f"{at}.backends[{j}].weight: must be >= 0, got {b.weight}")
    if backends and not any(b.weight > 0 for b in backends):
        raise _fail(f"{at}.backends: at least one backend needs a weight > 0")
    for j, b in enumerate(backends):
        where = f"{at}.backends[{j}]"
        parse_endpoints([msgspec.to_builtins(e) for e in b.endpoints], f"{where}.endpoints")
        _check_ipport(f"{where}.default_upstream", b.default_upstream)
        if not b.epp.enabled:
            continue
        if b.epp.endpoint in (None, EMBEDDED):
            raise _fail(
                f"{where}.epp.endpoint: a backend needs a remote picker (host:port), got {b.epp.endpoint!r}"
            )
        _check_target(f"{where}.epp.endpoint", b.epp.endpoint, allow_embedded=False)
        if b.epp.timeout_ms <= 0:
            raise _fail(f"{where}.epp.timeout_ms: must be > 0")


def check_nginx_mode(cfg: GatewayConfig) -> None:
    """NGINX proxies model servers over HTTP/1.1 (plain h2c only through ``grpc_pass``): an
    ``app_protocol: h2c`` pool or backend is a configuration error in ``--mode nginx``, naming the key."""
    where = ["pool.app_protocol"] if cfg.pool.app_protocol == "h2c" else []
    for i, r in enumerate(cfg.routes):
        where += [
            f"routes[{i}].backends[{j}].app_protocol"
            for j, b in enumerate(r.backends)
            if b.app_protocol == "h2c"
        ]
    if where:
        raise _fail(
            f"{where[0]}: h2c is not supported with --mode nginx (NGINX cannot proxy plain HTTP/2 cleartext "
            "to model servers); use --mode gateway or app_protocol: http"
        )


def _sections() -> frozenset[str]:
    """Top-level keys that hold a section (a struct), not a value."""
    return frozenset(
        f.name
        for f in msgspec.structs.fields(GatewayConfig)
        if isinstance(f.type, type) and issubclass(f.type, msgspec.Struct)
    )


def parse_config(data: Any, source: str = "config") -> GatewayConfig:
    """Validate already-loaded YAML/JSON data (a mapping) into a :class:`GatewayConfig`."""
    if data is None:
        data = {}
    if isinstance(data, dict):  # a section left empty (``picker:`` with its keys commented out): its defaults
        data = {k: v for k, v in data.items() if not (v is None and k in _SECTIONS)}
    try:
        cfg = msgspec.convert(data, GatewayConfig)
    except msgspec.ValidationError as exc:
        raise _fail(f"{source}: {exc}") from exc
    if source == "config":
        return validate(cfg)
    try:
        return validate(cfg)
    except ConfigError as exc:  # name the file the key is in
        raise _fail(f"{source}: {exc.message}") from exc


_SECTIONS = _sections()


def load_config_text(text: str, source: str = "config") -> GatewayConfig:
    """Parse YAML text."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise _fail(f"{source}: invalid YAML: {exc}") from exc
    return parse_config(data, source)


def load_config(path: str | Path, *, check_files: bool = True) -> GatewayConfig:
    """Read and validate a gateway YAML file (and, with ``check_files``, that the files it names exist)."""
    p = Path(path)
    cfg = _resolve_relative(load_config_text(read_text_file(p, str(p)), str(p)), p.parent)
    if check_files:
        _check_files(cfg, str(p))
    return cfg


def _check_files(cfg: GatewayConfig, source: str) -> None:
    """Every file the config names is a readable file (paths already resolved against the config's directory):
    a typo shows at start, naming the key, not at the first request."""
    named: list[tuple[str, str | None]] = [("picker.config_file", cfg.picker.config_file)]
    for i, r in enumerate(cfg.routes):
        for section, tls in (("bbr", r.bbr), ("epp", r.epp)):
            named += [
                (f"routes[{i}].{section}.{k}", getattr(tls, k)) for k in ("ca_file", "cert_file", "key_file")
            ]
    for key, value in named:
        if value is None:
            continue
        if not os.path.isfile(value):
            what = "is a directory" if os.path.isdir(value) else "no such file"
            raise _fail(f"{source}: {key}: {what}: {value}")
        if not os.access(value, os.R_OK):
            raise _fail(f"{source}: {key}: cannot read {value} (permission denied)")


def _resolve_relative(cfg: GatewayConfig, base: Path) -> GatewayConfig:
    """Files named in the config are relative to the config file's directory."""

    def fix(v: str | None) -> str | None:
        return v if v is None or Path(v).is_absolute() else str(base / v)

    picker = msgspec.structs.replace(cfg.picker, config_file=fix(cfg.picker.config_file))
    routes = [
        msgspec.structs.replace(
            r,
            epp=msgspec.structs.replace(
                r.epp,
                ca_file=fix(r.epp.ca_file),
                cert_file=fix(r.epp.cert_file),
                key_file=fix(r.epp.key_file),
            ),
            bbr=msgspec.structs.replace(
                r.bbr,
                ca_file=fix(r.bbr.ca_file),
                cert_file=fix(r.bbr.cert_file),
                key_file=fix(r.bbr.key_file),
            ),
        )
        for r in cfg.routes
    ]
    return msgspec.structs.replace(cfg, picker=picker, routes=routes)


def default_config(
    endpoints: Sequence[Endpoint] = (),
    listen: str = DEFAULT_LISTEN,
    *,
    path: str = "/",
    picker_config_file: str | None = None,
) -> GatewayConfig:
    """The embedded default: one route ``path`` with in-process BBR and the embedded picker over
    ``endpoints``."""
    cfg = GatewayConfig(
        listen=listen,
        pool=PoolConfig(
            endpoints=[
                EndpointConfig(name=e.name, address=e.address, port=e.port, labels=dict(e.labels))
                for e in endpoints
            ]
        ),
        picker=PickerConfig(config_file=picker_config_file),
        routes=[RouteConfig(path=path)],
    )
    return validate(cfg)


def with_listen(cfg: GatewayConfig, listen: str | None) -> GatewayConfig:
    """``--listen`` overrides the file."""
    if listen is None:
        return cfg
    parse_listen(listen)
    return msgspec.structs.replace(cfg, listen=listen)


def target_of(value: str) -> tuple[str, bool | None]:
    """Split an ext_proc endpoint into (gRPC target, tls) where tls is True/False for an explicit scheme.
    A comma list of ``ip:port`` (picker replicas) becomes one ``ipv4:``/``ipv6:`` target: the channel
    balances streams over the replicas that are up (round robin)."""
    tls: bool | None = None
    for scheme, flag in (("https://", True), ("http://", False)):
        if value.startswith(scheme):
            value, tls = value[len(scheme) :], flag
    value = value.rstrip("/")
    if "," in value:
        items = [v.strip() for v in value.split(",")]
        value = ("ipv6:" if items[0].startswith("[") else "ipv4:") + ",".join(items)
    return value, tls


__all__ = [
    "DEFAULT_LISTEN",
    "EMBEDDED",
    "AppProtocol",
    "BBRConfig",
    "BackendConfig",
    "EPPConfig",
    "EndpointConfig",
    "GatewayConfig",
    "LimitsConfig",
    "PickerConfig",
    "PoolConfig",
    "RouteConfig",
    "TimeoutsConfig",
    "UpstreamConfig",
    "check_nginx_mode",
    "default_config",
    "hostport",
    "load_config",
    "load_config_text",
    "parse_config",
    "parse_listen",
    "target_of",
    "validate",
    "with_listen",
]
