"""The controller's pure translation: cluster objects -> gateway configuration + status (GIE conformance
expectations, object by object). Every object fed in, and every object with the status written back, fits
its CRD's schema."""

from __future__ import annotations

import copy
from typing import Any

from inferoute.controller.model import (
    GATEWAY_CLASSES,
    GATEWAYS,
    HTTP_ROUTES,
    INFERENCE_POOLS,
    PODS,
    SERVICES,
    Kind,
    Snapshot,
    key_of,
)
from inferoute.controller.translate import Options, Result, translate
from inferoute.gateway.config import parse_config
from k8s_objects import (
    check_schema,
    gateway,
    gateway_class,
    http_route,
    inference_pool,
    pod,
    pool_ref,
    service,
)

NOW = "2026-12-04T12:00:00Z"
LATER = "2026-12-04T13:00:00Z"
KINDS = {"GatewayClass": GATEWAY_CLASSES, "Gateway": GATEWAYS, "HTTPRoute": HTTP_ROUTES}
KINDS |= {"InferencePool": INFERENCE_POOLS, "Service": SERVICES, "Pod": PODS}


def snapshot(*objs: dict[str, Any]) -> Snapshot:
    snap = Snapshot()
    for obj in objs:
        snap.of(KINDS[obj["kind"]])[key_of(obj)] = obj
    return snap


def base(*extra: dict[str, Any]) -> Snapshot:
    return snapshot(
        gateway_class(),
        gateway(),
        inference_pool("pool-a", [8000]),
        service("picker", 9002, cluster_ip="10.96.0.10"),
        pod("a-0", "pool-a", ip="10.0.0.1"),
        pod("a-1", "pool-a", ip="10.0.0.2"),
        pod("a-2", "pool-a", ip="10.0.0.3", ready=False),
        pod("other", "unrelated", ip="10.0.0.9"),
        *extra,
    )


def status_of(result: Result, kind: Kind, name: str, ns: str = "default") -> dict[str, Any]:
    for st in result.statuses:
        if st.kind == kind and st.name == name and st.namespace == ns:
            return st.status
    raise AssertionError(f"no status for {kind.kind} {name}")


def conditions(entry: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in entry["conditions"]}


def apply(snap: Snapshot, result: Result) -> Snapshot:
    """The snapshot after the status patches were written (each object re-validated against its CRD)."""
    new = copy.deepcopy(snap)
    for st in result.statuses:
        obj = dict(new.of(st.kind)[(st.namespace, st.name)])
        obj["status"] = {**(obj.get("status") or {}), **st.status}
        if st.kind not in (SERVICES, PODS):
            check_schema(obj)
        new.of(st.kind)[(st.namespace, st.name)] = obj
    return new


def test_accepted_pool_route_gateway_and_class() -> None:
    snap = base(http_route("r", [pool_ref("pool-a")]))
    result = translate(snap, Options(), NOW)
    cls = status_of(result, GATEWAY_CLASSES, "inferoute", ns="")
    assert conditions(cls) == {"Accepted": ("True", "Accepted")}
    gw = status_of(result, GATEWAYS, "gw")
    assert conditions(gw) == {"Accepted": ("True", "Accepted"), "Programmed": ("True", "Programmed")}
    assert gw["listeners"][0]["attachedRoutes"] == 1
    (route_parent,) = status_of(result, HTTP_ROUTES, "r")["parents"]
    assert conditions(route_parent) == {
        "Accepted": ("True", "Accepted"),
        "ResolvedRefs": ("True", "ResolvedRefs"),
    }
    (pool_parent,) = status_of(result, INFERENCE_POOLS, "pool-a")["parents"]
    assert pool_parent["parentRef"] == {
        "group": "gateway.networking.k8s.io",
        "kind": "Gateway",
        "namespace": "default",
        "name": "gw",
    }
    assert pool_parent["controllerName"] == "inferoute.dev/gateway-controller"
    assert conditions(pool_parent) == {
        "Accepted": ("True", "Accepted"),
        "ResolvedRefs": ("True", "ResolvedRefs"),
    }
    apply(snap, result)  # every status written fits the CRDs


def test_gateway_config_has_ready_pods_and_the_pickers_service() -> None:
    result = translate(base(http_route("r", [pool_ref("pool-a")], path="/v1/")), Options(), NOW)
    cfg = parse_config(result.configs[("default", "gw")])  # the gateway accepts what the controller writes
    (route,) = cfg.routes
    assert route.path == "/v1/"
    (backend,) = route.backends
    assert backend.name == "default/pool-a" and backend.weight == 1
    assert [(e.address, e.port) for e in backend.endpoints] == [("10.0.0.1", 8000), ("10.0.0.2", 8000)]
    assert backend.epp.endpoint == "http://10.96.0.10:9002"
    assert backend.epp.failure_mode_allow is False  # FailClose is the default
    assert backend.epp.body == "full_duplex"


