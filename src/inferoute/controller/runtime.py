"""The controller's I/O shell: kopf watches fill a cache, one reconciler translates and writes.

* :class:`ClusterCache`: the latest version of every watched object. kopf's ``on.event`` handlers (one per
  kind) only store or drop the object and wake the reconciler; kopf owns the watches (re-list after an expired
  resourceVersion, reconnects with backoff). kopf runs *standalone* (no peering objects), without posting
  Kubernetes Events and without scanning namespaces or CRDs, so its RBAC needs are exactly list/watch on the
  six kinds.
* :func:`prime`: one LIST per kind through lightkube before the first translation, so a starting controller
  never writes a gateway configuration from a half-seen cluster (which would briefly drop routes).
* :class:`Reconciler`: on each wake-up (bursts collapsed by ``debounce``) runs the pure
  :func:`~inferoute.controller.translate.translate` and writes what changed: gateway YAML to every
  :class:`ConfigSink` (a ConfigMap, a file) and status merge patches. A failed write is retried after
  ``retry`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import httpx2 as httpx
import kopf
import yaml
from lightkube import ALL_NS, AsyncClient
from lightkube.generic_resource import create_global_resource, create_namespaced_resource
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import ConfigMap, Pod, Service
from lightkube.types import PatchType

from inferoute.controller.model import WATCHED, Key, Kind, Snapshot, key_of
from inferoute.controller.translate import Options, StatusUpdate, translate

log = logging.getLogger(__name__)

CONFIG_KEY = "gateway.yaml"
"""The ConfigMap key (and file name suffix) holding a gateway's configuration."""


def config_map_name(gateway: str) -> str:
    """The ConfigMap the controller writes for Gateway ``gateway`` (in the Gateway's namespace)."""
    return f"inferoute-gateway-{gateway}"


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ClusterCache:
    """Latest version of every watched object; ``changed`` is set on every update."""

    def __init__(self) -> None:
        self.snapshot = Snapshot()
        self.changed = asyncio.Event()

    def on_event(self, kind: Kind, event: Mapping[str, Any]) -> None:
        obj = event.get("object")
        if not isinstance(obj, Mapping):
            return
        objects = self.snapshot.of(kind)
        if event.get("type") == "DELETED":
            objects.pop(key_of(obj), None)
        else:
            objects[key_of(obj)] = dict(obj)
        self.changed.set()


def api_resources() -> dict[str, Any]:
    """lightkube resource classes by kind plural."""
    out: dict[str, Any] = {"pods": Pod, "services": Service}
    for kind in WATCHED:
        if kind.plural in out:
            continue
        make = create_namespaced_resource if kind.namespaced else create_global_resource
        out[kind.plural] = make(kind.group, kind.version, kind.kind, kind.plural)
    return out


async def prime(cache: ClusterCache, client: AsyncClient) -> None:
    """Fill ``cache`` with one LIST per watched kind."""
    resources = api_resources()
    for kind in WATCHED:
        res = resources[kind.plural]
        listing = client.list(res, namespace=ALL_NS) if kind.namespaced else client.list(res)
        async for item in listing:
            obj = item.to_dict()
            cache.snapshot.of(kind)[key_of(obj)] = obj
    cache.changed.set()


def http_status(exc: httpx.HTTPStatusError) -> int:
    """The HTTP status of a failed API call (lightkube raises its ``ApiError`` only for answers typed exactly
    ``application/json``; other error answers arrive as the HTTP library's own error)."""
    return exc.response.status_code


class ConfigSink(Protocol):
    async def write(self, gateway: Key, text: str) -> None: ...


class FileSink:
    """Writes ``DIR/NAMESPACE.NAME.gateway.yaml`` atomically (a temporary file renamed into place), so a
    gateway watching the file never reads half of it."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def path_for(self, gateway: Key) -> Path:
        return self.directory / f"{gateway[0]}.{gateway[1]}.{CONFIG_KEY}"

    async def write(self, gateway: Key, text: str) -> None:
        target = self.path_for(gateway)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".yaml")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


class ConfigMapSink:
    """Writes ``inferoute-gateway-NAME`` in the Gateway's namespace (merge patch, created when missing)."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client

    async def write(self, gateway: Key, text: str) -> None:
        ns, name = gateway
        cm = config_map_name(name)
        data = {"data": {CONFIG_KEY: text}}
        try:
            await self.client.patch(ConfigMap, cm, data, namespace=ns, patch_type=PatchType.MERGE)
        except httpx.HTTPStatusError as exc:
            if http_status(exc) != 404:
                raise
            labels = {"app.kubernetes.io/managed-by": "inferoute"}
            obj = ConfigMap(metadata=ObjectMeta(name=cm, namespace=ns, labels=labels), data=data["data"])
            await self.client.create(obj)


