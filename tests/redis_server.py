"""A real ``redis-server`` (Debian package; ``make test-deps`` installs it) for the cross-replica syncer
tests: its own process, listening only on a unix socket in the test's directory (no port to pick), no
persistence."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def redis_server(where: Path) -> Iterator[str]:
    """Start redis-server with a unix socket under ``where``; yields its ``unix://`` URL."""
    exe = shutil.which("redis-server") or "/usr/bin/redis-server"
    sock = where / "redis.sock"
    proc = subprocess.Popen(
        [
            exe,
            "--port",
            "0",
            "--unixsocket",
            str(sock),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(where),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=where,
    )
    try:
        deadline = time.monotonic() + 10
        while True:  # ready when the socket accepts a connection
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
                s.connect(str(sock))
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start (exit status {proc.poll()})")
            time.sleep(0.02)
        yield f"unix://{sock}"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