def test_data_parallel_ports_are_one_endpoint_each() -> None:
    snap = base(
        http_route("r", [pool_ref("dp")]),
        inference_pool("dp", [3000, 3002, 3004]),
        pod("dp-0", "dp", ip="10.0.1.1"),
    )
    backend = translate(snap, Options(), NOW).configs[("default", "gw")]["routes"][0]["backends"][0]
    assert [(e["address"], e["port"], e["name"]) for e in backend["endpoints"]] == [
        ("10.0.1.1", 3000, "dp-0:3000"),
        ("10.0.1.1", 3002, "dp-0:3002"),
        ("10.0.1.1", 3004, "dp-0:3004"),
    ]


def test_missing_pool_is_backend_not_found_and_served_503() -> None:
    snap = base(http_route("r", [pool_ref("nope")]))
    result = translate(snap, Options(), NOW)
    (parent,) = status_of(result, HTTP_ROUTES, "r")["parents"]
    assert conditions(parent) == {
        "Accepted": ("True", "Accepted"),
        "ResolvedRefs": ("False", "BackendNotFound"),
    }
    (backend,) = result.configs[("default", "gw")]["routes"][0]["backends"]
    assert backend["endpoints"] == [] and backend["epp"] == {"enabled": False}  # the gateway answers 503


def test_missing_picker_service_is_invalid_extension_ref() -> None:
    snap = base(
        http_route("r", [pool_ref("pool-b")]),
        inference_pool("pool-b", [8000], picker="gone"),
        pod("b-0", "pool-b"),
    )
    result = translate(snap, Options(), NOW)
    (parent,) = status_of(result, INFERENCE_POOLS, "pool-b")["parents"]
    assert conditions(parent) == {
        "Accepted": ("True", "Accepted"),
        "ResolvedRefs": ("False", "InvalidExtensionRef"),
    }
    assert "gone" in parent["conditions"][1]["message"]
    (route_parent,) = status_of(result, HTTP_ROUTES, "r")["parents"]
    assert conditions(route_parent)["Accepted"] == ("True", "Accepted")
    (backend,) = result.configs[("default", "gw")]["routes"][0]["backends"]
    assert backend["endpoints"] == []  # FailClose: 5xx, as InferencePoolInvalidEPPService expects


def test_invalid_picker_with_fail_open_round_robins_over_the_pods() -> None:
    pool = inference_pool("pool-b", [8000], picker="gone", failure_mode="FailOpen")
    snap = base(http_route("r", [pool_ref("pool-b")]), pool, pod("b-0", "pool-b", ip="10.0.2.1"))
    (backend,) = translate(snap, Options(), NOW).configs[("default", "gw")]["routes"][0]["backends"]
    assert backend["epp"] == {"enabled": False}
    assert [e["address"] for e in backend["endpoints"]] == ["10.0.2.1"]


def test_external_name_and_wrong_port_are_invalid_references() -> None:
    for svc, word in [
        (service("picker", 9002, type_="ExternalName", cluster_ip=""), "ExternalName"),
        (service("picker", 9999), "no port 9002"),
    ]:
        snap = base(http_route("r", [pool_ref("pool-a")]))
        snap.of(SERVICES)[("default", "picker")] = svc
        (parent,) = status_of(translate(snap, Options(), NOW), INFERENCE_POOLS, "pool-a")["parents"]
        assert conditions(parent)["ResolvedRefs"] == ("False", "InvalidExtensionRef")
        assert word in parent["conditions"][1]["message"]


def test_pool_without_picker_ref_is_accepted_and_round_robin() -> None:
    snap = base(
        http_route("r", [pool_ref("np")]), inference_pool("np", [8000], picker=None), pod("np-0", "np")
    )
    result = translate(snap, Options(), NOW)
    (parent,) = status_of(result, INFERENCE_POOLS, "np")["parents"]
    assert conditions(parent) == {"Accepted": ("True", "Accepted"), "ResolvedRefs": ("True", "ResolvedRefs")}
    (backend,) = result.configs[("default", "gw")]["routes"][0]["backends"]
    assert backend["epp"] == {"enabled": False} and len(backend["endpoints"]) == 1


def test_fail_open_weights_and_app_protocols() -> None:
    snap = base(
        http_route("r", [pool_ref("pool-a", weight=70), pool_ref("pool-b", weight=30)]),
        inference_pool("pool-b", [8000], failure_mode="FailOpen", app_protocol="http"),
        inference_pool("h2", [8000], app_protocol="kubernetes.io/h2c"),
        http_route("r2", [pool_ref("h2")], path="/h2/"),
        pod("b-0", "pool-b", ip="10.0.2.1"),
        pod("h-0", "h2", ip="10.0.3.1"),
    )
    result = translate(snap, Options(), NOW)
    cfg = parse_config(result.configs[("default", "gw")])
    by_path = {r.path: r for r in cfg.routes}
    a, b = by_path["/"].backends
    assert (a.name, a.weight, a.epp.failure_mode_allow, a.app_protocol) == (
        "default/pool-a",
        70,
        False,
        "http",
    )
    assert (b.name, b.weight, b.epp.failure_mode_allow, b.app_protocol) == (
        "default/pool-b",
        30,
        True,
        "http",
    )
    (parent,) = status_of(result, INFERENCE_POOLS, "h2")["parents"]
    assert conditions(parent)["Accepted"] == ("True", "Accepted")
    (h2,) = by_path["/h2/"].backends
    assert h2.app_protocol == "h2c" and [e.address for e in h2.endpoints] == ["10.0.3.1"]


