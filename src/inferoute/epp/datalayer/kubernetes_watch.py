"""InferencePool discovery, the I/O shell: list-then-watch loops over lightkube, feeding the pure reconcile.

Theory of operation. :class:`KubernetesSource` is an :class:`~inferoute.epp.datalayer.sources.EndpointSource`.
``initial()`` only loads the cluster configuration (so "no cluster" is a start-up error) and returns no
endpoints; ``watch(emit)`` runs two loops under one TaskGroup, one for the InferencePool (by name) and one for
the pods of its namespace, each keeping an :class:`~inferoute.epp.datalayer.kubernetes.ObjectCache`. After
every change the endpoints are recomputed with :func:`~inferoute.epp.datalayer.kubernetes.pool_endpoints` and
emitted when they differ from the last emission.

Each loop is the reflector pattern: LIST (a consistent snapshot and its resourceVersion), then WATCH from that
resourceVersion, so nothing that happens between the two is lost; lightkube itself re-opens a watch that the
server closed cleanly, from the last resourceVersion seen. A watch that fails with 410 Gone (the version is
too old) lists again at once; any other failure (connection refused or cut, 5xx, 403) waits with exponential
backoff and lists again. Listing replaces the cache, so objects deleted while no watch ran disappear too.
As a safety net against a connection that dies silently, every watch is re-listed after ``resync`` seconds.

Like the reference picker, the pod loop watches every pod of the pool's namespace and applies the pool's
selector itself: a selector change then needs no new watch, and the RBAC needed is list/watch on pods.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

import httpx2
from lightkube import ApiError, AsyncClient, ConfigError, KubeConfig
from lightkube.core.client import FieldSelector
from lightkube.core.exceptions import NotReadyError
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.core_v1 import Pod

from inferoute.endpoints import Endpoint
from inferoute.epp.datalayer.kubernetes import (
    POOL_GROUP,
    POOL_VERSION,
    ObjectCache,
    PoolSpec,
    PoolSpecError,
    parse_pool,
    pod_info,
    pool_endpoints,
)
from inferoute.errors import ConfigError as StartupConfigError

log = logging.getLogger(__name__)

InferencePool = create_namespaced_resource(POOL_GROUP, POOL_VERSION, "InferencePool", "inferencepools")

Emit = Callable[[list[Endpoint]], None]


def load_kube_config(kubeconfig: str | None = None) -> KubeConfig:
    """The standard places, in order: ``kubeconfig`` if given, the in-cluster service account, ``KUBECONFIG``,
    ``~/.kube/config``. Raises a one-line :class:`InferouteError` (cause ``config``) when none works."""
    try:
        if kubeconfig:
            return KubeConfig.from_file(kubeconfig)
        return KubeConfig.from_env()
    except ConfigError as exc:
        raise StartupConfigError(
            "no Kubernetes cluster configuration: not in a pod with a service account, and "
            f"{kubeconfig or 'KUBECONFIG / ~/.kube/config'} is missing or unusable ({exc})"
        ) from exc
    except (OSError, ValueError, KeyError) as exc:
        raise StartupConfigError(f"Kubernetes configuration {kubeconfig or 'KUBECONFIG'}: {exc}") from exc


def api_status(exc: BaseException) -> tuple[int, str] | None:
    """(HTTP status, the API's message) of an API error response, None for transport errors.

    lightkube decodes the Status body only when the Content-Type is exactly ``application/json``; other
    answers (``...; charset=utf-8``, proxies) arrive as plain ``HTTPStatusError`` and are read here.
    """
    if isinstance(exc, ApiError) and exc.status is not None:
        return int(exc.status.code or 0), str(exc.status.message or "")
    if isinstance(exc, httpx2.HTTPStatusError):
        try:
            body = exc.response.json()
            message = str(body.get("message", "")) if isinstance(body, dict) else ""
        except (ValueError, httpx2.ResponseNotRead):
            message = ""
        return exc.response.status_code, message
    return None


def describe_api_error(exc: BaseException, what: str, namespace: str) -> str:
    """One line saying what failed and what to do about it."""
    status = api_status(exc)
    if status is None:
        return f"Kubernetes API unreachable while watching {what}: {type(exc).__name__}: {exc}"
    code, msg = status
    msg = " ".join(msg.split())
    if code in (401, 403):
        return (
            f"forbidden to list/watch {what} in namespace {namespace}: grant the picker's service account "
            f"get/list/watch on {what} (RBAC): {msg}"
        )
    if code == 404 and what == "inferencepools":
        return f"the InferencePool API ({POOL_GROUP}/{POOL_VERSION}) is not installed in the cluster: {msg}"
    if code == 404:
        return f"{what}: the API (CRD) is not installed in the cluster; retrying slowly"
    return f"Kubernetes API error {code} on {what}: {msg}"


class Backoff:
    """Exponential backoff: ``initial`` doubling up to ``cap`` seconds; ``reset`` after a success."""

    def __init__(self, initial: float = 0.1, cap: float = 5.0) -> None:
        self.initial, self.cap = initial, cap
        self._next = initial

    def next(self) -> float:
        delay = self._next
        self._next = min(self.cap, self._next * 2)
        return delay

    def reset(self) -> None:
        self._next = self.initial


def _as_dict(obj: Any) -> Mapping[str, Any]:
    out = obj.to_dict()
    assert isinstance(out, dict)
    return out


class ListWatch:
    """One resource's list-then-watch loop into an :class:`ObjectCache` (see module docstring)."""

    def __init__(
        self,
        client: AsyncClient,
        resource: Any,
        what: str,
        namespace: str,
        on_change: Callable[[], None],
        *,
        name: str | None = None,
        resync: float = 300.0,
        backoff: Backoff | None = None,
    ) -> None:
        self.client, self.resource, self.what, self.namespace = client, resource, what, namespace
        self.name = name
        self.on_change = on_change
        self.cache = ObjectCache()
        self.resync = resync
        self.backoff = backoff or Backoff()
        self.synced = asyncio.Event()
        """Set after the first successful list."""
        self.lists = 0
        self._last_error = ""

    def _fields(self) -> FieldSelector | None:
        return {"metadata.name": self.name} if self.name else None

    def _wanted(self, obj: Mapping[str, Any]) -> bool:
        # Servers that ignore fieldSelector (and test emulators) still must not leak other objects in.
        return self.name is None or (obj.get("metadata") or {}).get("name") == self.name

    async def _list(self) -> None:
        items = self.client.list(self.resource, namespace=self.namespace, fields=self._fields())
        objs = [d async for o in items if self._wanted(d := _as_dict(o))]
        try:
            version: str | None = items.resourceVersion
        except NotReadyError:
            version = None
        changed = self.cache.replace(objs, version)
        self.lists += 1
        self.synced.set()
        if changed or self.lists == 1:
            self.on_change()

    async def _watch(self) -> None:
        stream = self.client.watch(
            self.resource,
            namespace=self.namespace,
            fields=self._fields(),
            resource_version=self.cache.resource_version,
            server_timeout=int(self.resync),
        )
        async with asyncio.timeout(self.resync + 30):
            async for event_type, obj in stream:
                d = _as_dict(obj)
                if self._wanted(d) and self.cache.apply(event_type, d):
                    self.on_change()

    async def run(self) -> None:
        """List, watch, and again after each failure; until cancelled."""
        while True:
            try:
                await self._list()
                if self._last_error:
                    log.info("watching %s in %s again", self.what, self.namespace)
                    self._last_error = ""
                self.backoff.reset()
                await self._watch()
            except TimeoutError:
                continue  # resync: list again
            except (httpx2.HTTPError, httpx2.StreamError, OSError) as exc:
                status = api_status(exc)
                if status is not None and status[0] == 410:  # resourceVersion too old: list again at once
                    log.debug("%s watch expired (410 Gone); listing again", self.what)
                    continue
                await self._failed(exc)

    async def _failed(self, exc: BaseException) -> None:
        message = describe_api_error(exc, self.what, self.namespace)
        delay = self.backoff.next()
        if message != self._last_error:
            log.error("%s; retrying (backoff up to %.0f s)", message, self.backoff.cap)
            self._last_error = message
        await asyncio.sleep(delay)


class KubernetesSource:
    """Endpoints from an InferencePool and its pods (see module docstring)."""

    def __init__(
        self,
        pool_name: str,
        namespace: str,
        *,
        kubeconfig: str | None = None,
        resync: float = 300.0,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.pool_name = pool_name
        self.namespace = namespace
        self.kubeconfig = kubeconfig
        self.resync = resync
        self._on_error = on_error
        self._config: KubeConfig | None = None
        self._emit: Emit | None = None
        self._last: list[Endpoint] | None = None
        self._pool_state = ""
        self.pool: PoolSpec | None = None
        self.pools: ListWatch | None = None
        self.pods: ListWatch | None = None

    def initial(self) -> list[Endpoint]:
        self._config = load_kube_config(self.kubeconfig)
        return []

    async def watch(self, emit: Emit) -> None:
        config = self._config or load_kube_config(self.kubeconfig)
        self._emit = emit
        client = AsyncClient(config=config, namespace=self.namespace, trust_env=False)
        self.pools = ListWatch(
            client, InferencePool, "inferencepools", self.namespace, self._changed, name=self.pool_name,
            resync=self.resync,
        )  # fmt: skip
        self.pods = ListWatch(client, Pod, "pods", self.namespace, self._changed, resync=self.resync)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.pools.run(), name="k8s-pool-watch")
                tg.create_task(self.pods.run(), name="k8s-pod-watch")
        finally:
            await client.close()

    def _read_pool(self) -> PoolSpec | None:
        assert self.pools is not None
        objs = list(self.pools.cache.objects.values())
        state, pool = "", None
        if not objs:
            state = (
                f"InferencePool {self.namespace}/{self.pool_name} not found; waiting for it "
                "(the picker reports not ready)"
            )
        else:
            try:
                pool = parse_pool(objs[0])
            except PoolSpecError as exc:
                state = f"{exc}; waiting for a usable spec (no endpoints)"
        if state != self._pool_state:
            if state:
                log.warning("%s", state)
                if self._on_error is not None:
                    self._on_error(state)
            elif pool is not None:
                log.info(
                    "InferencePool %s/%s found: ports %s", self.namespace, self.pool_name, pool.target_ports
                )
            self._pool_state = state
        return pool

    def _changed(self) -> None:
        assert self.pools is not None and self.pods is not None
        if not self.pools.synced.is_set():
            return
        self.pool = self._read_pool()
        if self.pool is not None and not self.pods.synced.is_set():
            return  # wait for the first pod list before saying "no endpoints"
        pods = [pod_info(p) for p in self.pods.cache.objects.values()]
        endpoints = pool_endpoints(self.pool, pods)
        if endpoints != self._last and self._emit is not None:
            self._last = endpoints
            self._emit(endpoints)
