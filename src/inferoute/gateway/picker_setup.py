"""Builds and owns the pickers and remote-BBR clients of one process, and one :class:`RouteDecider` per route.

* ``epp.endpoint: embedded`` → one in-process picker (:func:`inferoute.epp.assembly.start_picker`) shared
  by all routes of the process, registered on the gateway's registry so ``/metrics`` shows its series too.
* a gRPC target → an :class:`inferoute.extproc.client.GrpcPicker`; routes with identical settings share
  one, so one long-lived HTTP/2 channel serves every request (never a channel per request).
* ``bbr.endpoint`` set → an :class:`inferoute.extproc.bbr_client.RemoteBBR`, shared the same way.

With ``--workers N`` each worker process builds its own set: an embedded picker's learned state (prefix index,
in-flight counts) is then per process. A remote ``inferoute epp`` keeps one brain for every worker.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from inferoute.clock import Clock
from inferoute.endpoints import Endpoint
from inferoute.gateway.bbr import ModelReader
from inferoute.gateway.config import EMBEDDED, BBRConfig, EPPConfig, GatewayConfig, target_of
from inferoute.gateway.destinations import AllowList, routing_header_names
from inferoute.gateway.routing import ModelExtractor, RouteDecider
from inferoute.picking import Picker

if TYPE_CHECKING:  # imported lazily at run time: a gateway without remote pickers never loads gRPC
    from inferoute.extproc.channel import ChannelOptions

log = logging.getLogger(__name__)


async def start_embedded_picker(
    cfg: GatewayConfig, endpoints: list[Endpoint], registry: CollectorRegistry
) -> Picker:
    """The EPP's director in process (no gRPC hop)."""
    from inferoute.epp.assembly import EppOptions, start_picker

    opts = EppOptions(
        config_file=cfg.picker.config_file,
        config_text=cfg.picker.config_text,
        endpoints=endpoints,
        endpoints_file=None,
        refresh_interval=cfg.picker.refresh_interval,
        staleness_threshold=cfg.picker.staleness_threshold,
        registry=registry,
        pool_name=cfg.picker.pool_name,
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


class Deciders:
    """Every route's decider for one process; owns (and closes) the pickers and BBR clients."""

    def __init__(
        self, cfg: GatewayConfig, deciders: list[RouteDecider], owned: list[Any], embedded: Picker | None
    ) -> None:
        self.cfg = cfg
        self.deciders = deciders
        self._owned = owned
        self.embedded = embedded

    @classmethod
    async def build(
        cls,
        cfg: GatewayConfig,
        registry: CollectorRegistry,
        *,
        embedded_factory: EmbeddedFactory = start_embedded_picker,
        clock: Clock | None = None,
    ) -> Deciders:
        """Start what the routes need. ``embedded_factory`` is injectable (tests use a tiny picker)."""
        endpoints = cfg.endpoints()
        allow = AllowList(
            endpoints,
            cfg.pool.allowed_cidrs,
            extra=[r.default_upstream for r in cfg.routes if r.default_upstream],
        )
        names = routing_header_names(r.epp.header_name for r in cfg.routes)
        owned: list[Any] = []
        embedded: Picker | None = None
        remote_pickers: dict[tuple[object, ...], Picker] = {}
        bbrs: dict[tuple[object, ...], ModelExtractor] = {}
        deciders: list[RouteDecider] = []
        reader = ModelReader()  # one per process: its parser buffers grow to the largest body seen
        try:
            for route in cfg.routes:
                picker: Picker | None = None
                epp = route.epp
                if epp.enabled and epp.endpoint == EMBEDDED:
                    if embedded is None:
                        embedded = await embedded_factory(cfg, endpoints, registry)
                        owned.append(embedded)
                    picker = embedded
                elif epp.enabled:
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
                    if key not in remote_pickers:
                        remote_pickers[key] = grpc_picker(epp)
                        owned.append(remote_pickers[key])
                    picker = remote_pickers[key]
                bbr_client: ModelExtractor | None = None
                b = route.bbr
                if b.enabled and b.endpoint:
                    bkey = (
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
                    if bkey not in bbrs:
                        bbrs[bkey] = remote_bbr(b)
                        owned.append(bbrs[bkey])
                    bbr_client = bbrs[bkey]
                deciders.append(
                    RouteDecider(
                        route,
                        endpoints,
                        picker,
                        allow=allow,
                        routing_headers=names,
                        remote_bbr=bbr_client,
                        clock=clock,
                        model_reader=reader,
                    )
                )
        except BaseException:
            await _close_all(owned)
            raise
        return cls(cfg, deciders, owned, embedded)

    def for_path(self, path: str) -> RouteDecider | None:
        """The decider of the longest matching route prefix."""
        best: RouteDecider | None = None
        for d in self.deciders:
            if path.startswith(d.route.path) and (best is None or len(d.route.path) > len(best.route.path)):
                best = d
        return best

    async def ready(self) -> bool:
        """True when the embedded picker (if any) reports ready."""
        if self.embedded is None:
            return True
        probe = getattr(self.embedded, "ready", None)
        if probe is None:
            return True
        result = probe()
        if inspect.isawaitable(result):
            result = await result
        return bool(result)

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