class StatusWriter:
    """Merge patches on the ``status`` subresource."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self._resources = api_resources()

    async def write(self, update: StatusUpdate) -> None:
        res = self._resources[update.kind.plural]
        ns = update.namespace or None
        try:
            await self.client.patch(
                res.Status, update.name, {"status": update.status}, namespace=ns, patch_type=PatchType.MERGE
            )
        except httpx.HTTPStatusError as exc:
            if http_status(exc) != 404:  # deleted meanwhile: nothing to report on
                raise


class Reconciler:
    """Translate the cache and write what changed (see the module docstring)."""

    def __init__(
        self,
        cache: ClusterCache,
        opts: Options,
        sinks: Sequence[ConfigSink],
        status: StatusWriter | None,
        *,
        now: Callable[[], str] = utc_now,
        debounce: float = 0.05,
        retry: float = 1.0,
    ) -> None:
        self.cache = cache
        self.opts = opts
        self.sinks = list(sinks)
        self.status = status
        self.now = now
        self.debounce = debounce
        self.retry = retry
        self.written: dict[Key, str] = {}
        self.passes = 0

    async def reconcile_once(self) -> bool:
        """One translation and its writes; False when a write failed (the next pass retries it)."""
        result = translate(self.cache.snapshot, self.opts, self.now())
        self.passes += 1
        ok = True
        for key, cfg in result.configs.items():
            text = yaml.safe_dump(cfg, sort_keys=False)
            if self.written.get(key) == text:
                continue
            try:
                for sink in self.sinks:
                    await sink.write(key, text)
            except (httpx.HTTPError, OSError) as exc:
                log.error("writing the configuration of Gateway %s/%s failed: %s", *key, exc)
                ok = False
                continue
            self.written[key] = text
            log.info("Gateway %s/%s: configuration written (%d routes)", *key, len(cfg["routes"]))
        if self.status is not None:
            for update in result.statuses:
                try:
                    await self.status.write(update)
                except httpx.HTTPError as exc:
                    log.error("status of %s %s/%s: %s", update.kind.kind, update.namespace, update.name, exc)
                    ok = False
        return ok

    async def run(self) -> None:
        """Reconcile after every change, forever (cancel to stop)."""
        while True:
            await self.cache.changed.wait()
            await asyncio.sleep(self.debounce)  # one pass for a burst of events
            self.cache.changed.clear()
            if not await self.reconcile_once():
                await asyncio.sleep(self.retry)
                self.cache.changed.set()


def kopf_registry(cache: ClusterCache, login: Callable[..., Any] | None = None) -> kopf.OperatorRegistry:
    """kopf handlers that feed ``cache``; ``login`` replaces the in-cluster / kubeconfig login (tests)."""
    registry = kopf.OperatorRegistry()

    def default_login(**kwargs: Any) -> Any:
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    kopf.on.login(registry=registry)(login or default_login)
    for kind in WATCHED:

        def handler(event: Mapping[str, Any], _kind: Kind = kind, **_: Any) -> None:
            cache.on_event(_kind, event)

        kopf.on.event(kind.group, kind.version, kind.plural, registry=registry, id=f"cache-{kind.plural}")(
            handler
        )
    return registry


def kopf_settings() -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    settings.posting.enabled = False  # no Kubernetes Events: no RBAC for them
    settings.scanning.disabled = True  # no namespace/CRD watching: the kinds are fixed
    settings.watching.reconnect_backoff = 0.5
    return settings


async def run_controller(
    opts: Options,
    client: AsyncClient,
    sinks: Sequence[ConfigSink],
    *,
    write_status: bool = True,
    login: Callable[..., Any] | None = None,
    stop: asyncio.Event | None = None,
    ready: Callable[[Reconciler], None] | None = None,
) -> None:
    """Prime, reconcile once, then watch (kopf) and reconcile on every change until ``stop`` is set."""
    cache = ClusterCache()
    await prime(cache, client)
    reconciler = Reconciler(cache, opts, sinks, StatusWriter(client) if write_status else None)
    cache.changed.clear()
    await reconciler.reconcile_once()
    if ready is not None:
        ready(reconciler)
    stop = stop or asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        work = tg.create_task(reconciler.run(), name="controller:reconcile")
        await kopf.operator(
            registry=kopf_registry(cache, login),
            settings=kopf_settings(),
            standalone=True,
            clusterwide=True,
            stop_flag=stop,
        )
        work.cancel()


__all__ = [
    "CONFIG_KEY",
    "ClusterCache",
    "ConfigMapSink",
    "ConfigSink",
    "FileSink",
    "Reconciler",
    "StatusWriter",
    "config_map_name",
    "kopf_registry",
    "kopf_settings",
    "prime",
    "run_controller",
    "utc_now",
]
