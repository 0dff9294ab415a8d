"""Weighted route backends: the smooth weighted round robin and the config checks (pure code)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from inferoute.errors import InferouteError
from inferoute.gateway.config import parse_config
from inferoute.gateway.reload import restart_only_changes
from inferoute.gateway.weighted import SmoothWeighted


def test_seventy_thirty_is_exact_over_every_ten_and_interleaved() -> None:
    sw = SmoothWeighted([70, 30])
    picks = [sw.next() for _ in range(200)]
    for start in range(0, 200, 10):
        assert Counter(picks[start : start + 10]) == {0: 7, 1: 3}
    assert "1, 1" not in str(picks)  # never two of the light backend in a row at 70/30


def test_zero_weight_backend_never_chosen_and_bad_weights_refused() -> None:
    sw = SmoothWeighted([0, 5, 1])
    assert Counter(sw.next() for _ in range(60)) == {1: 50, 2: 10}
    with pytest.raises(ValueError):
        SmoothWeighted([0, 0])
    with pytest.raises(ValueError):
        SmoothWeighted([-1, 3])


def _route(backends: list[dict[str, Any]]) -> dict[str, Any]:
    return {"routes": [{"path": "/", "backends": backends}]}


def _backend(weight: int = 1, **extra: Any) -> dict[str, Any]:
    b: dict[str, Any] = {
        "name": "ns/pool",
        "weight": weight,
        "epp": {"endpoint": "10.0.0.1:9002", "tls": False},
        "endpoints": [{"address": "10.1.0.1", "port": 8000}],
    }
    b.update(extra)
    return b


def test_backends_parse() -> None:
    cfg = parse_config(_route([_backend(70), _backend(30, epp={"enabled": False})]))
    assert [b.weight for b in cfg.routes[0].backends] == [70, 30]


@pytest.mark.parametrize(
    ("backends", "message"),
    [
        ([_backend(0)], "at least one backend needs a weight > 0"),
        ([_backend(-1), _backend(1)], "backends[0].weight: must be >= 0"),
        ([_backend(epp={"endpoint": "embedded"})], "a backend needs a remote picker"),
        ([_backend(endpoints=[{"address": "10.0.0.1", "port": 0}])], "backends[0].endpoints[0].port"),
        ([_backend(default_upstream="nope")], "backends[0].default_upstream"),
    ],
)
def test_bad_backends_are_refused_with_their_path(backends: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(InferouteError) as info:
        parse_config(_route(backends))
    assert message in info.value.message


def test_restart_only_keys_are_reported() -> None:
    a = parse_config({"listen": "127.0.0.1:1", "routes": [{"path": "/"}]})
    b = parse_config({"listen": "127.0.0.1:2", "routes": [{"path": "/v1/"}], "limits": {"max_headers": 5}})
    assert restart_only_changes(a, b) == ["listen", "limits"]
    assert restart_only_changes(a, a) == []
