"""InferencePool discovery, the pure part: (pool, pods) -> endpoints, and the watch caches.

The picker learns its endpoints the way the reference picker does: it watches one ``InferencePool``
(``inference.networking.k8s.io/v1``) and the pods of the pool's namespace, and every *Ready* pod that the
pool's ``spec.selector.matchLabels`` selects becomes one endpoint per ``spec.targetPorts`` entry (a
data-parallel rank per port: ``podIP:port``, named ``POD-rank-N``). A pod being deleted
(``metadata.deletionTimestamp`` set), without an IP, or not Ready is not an endpoint. The pod's labels travel
with the endpoint, so the label ``inference.networking.k8s.io/engine-type`` picks the metrics mapping.

Everything here is plain data and plain functions, tested without a cluster; the watch loops that feed them
live in :mod:`inferoute.epp.datalayer.kubernetes_watch`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from inferoute.endpoints import Endpoint

POOL_GROUP = "inference.networking.k8s.io"
POOL_VERSION = "v1"


class PoolSpecError(ValueError):
    """The InferencePool object cannot be used (the message names the field)."""


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """What the picker needs from an InferencePool."""

    namespace: str
    name: str
    selector: Mapping[str, str]
    target_ports: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class PodInfo:
    """What the picker needs from a pod."""

    namespace: str
    name: str
    ip: str
    labels: Mapping[str, str] = field(default_factory=dict)
    ready: bool = False
    deleting: bool = False


def parse_pool(obj: Mapping[str, Any]) -> PoolSpec:
    """Read an InferencePool (the API's JSON) into a :class:`PoolSpec`; :class:`PoolSpecError` if unusable.

    The API server validates against the CRD schema already; this re-checks only what the picker relies on,
    so a hand-made object or an older CRD version fails with a message instead of a KeyError.
    """
    meta = obj.get("metadata") or {}
    spec = obj.get("spec")
    where = f"InferencePool {meta.get('namespace', '?')}/{meta.get('name', '?')}"
    if not isinstance(spec, Mapping):
        raise PoolSpecError(f"{where}: spec missing")
    selector = spec.get("selector")
    labels = selector.get("matchLabels") if isinstance(selector, Mapping) else None
    if not isinstance(labels, Mapping) or not labels:
        raise PoolSpecError(f"{where}: spec.selector.matchLabels must be a non-empty mapping")
    ports: list[int] = []
    for i, entry in enumerate(spec.get("targetPorts") or ()):
        number = entry.get("number") if isinstance(entry, Mapping) else None
        if not isinstance(number, int) or isinstance(number, bool) or not 0 < number < 65536:
            raise PoolSpecError(f"{where}: spec.targetPorts[{i}].number must be an integer 1-65535")
        if number not in ports:
            ports.append(number)
    if not ports:
        raise PoolSpecError(f"{where}: spec.targetPorts needs at least one entry")
    return PoolSpec(
        namespace=str(meta.get("namespace") or ""),
        name=str(meta.get("name") or ""),
        selector={str(k): str(v) for k, v in labels.items()},
        target_ports=tuple(ports),
    )


def pod_info(obj: Mapping[str, Any]) -> PodInfo:
    """Read a pod (the API's JSON) into a :class:`PodInfo`."""
    meta = obj.get("metadata") or {}
    status = obj.get("status") or {}
    ready = any(
        isinstance(c, Mapping) and c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or ()
    )
    return PodInfo(
        namespace=str(meta.get("namespace") or ""),
        name=str(meta.get("name") or ""),
        ip=str(status.get("podIP") or ""),
        labels={str(k): str(v) for k, v in (meta.get("labels") or {}).items()},
        ready=ready,
        deleting=bool(meta.get("deletionTimestamp")),
    )


def selects(pool: PoolSpec, pod: PodInfo) -> bool:
    """The pool's selector matches the pod (same namespace, every matchLabels pair present)."""
    if pod.namespace and pool.namespace and pod.namespace != pool.namespace:
        return False
    return all(pod.labels.get(k) == v for k, v in pool.selector.items())


def pool_endpoints(pool: PoolSpec | None, pods: Iterable[PodInfo]) -> list[Endpoint]:
    """The reconcile step: the endpoints of ``pool`` given the pods of its namespace, sorted by key.

    No pool (not found yet, or deleted) means no endpoints.
    """
    if pool is None:
        return []
    out: list[Endpoint] = []
    for pod in pods:
        if not (pod.ready and pod.ip and not pod.deleting and selects(pool, pod)):
            continue
        for rank, port in enumerate(pool.target_ports):
            out.append(Endpoint(f"{pod.name}-rank-{rank}", pod.ip, port, pod.labels))
    out.sort(key=lambda ep: (ep.address, ep.port))
    return out


class ObjectCache:
    """The objects of one list+watch, by ``namespace/name``, with the resourceVersion to resume from.

    ``replace`` takes a full list (deletions that happened while no watch ran show up as absent objects);
    ``apply`` takes one watch event. Both return True when the cached set changed.
    """

    def __init__(self) -> None:
        self.objects: dict[str, Mapping[str, Any]] = {}
        self.resource_version: str | None = None

    @staticmethod
    def key(obj: Mapping[str, Any]) -> str:
        meta = obj.get("metadata") or {}
        return f"{meta.get('namespace') or ''}/{meta.get('name') or ''}"

    def replace(self, items: Iterable[Mapping[str, Any]], resource_version: str | None) -> bool:
        new = {self.key(o): o for o in items}
        changed = new != self.objects
        self.objects = new
        self.resource_version = resource_version or None
        return changed

    def apply(self, event_type: str, obj: Mapping[str, Any]) -> bool:
        """One watch event (ADDED, MODIFIED, DELETED, BOOKMARK)."""
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if rv:
            self.resource_version = str(rv)
        if event_type == "BOOKMARK":
            return False
        key = self.key(obj)
        if event_type == "DELETED":
            return self.objects.pop(key, None) is not None
        if self.objects.get(key) == obj:
            return False
        self.objects[key] = obj
        return True
