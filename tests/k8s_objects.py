"""Kubernetes objects for the controller's tests, and their schema check.

Every builder returns a plain dict shaped as the API server would store it. :func:`check_schema` validates a
Gateway API / Inference Extension object against the OpenAPI schema of its CRD in ``deploy/crds/`` (the CRDs
the deploy manifests install), so a test never feeds the controller an object a real API server would refuse.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jsonschema
import yaml

CRDS = Path(__file__).resolve().parent.parent / "deploy" / "crds"


@functools.cache
def _schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> openAPIV3Schema, from every CRD file."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            out[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return out


def check_schema(obj: dict[str, Any]) -> dict[str, Any]:
    """Raise jsonschema.ValidationError unless ``obj`` fits its CRD's schema; returns ``obj``."""
    schema = _schemas()[(obj["apiVersion"], obj["kind"])]
    jsonschema.Draft7Validator(schema).validate(obj)
    return obj


def _meta(name: str, namespace: str | None, **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "generation": 1, **extra}
    if namespace is not None:
        meta["namespace"] = namespace
    return meta


def gateway_class(
    name: str = "inferoute", controller: str = "inferoute.dev/gateway-controller"
) -> dict[str, Any]:
    return check_schema(
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "GatewayClass",
            "metadata": _meta(name, None),
            "spec": {"controllerName": controller},
        }
    )


def gateway(name: str = "gw", ns: str = "default", cls: str = "inferoute", **listener: Any) -> dict[str, Any]:
    ls = {"name": "http", "protocol": "HTTP", "port": 80, **listener}
    return check_schema(
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": _meta(name, ns),
            "spec": {"gatewayClassName": cls, "listeners": [ls]},
        }
    )


def pool_ref(name: str, weight: int | None = None, **extra: Any) -> dict[str, Any]:
    ref: dict[str, Any] = {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": name}
    if weight is not None:
        ref["weight"] = weight
    ref.update(extra)
    return ref


def http_route(
    name: str,
    backends: list[dict[str, Any]],
    *,
    ns: str = "default",
    gateways: tuple[str, ...] = ("gw",),
    path: str = "/",
    created: str = "2026-01-01T00:00:00Z",
    matches: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    if matches is None:
        matches = [{"path": {"type": "PathPrefix", "value": path}}]
    return check_schema(
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": _meta(name, ns, creationTimestamp=created),
            "spec": {
                "parentRefs": [{"name": g} for g in gateways],
                "rules": [{"matches": matches, "backendRefs": backends}],
            },
        }
    )


def inference_pool(
    name: str,
    ports: list[int],
    *,
    ns: str = "default",
    app: str | None = None,
    picker: str | None = "picker",
    picker_port: int = 9002,
    failure_mode: str | None = None,
    app_protocol: str | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "selector": {"matchLabels": {"app": app or name}},
        "targetPorts": [{"number": p} for p in ports],
    }
    if picker is not None:
        spec["endpointPickerRef"] = {"name": picker, "port": {"number": picker_port}}
        if failure_mode:
            spec["endpointPickerRef"]["failureMode"] = failure_mode
    if app_protocol:
        spec["appProtocol"] = app_protocol
    return check_schema(
        {
            "apiVersion": "inference.networking.k8s.io/v1",
            "kind": "InferencePool",
            "metadata": _meta(name, ns),
            "spec": spec,
        }
    )


def service(
    name: str, port: int, *, ns: str = "default", cluster_ip: str = "127.0.0.1", type_: str = "ClusterIP"
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"type": type_, "clusterIP": cluster_ip, "ports": [{"name": "grpc", "port": port}]},
    }


def pod(
    name: str, app: str, *, ns: str = "default", ip: str = "127.0.0.1", ready: bool = True, **labels: str
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": app, **labels}},
        "spec": {"containers": [{"name": "server", "image": "model-server"}]},
        "status": {
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }
