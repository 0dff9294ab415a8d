"""Cluster objects -> gateway configurations + status (pure: no I/O, the time is passed in).

Rules, following the Gateway API and the Inference Extension (GIE) conformance suite:

* A **GatewayClass** is ours when ``spec.controllerName`` is the controller's name: ``Accepted=True``.
* A **Gateway** of such a class gets one gateway configuration and ``Accepted``/``Programmed=True``, with one
  status entry per listener (HTTP listeners only; ``attachedRoutes`` counted). Listener hostnames are not
  matched: every route attached to the Gateway serves every host.
* An **HTTPRoute** attaches to our Gateways named in its ``parentRefs`` when a listener admits its namespace
  (``allowedRoutes.namespaces.from``: ``Same``, the default, or ``All``; ``Selector`` is not supported)
  and the ``sectionName``, if any, names a listener. Each rule match must be a ``PathPrefix`` (or no
  match: ``/``); other match types give ``Accepted=False`` / ``UnsupportedValue``. Each backendRef must be
  an InferencePool in the route's namespace: a missing pool gives ``ResolvedRefs=False`` /
  ``BackendNotFound`` (its share of the requests is answered 503), another kind ``InvalidKind``, another
  namespace ``RefNotPermitted`` (no ReferenceGrant support). The backendRef ``port`` is ignored for pools,
  as GIE requires.
* Two rules with the same path: the older route wins (creation time, then namespace/name), as the Gateway API
  orders conflicts.
* An **InferencePool** named by an attached route gets one ``status.parents[]`` entry per Gateway:
  ``Accepted=True`` (both ``appProtocol`` values the CRD allows are served), ``ResolvedRefs=True``, or
  ``False``/``InvalidExtensionRef`` when the picker Service is missing, is an ExternalName Service, or lacks
  the referenced port. Entries written by other controllers are kept; ours are removed when no route uses the
  pool any more.
* The pool's backend in the gateway configuration: its Ready pods (not terminating, with an IP) that match
  ``selector.matchLabels`` in its namespace, one endpoint per ``targetPorts`` entry; its picker at the
  Service's cluster IP (or ``NAME.NAMESPACE.svc`` for a headless Service) and ``endpointPickerRef.port``;
  ``failureMode: FailOpen`` -> ``failure_mode_allow``; ``appProtocol: kubernetes.io/h2c`` ->
  ``app_protocol: h2c`` (the gateway speaks HTTP/2 cleartext to the pods; ``http`` or none: HTTP/1.1). Without
  ``endpointPickerRef`` the gateway round-robins over the pods. With an invalid picker reference: FailOpen
  round-robins, FailClose answers 503.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from inferoute.controller.model import (
    CONTROLLER_NAME,
    GATEWAY_CLASSES,
    GATEWAY_GROUP,
    GATEWAYS,
    HTTP_ROUTES,
    INFERENCE_GROUP,
    INFERENCE_POOLS,
    PODS,
    SERVICES,
    Key,
    Kind,
    Obj,
    Snapshot,
    key_of,
    spec,
)
from inferoute.controller.status import condition, current_status, normal_ref, previous_conditions
from inferoute.endpoints import hostport

H2C = "kubernetes.io/h2c"


@dataclass(frozen=True, slots=True)
class Options:
    """How the controller writes gateway configurations."""

    controller_name: str = CONTROLLER_NAME
    listen: str = "0.0.0.0:8080"
    """Where the gateway pods listen (the gateway Service maps each listener port to it)."""
    picker_tls: bool = False
    """Reach pickers over TLS (``https://``), verified against ``picker_ca_file``."""
    picker_ca_file: str | None = None
    picker_timeout_ms: int = 2000
    allowed_cidrs: tuple[str, ...] = ()
    """Extra destinations every pool's picker may return (e.g. the pod CIDR), see the gateway's
    ``pool.allowed_cidrs``."""


@dataclass(frozen=True, slots=True)
class StatusUpdate:
    """A merge patch for one object's ``status`` subresource."""

    kind: Kind
    namespace: str
    name: str
    status: dict[str, Any]


@dataclass(slots=True)
class Result:
    configs: dict[Key, dict[str, Any]] = field(default_factory=dict)
    """Gateway (namespace, name) -> the gateway YAML document (a mapping ``parse_config`` accepts)."""
    statuses: list[StatusUpdate] = field(default_factory=list)
    """Only the objects whose status must change."""


@dataclass(slots=True)
class _Attached:
    """An HTTPRoute's outcome on one Gateway."""

    gateway: Key
    ref: Mapping[str, Any]
    accepted: tuple[bool, str, str]
    resolved: tuple[bool, str, str]
    rules: list[tuple[str, list[tuple[int, Key | None, str]]]] = field(default_factory=list)
    """(path, [(weight, pool key or None when unresolved, name)])."""


def translate(snap: Snapshot, opts: Options, now: str) -> Result:
    """The whole picture: see the module docstring."""
    out = Result()
    classes = _classes(snap, opts, now, out)
    gateways = {
        k: gw for k, gw in sorted(snap.of(GATEWAYS).items()) if spec(gw).get("gatewayClassName") in classes
    }
    attached = _attach_routes(snap, gateways, opts, now, out)
    pool_parents: dict[Key, set[Key]] = {}
    for att_list in attached.values():
        for att in att_list:
            if not att.accepted[0]:
                continue
            for _, rules in att.rules:
                for _, pool, _ in rules:
                    if pool is not None:
                        pool_parents.setdefault(pool, set()).add(att.gateway)
    backends = _pools(snap, pool_parents, opts, now, out)
    for gkey, gw in gateways.items():
        routes = [a for lst in attached.values() for a in lst if a.gateway == gkey and a.accepted[0]]
        out.configs[gkey] = _gateway_config(routes, backends, opts)
        _gateway_status(gw, routes, now, out)
    return out


def _classes(snap: Snapshot, opts: Options, now: str, out: Result) -> set[str]:
    ours: set[str] = set()
    for (_, name), gc in sorted(snap.of(GATEWAY_CLASSES).items()):
        if spec(gc).get("controllerName") != opts.controller_name:
            continue
        ours.add(name)
        old = current_status(gc).get("conditions") or []
        conds = [
            condition("Accepted", True, "Accepted", "handled by inferoute", obj=gc, now=now, previous=old)
        ]
        _emit(out, GATEWAY_CLASSES, gc, {"conditions": conds})
    return ours


def _emit(out: Result, kind: Kind, obj: Obj, status: dict[str, Any]) -> None:
    """Queue a status patch when ``status`` differs from the object's current one in the keys it sets."""
    cur = current_status(obj)
    if any(cur.get(k) != v for k, v in status.items()):
        ns, name = key_of(obj)
        out.statuses.append(StatusUpdate(kind, ns, name, status))


def _route_order(item: tuple[Key, Obj]) -> tuple[str, Key]:
    return str((item[1].get("metadata") or {}).get("creationTimestamp") or ""), item[0]


def _attach_routes(
    snap: Snapshot, gateways: Mapping[Key, Obj], opts: Options, now: str, out: Result
) -> dict[Key, list[_Attached]]:
    """Every HTTPRoute's attachments to our Gateways, with its status written."""
    result: dict[Key, list[_Attached]] = {}
    for rkey, route in sorted(snap.of(HTTP_ROUTES).items(), key=_route_order):
        ns = rkey[0]
        mine: list[_Attached] = []
        for ref in spec(route).get("parentRefs") or []:
            group, kind, gns, gname = normal_ref(ref, ns)
            gw = gateways.get((gns, gname))
            if group != GATEWAY_GROUP or kind != "Gateway" or gw is None:
                continue
            att = _Attached(
                (gns, gname), ref, (True, "Accepted", "attached"), (True, "ResolvedRefs", "resolved")
            )
            att.accepted = _admitted(gw, ref, ns)
            _rules(route, ns, snap, att)
            mine.append(att)
        result[rkey] = mine
        if mine or _has_our_entries(route, opts):
            _route_status(route, ns, mine, opts, now, out)
    return result


def _admitted(gw: Obj, ref: Mapping[str, Any], route_ns: str) -> tuple[bool, str, str]:
    """Whether a listener of ``gw`` admits a route from ``route_ns`` (and names ``sectionName``, if given)."""
    section = ref.get("sectionName")
    listeners = [ls for ls in spec(gw).get("listeners") or [] if section in (None, ls.get("name"))]
    if not listeners:
        return False, "NoMatchingParent", f"the Gateway has no listener named {section!r}"
    gw_ns = key_of(gw)[0]
    for ls in listeners:
        frm = ((ls.get("allowedRoutes") or {}).get("namespaces") or {}).get("from", "Same")
        if frm == "All" or (frm == "Same" and route_ns == gw_ns):
            return True, "Accepted", "attached to the Gateway"
    return False, "NotAllowedByListeners", "no listener admits routes from this namespace"


def _rules(route: Obj, ns: str, snap: Snapshot, att: _Attached) -> None:
    """Paths and resolved backends of every rule; sets ``att.accepted``/``att.resolved`` on failures."""
    for rule in spec(route).get("rules") or []:
        paths: list[str] = []
        for match in rule.get("matches") or [{}]:
            path = match.get("path") or {"type": "PathPrefix", "value": "/"}
            extra = sorted(k for k in match if k != "path")
            if path.get("type", "PathPrefix") != "PathPrefix" or extra:
                what = extra or [f"path type {path.get('type')}"]
                att.accepted = (
                    False,
                    "UnsupportedValue",
                    f"only PathPrefix matches are supported, not {what}",
                )
                continue
            paths.append(str(path.get("value") or "/"))
        backends: list[tuple[int, Key | None, str]] = []
        for ref in rule.get("backendRefs") or []:
            weight = int(ref.get("weight", 1))
            name = str(ref.get("name") or "")
            ref_ns = str(ref.get("namespace") or ns)
            if ref.get("group") != INFERENCE_GROUP or ref.get("kind") != "InferencePool":
                att.resolved = (
                    False,
                    "InvalidKind",
                    f"backendRef {name!r}: only InferencePool backends are supported",
                )
                backends.append((weight, None, f"{ref_ns}/{name}"))
            elif ref_ns != ns:
                att.resolved = (
                    False,
                    "RefNotPermitted",
                    f"InferencePool {ref_ns}/{name} is in another namespace",
                )
                backends.append((weight, None, f"{ref_ns}/{name}"))
            elif snap.get(INFERENCE_POOLS, ns, name) is None:
                att.resolved = (False, "BackendNotFound", f"InferencePool {ns}/{name} not found")
                backends.append((weight, None, f"{ns}/{name}"))
            else:
                backends.append((weight, (ns, name), f"{ns}/{name}"))
        if backends and any(w > 0 for w, _, _ in backends):
            att.rules.extend((p, backends) for p in paths)


def _has_our_entries(obj: Obj, opts: Options) -> bool:
    return any(
        p.get("controllerName") == opts.controller_name for p in current_status(obj).get("parents") or []
    )


def _route_status(
    route: Obj, ns: str, mine: Sequence[_Attached], opts: Options, now: str, out: Result
) -> None:
    old = list(current_status(route).get("parents") or [])
    parents = [p for p in old if p.get("controllerName") != opts.controller_name]
    for att in mine:
        prev = previous_conditions(old, att.ref, ns)
        parents.append(
            {
                "parentRef": dict(att.ref),
                "controllerName": opts.controller_name,
                "conditions": [
                    condition("Accepted", *att.accepted, obj=route, now=now, previous=prev),
                    condition("ResolvedRefs", *att.resolved, obj=route, now=now, previous=prev),
                ],
            }
        )
    _emit(out, HTTP_ROUTES, route, {"parents": parents})


def _pools(
    snap: Snapshot, pool_parents: Mapping[Key, set[Key]], opts: Options, now: str, out: Result
) -> dict[Key, dict[str, Any]]:
    """Each used pool's backend (without weight) and every pool's status."""
    backends: dict[Key, dict[str, Any]] = {}
    for pkey, pool in sorted(snap.of(INFERENCE_POOLS).items()):
        parents = sorted(pool_parents.get(pkey, set()))
        if not parents and not _has_our_entries(pool, opts):
            continue
        epp, resolved = _picker(pool, snap, opts)
        accepted = (True, "Accepted", "routed by inferoute's gateway")
        backends[pkey] = _backend(pool, snap, epp, serving=resolved[0] or epp is not None)
        if spec(pool).get("appProtocol") == H2C:  # the CRD's enum: http (the default) or kubernetes.io/h2c
            backends[pkey]["app_protocol"] = "h2c"
        old = list(current_status(pool).get("parents") or [])
        entries = [p for p in old if p.get("controllerName") != opts.controller_name]
        for gns, gname in parents:
            ref = {"group": GATEWAY_GROUP, "kind": "Gateway", "namespace": gns, "name": gname}
            prev = previous_conditions(old, ref, pkey[0])
            conds = [
                condition("Accepted", *accepted, obj=pool, now=now, previous=prev),
                condition("ResolvedRefs", *resolved, obj=pool, now=now, previous=prev),
            ]
            entries.append({"parentRef": ref, "controllerName": opts.controller_name, "conditions": conds})
        _emit(out, INFERENCE_POOLS, pool, {"parents": entries})
    return backends


def _picker(pool: Obj, snap: Snapshot, opts: Options) -> tuple[dict[str, Any] | None, tuple[bool, str, str]]:
    """The pool's ``epp`` settings (None: round robin) and its ResolvedRefs condition."""
    ns = key_of(pool)[0]
    ref = spec(pool).get("endpointPickerRef") or {}
    fail_open = ref.get("failureMode") == "FailOpen"
    bad = {"enabled": False} if fail_open else None  # FailOpen: round robin; FailClose: nothing (503)
    if not ref:
        return {"enabled": False}, (True, "ResolvedRefs", "no endpointPickerRef: round robin over the pods")
    name = str(ref.get("name") or "")
    if ref.get("group", "") not in ("", None) or ref.get("kind", "Service") != "Service":
        return bad, (False, "InvalidExtensionRef", "endpointPickerRef must name a core Service")
    svc = snap.get(SERVICES, ns, name)
    if svc is None:
        return bad, (False, "InvalidExtensionRef", f"picker Service {ns}/{name} not found")
    if spec(svc).get("type") == "ExternalName":
        return bad, (
            False,
            "InvalidExtensionRef",
            f"picker Service {ns}/{name} is ExternalName (not supported)",
        )
    port = (ref.get("port") or {}).get("number")
    if not isinstance(port, int) or port not in [p.get("port") for p in spec(svc).get("ports") or []]:
        return bad, (False, "InvalidExtensionRef", f"picker Service {ns}/{name} has no port {port}")
    host = str(spec(svc).get("clusterIP") or "")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        host = f"{name}.{ns}.svc"
    scheme = "https" if opts.picker_tls else "http"
    epp: dict[str, Any] = {
        "endpoint": f"{scheme}://{hostport(host, int(port))}",
        "timeout_ms": opts.picker_timeout_ms,
        "failure_mode_allow": fail_open,
        "body": "full_duplex",
    }
    if opts.picker_tls:
        epp.update(ca_file=opts.picker_ca_file, server_name=f"{name}.{ns}.svc")
    return epp, (True, "ResolvedRefs", f"picker Service {ns}/{name} port {port}")


def _ready(pod: Obj) -> bool:
    st = current_status(pod)
    if (pod.get("metadata") or {}).get("deletionTimestamp") or not st.get("podIP"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in st.get("conditions") or [])


def _backend(pool: Obj, snap: Snapshot, epp: dict[str, Any] | None, serving: bool) -> dict[str, Any]:
    """The pool as a gateway backend; ``serving`` False (or no ``epp``) gives an empty one (503)."""
    ns, name = key_of(pool)
    if not serving or epp is None:
        return {"name": f"{ns}/{name}", "epp": {"enabled": False}, "endpoints": []}
    selector = (spec(pool).get("selector") or {}).get("matchLabels") or {}
    ports = [int(p["number"]) for p in spec(pool).get("targetPorts") or [] if "number" in p]
    endpoints: list[dict[str, Any]] = []
    for (pns, pod_name), pod in sorted(snap.of(PODS).items()):
        labels = (pod.get("metadata") or {}).get("labels") or {}
        if pns != ns or not _ready(pod) or any(labels.get(k) != v for k, v in selector.items()):
            continue
        ip = str(current_status(pod)["podIP"])
        for port in ports:
            endpoints.append(
                {
                    "name": pod_name if len(ports) == 1 else f"{pod_name}:{port}",
                    "address": ip,
                    "port": port,
                    "namespace": ns,
                    "labels": {str(k): str(v) for k, v in labels.items()},
                }
            )
    return {"name": f"{ns}/{name}", "epp": epp, "endpoints": endpoints}


def _gateway_config(
    routes: Sequence[_Attached], backends: Mapping[Key, dict[str, Any]], opts: Options
) -> dict[str, Any]:
    """The gateway YAML for one Gateway: one route per path, the first (oldest) route's rule winning."""
    by_path: dict[str, list[dict[str, Any]]] = {}
    for att in routes:
        for path, refs in att.rules:
            if path in by_path:
                continue
            chosen = []
            for weight, pool, name in refs:
                backend = backends.get(pool) if pool else None
                if backend is None:  # unresolved reference: its share of the requests gets 503
                    backend = {"name": name, "epp": {"enabled": False}, "endpoints": []}
                chosen.append({**backend, "weight": weight})
            by_path[path] = chosen
    return {
        "listen": opts.listen,
        "pool": {"allowed_cidrs": list(opts.allowed_cidrs)},
        "routes": [
            {"path": path, "epp": {"enabled": False}, "backends": by_path[path]} for path in sorted(by_path)
        ],
    }


def _gateway_status(gw: Obj, routes: Sequence[_Attached], now: str, out: Result) -> None:
    old = current_status(gw)
    prev = old.get("conditions") or []
    conds = [
        condition("Accepted", True, "Accepted", "handled by inferoute", obj=gw, now=now, previous=prev),
        condition(
            "Programmed", True, "Programmed", "gateway configuration written", obj=gw, now=now, previous=prev
        ),
    ]
    old_listeners = {ls.get("name"): ls.get("conditions") or [] for ls in old.get("listeners") or []}
    listeners = []
    for ls in spec(gw).get("listeners") or []:
        name = ls.get("name")
        attached = sum(1 for a in routes if a.ref.get("sectionName") in (None, name))
        http = ls.get("protocol") == "HTTP"
        p = old_listeners.get(name, [])
        reason, message = (
            ("Accepted", "HTTP listener") if http else ("UnsupportedProtocol", "only HTTP is supported")
        )
        listeners.append(
            {
                "name": name,
                "supportedKinds": [{"group": GATEWAY_GROUP, "kind": "HTTPRoute"}] if http else [],
                "attachedRoutes": attached if http else 0,
                "conditions": [
                    condition("Accepted", http, reason, message, obj=gw, now=now, previous=p),
                    condition(
                        "Programmed",
                        http,
                        "Programmed" if http else "Invalid",
                        message,
                        obj=gw,
                        now=now,
                        previous=p,
                    ),
                    condition(
                        "ResolvedRefs", True, "ResolvedRefs", "no references", obj=gw, now=now, previous=p
                    ),
                ],
            }
        )
    _emit(out, GATEWAYS, gw, {"conditions": conds, "listeners": listeners})


__all__ = ["H2C", "Options", "Result", "StatusUpdate", "translate"]
