"""Shared fixtures. Unit tests (tests/unit) use no sockets and no sleeps; integration and interop tests use
real sockets on 127.0.0.1.

Servers bind port 0 and the test reads the port back (from the server object, or from the banner a child
process prints). Picking a free port first and binding it later is a race on a shared machine, so there is no
helper for it. A test that needs a port where nothing listens uses :func:`refused_port`.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator

import pytest


@pytest.fixture
def refused_port() -> Iterator[Callable[[], int]]:
    """Hands out ports on 127.0.0.1 that refuse connections for the whole test.

    Each port is held by a bound socket that never listens: Linux answers a connect with RST
    (``ECONNREFUSED``), and no other process can take the port while the test runs.
    """
    held: list[socket.socket] = []

    def take() -> int:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        held.append(s)
        return int(s.getsockname()[1])

    try:
        yield take
    finally:
        for s in held:
            s.close()
