"""Routing-header stripping and the destination allow-list (pure)."""

from __future__ import annotations

import pytest

from inferoute.endpoints import Endpoint
from inferoute.errors import InferouteError
from inferoute.gateway.destinations import AllowList, routing_header_names, split_destinations, strip_headers

POOL = [Endpoint("a", "10.0.0.1", 8000), Endpoint("b", "fd00::1", 8000)]


def test_strip_removes_every_routing_header_case_insensitively() -> None:
    names = routing_header_names(["X-My-Upstream"])
    headers = [
        ("Content-Type", "application/json"),
        ("X-Gateway-Destination-Endpoint", "1.1.1.1:1"),
        ("x-gateway-destination-endpoint-served", "1.1.1.1:1"),
        ("x-gateway-destination-endpoint-subset", "1.1.1.1:1"),
        ("X-Inference-Upstream", "1.1.1.1:1"),
        ("x-my-upstream", "1.1.1.1:1"),
        ("Accept", "a"),
        ("Accept", "b"),
    ]
    assert strip_headers(headers, names) == [
        ("Content-Type", "application/json"),
        ("Accept", "a"),
        ("Accept", "b"),
    ]


def test_allow_list() -> None:
    allow = AllowList(POOL, ["192.168.0.0/16"], extra=["172.16.0.9:80"])
    assert allow.check("10.0.0.1:8000") == "10.0.0.1:8000"
    assert allow.check(" [fd00::1]:8000 ") == "[fd00::1]:8000"
    assert allow.check("192.168.4.4:1234") == "192.168.4.4:1234"
    assert allow.check("172.16.0.9:80") == "172.16.0.9:80"
    for bad in (
        "10.0.0.1:8001",
        "10.0.0.2:8000",
        "evil.example:80",
        "10.0.0.1",
        "127.0.0.1:0",
        "169.254.169.254:80",
    ):
        with pytest.raises(InferouteError) as e:
            allow.check(bad)
        assert e.value.status == 502 and e.value.cause == "invalid-destination"


def test_split_destinations() -> None:
    assert split_destinations(["a:1, b:2", "c:3", " ", ""]) == ["a:1", "b:2", "c:3"]
