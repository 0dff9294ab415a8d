"""Shared fixtures. Unit tests (tests/unit) use no sockets and no sleeps; integration and interop tests use
real sockets on 127.0.0.1 with ports picked at run time."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator

import pytest


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (consecutive when possible is not guaranteed)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def consecutive_free_ports(n: int, attempts: int = 200) -> int:
    """A base port such that base..base+n-1 are all free."""
    for _ in range(attempts):
        base = _free_port()
        if base + n >= 65535:
            continue
        ok = True
        held = []
        try:
            for p in range(base, base + n):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    s.close()
                    break
                held.append(s)
        finally:
            for s in held:
                s.close()
        if ok:
            return base
    raise RuntimeError(f"no {n} consecutive free ports")


@pytest.fixture
def free_port() -> Iterator[Callable[[], int]]:
    yield _free_port