def test_other_gateway_classes_and_their_status_entries_are_left_alone() -> None:
    route = http_route("r", [pool_ref("pool-a")], gateways=("gw", "theirs"))
    foreign = {"parentRef": {"name": "theirs"}, "controllerName": "example.com/other", "conditions": []}
    route["status"] = {"parents": [foreign]}
    snap = base(route, gateway_class("other", "example.com/other"), gateway("theirs", cls="other"))
    result = translate(snap, Options(), NOW)
    parents = status_of(result, HTTP_ROUTES, "r")["parents"]
    assert parents[0] == foreign and len(parents) == 2 and parents[1]["parentRef"] == {"name": "gw"}
    assert set(result.configs) == {("default", "gw")}
    assert all(st.name != "other" for st in result.statuses if st.kind == GATEWAY_CLASSES)


def test_unsupported_match_namespace_policy_and_cross_namespace_refs() -> None:
    header_match = [{"headers": [{"name": "x", "value": "y"}]}]
    snap = base(
        http_route("hdr", [pool_ref("pool-a")], matches=header_match),
        http_route("elsewhere", [pool_ref("pool-a")], ns="team", gateways=()),
        http_route("xns", [pool_ref("pool-a", namespace="team")], path="/x/"),
    )
    route = snap.of(HTTP_ROUTES)[("team", "elsewhere")]
    route["spec"]["parentRefs"] = [{"name": "gw", "namespace": "default"}]
    result = translate(snap, Options(), NOW)
    (hdr,) = status_of(result, HTTP_ROUTES, "hdr")["parents"]
    assert conditions(hdr)["Accepted"] == ("False", "UnsupportedValue")
    (other,) = status_of(result, HTTP_ROUTES, "elsewhere", ns="team")["parents"]
    assert conditions(other)["Accepted"] == ("False", "NotAllowedByListeners")
    (xns,) = status_of(result, HTTP_ROUTES, "xns")["parents"]
    assert conditions(xns)["ResolvedRefs"] == ("False", "RefNotPermitted")
    paths = [r["path"] for r in result.configs[("default", "gw")]["routes"]]
    assert paths == ["/x/"]  # only the accepted route is served (its unresolved backend answers 503)


def test_oldest_route_wins_a_path_and_weight_zero_rules_are_dropped() -> None:
    snap = base(
        inference_pool("pool-b", [8000]),
        http_route("new", [pool_ref("pool-b")], created="2026-02-01T00:00:00Z"),
        http_route("old", [pool_ref("pool-a")], created="2026-01-01T00:00:00Z"),
        http_route("zero", [pool_ref("pool-a", weight=0)], path="/zero/"),
    )
    routes = translate(snap, Options(), NOW).configs[("default", "gw")]["routes"]
    assert [(r["path"], r["backends"][0]["name"]) for r in routes] == [("/", "default/pool-a")]


def test_status_settles_and_keeps_transition_times() -> None:
    snap = base(http_route("r", [pool_ref("pool-a")]))
    first = translate(snap, Options(), NOW)
    settled = apply(snap, first)
    assert translate(settled, Options(), LATER).statuses == []  # nothing to write the second time
    # the picker Service disappears: only the pool's status changes, with a new transition time
    del settled.of(SERVICES)[("default", "picker")]
    changed = translate(settled, Options(), LATER)
    assert [(s.kind.kind, s.name) for s in changed.statuses] == [("InferencePool", "pool-a")]
    accepted, resolved = changed.statuses[0].status["parents"][0]["conditions"]
    assert accepted["lastTransitionTime"] == NOW and resolved["lastTransitionTime"] == LATER


def test_deleting_the_route_removes_our_pool_parent_and_the_routes() -> None:
    snap = apply(
        base(http_route("r", [pool_ref("pool-a")])),
        translate(base(http_route("r", [pool_ref("pool-a")])), Options(), NOW),
    )
    del snap.of(HTTP_ROUTES)[("default", "r")]
    result = translate(snap, Options(), LATER)
    assert status_of(result, INFERENCE_POOLS, "pool-a") == {"parents": []}
    assert result.configs[("default", "gw")]["routes"] == []  # the gateway answers 404


def test_options_reach_the_config() -> None:
    opts = Options(
        listen="0.0.0.0:9000", picker_tls=True, picker_ca_file="/ca.pem", allowed_cidrs=("10.0.0.0/8",)
    )
    cfg = translate(base(http_route("r", [pool_ref("pool-a")])), opts, NOW).configs[("default", "gw")]
    parsed = parse_config(cfg)
    assert parsed.listen == "0.0.0.0:9000" and parsed.pool.allowed_cidrs == ["10.0.0.0/8"]
    epp = parsed.routes[0].backends[0].epp
    assert (epp.endpoint, epp.ca_file, epp.server_name) == (
        "https://10.96.0.10:9002",
        "/ca.pem",
        "picker.default.svc",
    )
