"""Builds and owns the pickers and remote-BBR clients of one process, and one :class:`RequestRouter` per
route.

* ``epp.endpoint: embedded`` → one in-process picker (:func:`inferoute.epp.assembly.start_picker`) shared
  by all routes of the process, registered on the gateway's registry so ``/metrics`` shows its series too.
* a gRPC target → an :class:`inferoute.extproc.client.GrpcPicker`; routes with identical settings share
  one, so one long-lived HTTP/2 channel serves every request (never a channel per request).
* ``bbr.endpoint`` set → an :class:`inferoute.extproc.bbr_client.RemoteBBR`, shared the same way.

With ``--workers N`` each worker process builds its own set: an embedded picker's learned state (prefix index,
in-flight counts) is then per process. A remote ``inferoute epp`` keeps one brain for every worker.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec
from prometheus_client import CollectorRegistry

from inferoute.clock import Clock
from inferoute.endpoints import Endpoint, parse_endpoints
from inferoute.epp.requestcontrol.parse import BodyParser
from inferoute.gateway.config import EMBEDDED, BBRConfig, EPPConfig, GatewayConfig, RouteConfig, target_of
from inferoute.gateway.destinations import PICKER_CONTROL, AllowList, routing_header_names
from inferoute.gateway.routing import ModelExtractor, RequestRouter
from inferoute.gateway.weighted import Router, WeightedRouter
from inferoute.picking import Picker

if TYPE_CHECKING:  # imported lazily at run time: a gateway without remote pickers never loads gRPC
    from inferoute.epp.sync.options import SyncOptions
    from inferoute.extproc.channel import ChannelOptions

log = logging.getLogger(__name__)


async def start_embedded_picker(
    cfg: GatewayConfig,
    endpoints: list[Endpoint],
    registry: CollectorRegistry,
    sync: SyncOptions | None = None,
) -> Picker:
    """The EPP's director in process (no gRPC hop). It shares what it learns through ``picker.sync_redis``
    when set, else through ``sync`` (the workers of one ``inferoute gateway --workers N``: shared memory)."""
    from inferoute.epp.assembly import EppOptions, start_picker
    from inferoute.epp.sync.options import SyncOptions

    pc = cfg.picker
    if pc.sync_redis is not None:
        sync = SyncOptions(interval=pc.sync_interval, redis_url=pc.sync_redis, namespace=pc.pool_name)
    opts = EppOptions(
        config_file=cfg.picker.config_file,
        config_text=cfg.picker.config_text,
        endpoints=endpoints,
        endpoints_file=None,
        refresh_interval=cfg.picker.refresh_interval,
        staleness_threshold=cfg.picker.staleness_threshold,
        registry=registry,
        pool_name=cfg.picker.pool_name,
        sync=sync,
    )
    return await start_picker(opts)


def _channel_options(
    endpoint: str, tls: bool, ca: str | None, cert: str | None, key: str | None, server_name: str | None
) -> ChannelOptions:
    from inferoute.extproc.channel import ChannelOptions

    target, explicit_tls = target_of(endpoint)
    return ChannelOptions(
        target,
        tls=tls if explicit_tls is None else explicit_tls,
        ca_file=ca,
        cert_file=cert,
        key_file=key,
        server_name=server_name,
    )


def grpc_picker(epp: EPPConfig) -> Picker:
    """An ext_proc client for ``epp.endpoint``."""
    from inferoute.extproc.client import GrpcPicker

    assert epp.endpoint is not None
    opts = _channel_options(epp.endpoint, epp.tls, epp.ca_file, epp.cert_file, epp.key_file, epp.server_name)
    return GrpcPicker(opts, timeout_ms=epp.timeout_ms, body_mode=epp.body, header_name=epp.header_name)


def remote_bbr(bbr: BBRConfig) -> ModelExtractor:
    """A streaming ext_proc BBR client for ``bbr.endpoint``."""
    from inferoute.extproc.bbr_client import RemoteBBR

    assert bbr.endpoint is not None
    opts = _channel_options(bbr.endpoint, bbr.tls, bbr.ca_file, bbr.cert_file, bbr.key_file, bbr.server_name)
    return RemoteBBR(opts, header_name=bbr.header_name, chunk_size=bbr.chunk_size, timeout_ms=bbr.timeout_ms)


EmbeddedFactory = Callable[[GatewayConfig, list[Endpoint], CollectorRegistry], Awaitable[Picker]]


class _Clients:
    """The pickers and remote-BBR clients of one :class:`RouteTable`, shared between routes (and backends)
    with identical settings, so one long-lived channel serves them all."""

    def __init__(
        self,
        cfg: GatewayConfig,
        registry: CollectorRegistry,
        embedded_factory: EmbeddedFactory,
    ) -> None:
        self.cfg = cfg
        self.registry = registry
        self.embedded_factory = embedded_factory
        self.owned: list[Any] = []
        self.embedded: Picker | None = None
        self._pickers: dict[tuple[object, ...], Picker] = {}
        self._bbrs: dict[tuple[object, ...], ModelExtractor] = {}

    async def picker(self, epp: EPPConfig, endpoints: list[Endpoint]) -> Picker | None:
        if not epp.enabled:
            return None
        if epp.endpoint == EMBEDDED:
            if self.embedded is None:
                self.embedded = await self.embedded_factory(self.cfg, endpoints, self.registry)
                self.owned.append(self.embedded)
            return self.embedded
        key = (
            epp.endpoint,
            epp.tls,
            epp.ca_file,
            epp.cert_file,
            epp.key_file,
            epp.server_name,
            epp.timeout_ms,
            epp.body,
            epp.header_name,
        )
        if key not in self._pickers:
            self._pickers[key] = grpc_picker(epp)
            self.owned.append(self._pickers[key])
        return self._pickers[key]

    def bbr(self, b: BBRConfig) -> ModelExtractor | None:
        if not (b.enabled and b.endpoint):
            return None
        key = (
            b.endpoint,
            b.tls,
            b.ca_file,
            b.cert_file,
            b.key_file,
            b.server_name,
            b.header_name,
            b.chunk_size,
            b.timeout_ms,
        )
        if key not in self._bbrs:
            self._bbrs[key] = remote_bbr(b)
            self.owned.append(self._bbrs[key])
        return self._bbrs[key]


class RouteTable:
    """Every route's router for one process; owns (and closes) the pickers and BBR clients.

    ``active`` counts the requests using this set: after a configuration reload the gateway closes the old
    set only once its ``active`` count has dropped to zero (in-flight requests keep their pickers)."""

    def __init__(
        self,
        cfg: GatewayConfig,
        route_table: list[Router],
        owned: list[Any],
        embedded: Picker | None,
    ) -> None:
        self.cfg = cfg
        self.route_table = route_table
        self._owned = owned
        self.embedded = embedded
        self.active = 0
        self.retired = False
        """Set when a reload replaced this set; ``drained`` is then set once ``active`` reaches zero."""
        self.drained = asyncio.Event()

    @classmethod
    async def build(
        cls,
        cfg: GatewayConfig,
        registry: CollectorRegistry,
        *,
        embedded_factory: EmbeddedFactory = start_embedded_picker,
        clock: Clock | None = None,
        embedded: Picker | None = None,
    ) -> RouteTable:
        """Start what the routes need. ``embedded_factory`` is injectable (tests use a tiny picker);
        ``embedded`` is a running embedded picker to use instead (a reload keeps it; the caller owns it)."""
        endpoints = cfg.endpoints()
        allow = AllowList(
            endpoints,
            cfg.pool.allowed_cidrs,
            extra=[r.default_upstream for r in cfg.routes if r.default_upstream],
        )
        names = routing_header_names(
            [r.epp.header_name for r in cfg.routes]
            + [b.epp.header_name for r in cfg.routes for b in r.backends]
        )
        clients = _Clients(cfg, registry, embedded_factory)
        clients.embedded = embedded
        route_table: list[Router] = []
        parser = BodyParser()  # one per process: its buffers grow to the largest body seen

        def router(
            route: RouteConfig,
            pool: list[Endpoint],
            allowed: AllowList,
            picker: Picker | None,
            app_protocol: str = cfg.pool.app_protocol,
        ) -> RequestRouter:
            return RequestRouter(
                route,
                pool,
                picker,
                allow=allowed,
                routing_headers=names,
                untrusted=frozenset() if route.trust_client_headers else PICKER_CONTROL,
                remote_bbr=clients.bbr(route.bbr),
                clock=clock,
                body_parser=parser,
                app_protocol=app_protocol,
            )

        try:
            for route in cfg.routes:
                if not route.backends:
                    route_table.append(
                        router(route, endpoints, allow, await clients.picker(route.epp, endpoints))
                    )
                    continue
                weighted: list[tuple[int, Router]] = []
                for b in route.backends:
                    pool = parse_endpoints([msgspec.to_builtins(e) for e in b.endpoints], "backend")
                    sub = msgspec.structs.replace(
                        route, epp=b.epp, default_upstream=b.default_upstream, backends=[]
                    )
                    extra = [b.default_upstream] if b.default_upstream else []
                    own = AllowList(pool, cfg.pool.allowed_cidrs, extra=extra)
                    picker = await clients.picker(b.epp, pool)
                    weighted.append((b.weight, router(sub, pool, own, picker, b.app_protocol)))
                route_table.append(WeightedRouter(route, weighted))
        except BaseException:
            await _close_all(clients.owned)
            raise
        return cls(cfg, route_table, clients.owned, clients.embedded)

    def for_path(self, path: str) -> Router | None:
        """The router of the longest matching route prefix."""
        best: Router | None = None
        for d in self.route_table:
            if path.startswith(d.route.path) and (best is None or len(d.route.path) > len(best.route.path)):
                best = d
        return best

    async def ready(self) -> bool:
        """True when every picker (embedded, or remote: a health check) reports ready -- fail-closed."""
        pickers = {id(p): p for p in (self.embedded, *self._owned) if p is not None}  # pickers, BBR clients
        for picker in pickers.values():
            probe = getattr(picker, "ready", None)
            if probe is None:
                continue
            result = probe()
            if inspect.isawaitable(result):
                result = await result
            if not result:
                return False
        return True

    def hand_over_embedded(self, successor: RouteTable) -> None:
        """A reload kept the embedded picker: ``successor`` closes it from now on, this set does not."""
        picker = self.embedded
        if picker is not None and picker is successor.embedded:
            self._owned = [o for o in self._owned if o is not picker]
            successor._owned.append(picker)

    async def aclose(self) -> None:
        await _close_all(self._owned)
        self._owned = []


async def _close_all(objs: list[Any]) -> None:
    for obj in reversed(objs):
        close = getattr(obj, "aclose", None) or getattr(obj, "close", None)
        if close is None:
            continue
        try:
            result = close()
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("closing %r failed", obj)
