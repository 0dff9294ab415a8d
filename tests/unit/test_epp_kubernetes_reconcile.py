"""The pure half of InferencePool discovery: pool + pods -> endpoints, and the watch cache."""

from __future__ import annotations

import jsonschema
import pytest

from inferoute.epp.datalayer.kubernetes import (
    ObjectCache,
    PoolSpecError,
    parse_pool,
    pod_info,
    pool_endpoints,
)
from kube_emulator import pod, pool, validate


def keys(pool_obj: dict | None, *pods: dict) -> list[str]:
    spec = parse_pool(pool_obj) if pool_obj is not None else None
    return [e.key for e in pool_endpoints(spec, [pod_info(p) for p in pods])]


def test_only_ready_selected_live_pods_with_an_ip() -> None:
    deleting = pod("d", "10.0.0.4")
    deleting["metadata"]["deletionTimestamp"] = "2026-12-04T00:00:00Z"
    no_ip = pod("n", "")
    pods = [
        pod("a", "10.0.0.1"),
        pod("u", "10.0.0.2", ready=False),
        pod("o", "10.0.0.3", labels={"app": "other"}),
        pod("x", "10.0.0.5", ns="elsewhere"),
        deleting,
        no_ip,
    ]
    assert keys(pool(), *pods) == ["10.0.0.1:8000"]


def test_every_target_port_is_an_endpoint_with_the_pods_labels() -> None:
    labels = {"app": "vllm", "inference.networking.k8s.io/engine-type": "sglang"}
    spec = parse_pool(pool(ports=(8000, 8001)))
    eps = pool_endpoints(spec, [pod_info(pod("p", "10.0.0.1", labels=labels))])
    assert [(e.name, e.key) for e in eps] == [("p-rank-0", "10.0.0.1:8000"), ("p-rank-1", "10.0.0.1:8001")]
    assert eps[0].labels["inference.networking.k8s.io/engine-type"] == "sglang"


def test_no_pool_means_no_endpoints() -> None:
    assert keys(None, pod("a", "10.0.0.1")) == []


def test_selector_needs_every_label() -> None:
    p = pool(app="vllm", tier="gpu")
    assert keys(p, pod("a", "10.0.0.1"), pod("b", "10.0.0.2", labels={"app": "vllm", "tier": "gpu"})) == [
        "10.0.0.2:8000"
    ]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s.pop("targetPorts"), "targetPorts"),
        (lambda s: s["selector"].update(matchLabels={}), "matchLabels"),
        (lambda s: s["targetPorts"].append({"number": 0}), "targetPorts[1].number"),
    ],
)
def test_unusable_pools_are_named(mutate, message) -> None:
    p = pool()
    mutate(p["spec"])
    with pytest.raises(PoolSpecError, match=message.replace("[", r"\[")):
        parse_pool(p)


def test_the_crd_schema_rejects_what_parse_pool_rejects() -> None:
    p = pool()
    p["spec"]["targetPorts"] = []
    with pytest.raises(jsonschema.ValidationError):
        validate(p)


def test_cache_replace_and_events() -> None:
    cache = ObjectCache()
    a, b = pod("a", "10.0.0.1"), pod("b", "10.0.0.2")
    assert cache.replace([a, b], "10")
    assert not cache.replace([a, b], "11")
    assert cache.resource_version == "11"
    b2 = pod("b", "10.0.0.2", ready=False)
    b2["metadata"]["resourceVersion"] = "12"
    assert cache.apply("MODIFIED", b2)
    assert not cache.apply("MODIFIED", b2)
    assert cache.resource_version == "12"
    assert not cache.apply("BOOKMARK", {"metadata": {"resourceVersion": "13"}})
    assert cache.resource_version == "13"
    assert cache.apply("DELETED", a)
    assert not cache.apply("DELETED", a)
    assert sorted(cache.objects) == ["default/b"]
    # a list after a gap drops what was deleted meanwhile
    assert cache.replace([], "20") and cache.objects == {}
