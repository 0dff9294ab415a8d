"""The request target normalisation: what routes match is what is forwarded."""

from __future__ import annotations

import pytest

from inferoute.errors import InferouteError
from inferoute.gateway.target import request_target


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/v1/completions", "/v1/completions"),
        ("/v1/completions?x=1&y=/../z", "/v1/completions?x=1&y=/../z"),  # the query is not a path
        ("/v1/../reset_prefix_cache", "/reset_prefix_cache"),
        ("/v1/./chat/completions", "/v1/chat/completions"),
        ("/v1/a/..", "/v1/"),
        ("/v1/.hidden/x", "/v1/.hidden/x"),
        ("/v1/..x", "/v1/..x"),
        ("http://gw.example/v1/completions?q=1", "/v1/completions?q=1"),
        ("HTTPS://gw.example", "/"),
        ("http://gw.example?x", "/?x"),
        ("/v1/%41bc", "/v1/%41bc"),  # other escapes pass through untouched
    ],
)
def test_targets_resolve(raw: str, expected: str) -> None:
    assert request_target(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "/v1/%2e%2e/sleep",
        "/v1/%2E%2e/sleep",
        "/v1/.%2e/sleep",
        "/v1%2fsleep",
        "/v1%5c..%5csleep",
        "/v1\\..\\sleep",
        "/..",
        "/v1/../../etc",
        "*",
        "gw.example:443",
        "/v1/a b",
        "/v1/\x00",
    ],
)
def test_ambiguous_or_escaping_targets_are_refused(raw: str) -> None:
    with pytest.raises(InferouteError) as info:
        request_target(raw)
    assert info.value.status == 400 and info.value.cause == "bad-path"
