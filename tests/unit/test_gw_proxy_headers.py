"""Hop-by-hop header rules of the forwarder (pure)."""

from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy

from inferoute.gateway.proxy import client_response_headers, upstream_request_headers


def test_upstream_request_headers() -> None:
    out = upstream_request_headers(
        [
            ("Host", "gw"),
            ("Connection", "keep-alive, X-Secret"),
            ("X-Secret", "drop me"),
            ("Keep-Alive", "timeout=5"),
            ("Transfer-Encoding", "chunked"),
            ("Content-Length", "12"),
            ("TE", "trailers"),
            ("Upgrade", "h2c"),
            ("Expect", "100-continue"),
            ("X-Forwarded-For", "1.1.1.1"),
            ("X-Request-Id", "client"),
            ("Authorization", "Bearer k"),
            ("Accept", "a"),
            ("Accept", "b"),
        ],
        "rid",
        "127.0.0.1",
    )
    names = sorted(k for k, _ in out.items())
    assert names == ["Accept", "Accept", "Authorization", "X-Forwarded-For", "X-Request-Id"]
    assert out["X-Forwarded-For"] == "1.1.1.1, 127.0.0.1"
    assert out["X-Request-Id"] == "rid"
    assert out.getall("Accept") == ["a", "b"]


def test_client_response_headers() -> None:
    up = CIMultiDictProxy(
        CIMultiDict(
            [
                ("Content-Type", "text/event-stream"),
                ("Transfer-Encoding", "chunked"),
                ("Content-Length", "5"),
                ("Connection", "close"),
                ("Set-Cookie", "a=1"),
                ("Set-Cookie", "b=2"),
            ]
        )
    )
    out = client_response_headers(up, "rid")
    assert out.getall("Set-Cookie") == ["a=1", "b=2"]
    assert "Transfer-Encoding" not in out and "Content-Length" not in out and "Connection" not in out
    assert out["X-Request-Id"] == "rid"
