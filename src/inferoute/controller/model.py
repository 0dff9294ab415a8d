"""Names and shapes the controller shares with the cluster: API groups, kinds, the controller name, and the
:class:`Snapshot` of watched objects that :func:`~inferoute.controller.translate.translate` reads."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

CONTROLLER_NAME = "inferoute.dev/gateway-controller"
"""The ``spec.controllerName`` of a GatewayClass that inferoute serves (and the ``controllerName`` it writes
into status)."""

GATEWAY_GROUP = "gateway.networking.k8s.io"
INFERENCE_GROUP = "inference.networking.k8s.io"

Obj = Mapping[str, Any]
"""A Kubernetes object as decoded JSON."""

Key = tuple[str, str]
"""(namespace, name); namespace is "" for cluster-scoped objects."""


@dataclass(frozen=True, slots=True)
class Kind:
    """One watched kind: how to address it in the API."""

    group: str
    version: str
    kind: str
    plural: str
    namespaced: bool = True


GATEWAY_CLASSES = Kind(GATEWAY_GROUP, "v1", "GatewayClass", "gatewayclasses", namespaced=False)
GATEWAYS = Kind(GATEWAY_GROUP, "v1", "Gateway", "gateways")
HTTP_ROUTES = Kind(GATEWAY_GROUP, "v1", "HTTPRoute", "httproutes")
INFERENCE_POOLS = Kind(INFERENCE_GROUP, "v1", "InferencePool", "inferencepools")
SERVICES = Kind("", "v1", "Service", "services")
PODS = Kind("", "v1", "Pod", "pods")
WATCHED = (GATEWAY_CLASSES, GATEWAYS, HTTP_ROUTES, INFERENCE_POOLS, SERVICES, PODS)


@dataclass(slots=True)
class Snapshot:
    """Every watched object, by kind plural and (namespace, name)."""

    objects: dict[str, dict[Key, Obj]] = field(default_factory=lambda: {k.plural: {} for k in WATCHED})

    def of(self, kind: Kind) -> dict[Key, Obj]:
        return self.objects.setdefault(kind.plural, {})

    def get(self, kind: Kind, namespace: str, name: str) -> Obj | None:
        return self.of(kind).get((namespace, name))


def key_of(obj: Obj) -> Key:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def spec(obj: Obj) -> Mapping[str, Any]:
    value = obj.get("spec")
    return value if isinstance(value, Mapping) else {}


__all__ = [
    "CONTROLLER_NAME",
    "GATEWAYS",
    "GATEWAY_CLASSES",
    "GATEWAY_GROUP",
    "HTTP_ROUTES",
    "INFERENCE_GROUP",
    "INFERENCE_POOLS",
    "PODS",
    "SERVICES",
    "WATCHED",
    "Key",
    "Kind",
    "Obj",
    "Snapshot",
    "key_of",
    "spec",
]
