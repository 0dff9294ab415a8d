"""Configuration reload without dropping requests (``inferoute gateway --watch-config``).

Why: in Kubernetes ``inferoute controller`` rewrites the gateway's configuration whenever a Gateway, an
HTTPRoute, an InferencePool, its picker Service or its pods change. Restarting the gateway for each change
would cut every streaming answer in flight. Instead:

1. :class:`ConfigWatcher` polls the file (a mounted ConfigMap is replaced atomically by the kubelet, a file
   the controller writes is renamed into place) and loads a changed file through the same validation as at
   start. A file that does not validate is logged, counted and ignored: the gateway keeps its last good
   configuration.
2. :meth:`Reloader.build` starts the new routes' pickers (a new
   :class:`~inferoute.gateway.picker_setup.RouteTable`) before anything is swapped, so a failure leaves the
   running set untouched.
3. The gateway swaps its ``route_table`` reference: each request captured the set it started with, so new
   requests use the new routes and in-flight ones finish on the old set, pickers included.
4. :meth:`Reloader.retire` closes the old set once its last request has ended (its ``drained`` event).

What a reload changes: ``routes``, ``pool`` and the remote pickers. ``listen``, ``workers``, ``limits``,
``timeouts``, ``upstream``, ``access_log`` and ``metrics_path`` need a restart (a reload that changes them
logs a warning and applies the rest). An embedded picker is kept across reloads; a reload that changes its
``picker`` settings or the global ``pool`` it was started with is refused (its learned state and metrics
series belong to the running process).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter

from inferoute.clock import Clock
from inferoute.errors import ConfigError, InferouteError
from inferoute.gateway.config import EMBEDDED, GatewayConfig, load_config
from inferoute.gateway.picker_setup import EmbeddedFactory, RouteTable
from inferoute.tasks import TaskSet

log = logging.getLogger(__name__)

RESTART_ONLY = ("listen", "workers", "limits", "timeouts", "upstream", "access_log", "metrics_path")
"""Top-level keys a reload cannot change in a running process."""


def restart_only_changes(old: GatewayConfig, new: GatewayConfig) -> list[str]:
    """The :data:`RESTART_ONLY` keys whose values differ between ``old`` and ``new``."""
    return [k for k in RESTART_ONLY if getattr(old, k) != getattr(new, k)]


def uses_embedded(cfg: GatewayConfig) -> bool:
    return any(r.epp.enabled and r.epp.endpoint == EMBEDDED for r in cfg.routes)


class Reloader:
    """Builds the next :class:`RouteTable` of one gateway process and closes retired ones once drained."""

    def __init__(
        self, registry: CollectorRegistry, embedded_factory: EmbeddedFactory, clock: Clock | None
    ) -> None:
        self._registry = registry
        self._factory = embedded_factory
        self._clock = clock
        self._tasks = TaskSet("gateway-reload")
        self._retiring: list[RouteTable] = []

    async def build(self, current: RouteTable, cfg: GatewayConfig) -> RouteTable:
        """The route table for ``cfg``, reusing ``current``'s embedded picker; raises
        :class:`InferouteError`."""
        ignored = restart_only_changes(current.cfg, cfg)
        if ignored:
            log.warning(
                "config reload: %s changed; these take effect only after a restart", ", ".join(ignored)
            )
        kept = current.embedded if uses_embedded(cfg) else None
        if kept is not None and (cfg.picker, cfg.pool) != (current.cfg.picker, current.cfg.pool):
            raise ConfigError(
                "config reload: the embedded picker's settings (picker, pool) changed; restart the gateway"
            )
        new = await RouteTable.build(
            cfg, self._registry, embedded_factory=self._factory, clock=self._clock, embedded=kept
        )
        current.hand_over_embedded(new)
        return new

    def retire(self, old: RouteTable) -> None:
        """Close ``old`` once the requests that started on it have ended."""
        old.retired = True
        if not old.active:
            old.drained.set()
        self._retiring.append(old)
        self._tasks.spawn(self._close_when_drained(old), "retire")

    async def _close_when_drained(self, old: RouteTable) -> None:
        await old.drained.wait()
        self._retiring.remove(old)
        await old.aclose()

    async def aclose(self) -> None:
        await self._tasks.aclose()
        for old in self._retiring:
            await old.aclose()
        self._retiring.clear()


Apply = Callable[[GatewayConfig], Awaitable[None]]


class ConfigWatcher:
    """Polls a gateway config file every ``interval`` seconds and applies each new valid version once."""

    def __init__(
        self, path: str | Path, apply: Apply, registry: CollectorRegistry, interval: float = 1.0
    ) -> None:
        self.path = Path(path)
        self.interval = interval
        self._apply = apply
        self._digest: bytes | None = None
        self.reloads = Counter(
            "inferoute_gateway_config_reloads",
            "Configuration reloads by --watch-config, by result (ok, invalid, failed).",
            ["result"],
            registry=registry,
        )

    def prime(self) -> None:
        """Remember the file as it is now (the configuration the gateway started with)."""
        self._digest = self._read_digest()

    def _read_digest(self) -> bytes | None:
        try:
            return hashlib.sha256(self.path.read_bytes()).digest()
        except OSError:
            return None

    async def check(self) -> bool:
        """Reload if the file changed; True when a new configuration was applied."""
        digest = self._read_digest()
        if digest is None or digest == self._digest:
            return False
        self._digest = digest
        try:
            cfg = load_config(self.path)
        except InferouteError as exc:
            log.error("config reload: %s; keeping the running configuration", exc.message)
            self.reloads.labels("invalid").inc()
            return False
        try:
            await self._apply(cfg)
        except InferouteError as exc:
            log.error("%s; keeping the running configuration", exc.message)
            self.reloads.labels("failed").inc()
            return False
        log.info("config reload: %s applied (%d routes)", self.path, len(cfg.routes))
        self.reloads.labels("ok").inc()
        return True

    async def run(self) -> None:
        """Check forever (cancel to stop)."""
        while True:
            await asyncio.sleep(self.interval)
            await self.check()


__all__ = ["RESTART_ONLY", "ConfigWatcher", "Reloader", "restart_only_changes", "uses_embedded"]
