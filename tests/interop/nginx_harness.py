"""Run Debian's stock NGINX in tests: own prefix directory, own config, inherited sockets, stopped by pid.

Usage (synchronous: from async tests call it through ``asyncio.to_thread``; start-up waits for the workers)::

    from nginx_harness import NginxServer, listening_socket, self_contained_main

    sock = listening_socket()                       # bound to a port the OS chose
    port = sock.getsockname()[1]
    conf = self_contained_main(http_block)          # wraps an ``http { ... }`` body (listening on ``port``)
    with NginxServer.start(tmp_path / "nginx", conf, sockets=[sock]) as nginx:
        ...                                          # nginx.error_log() for diagnostics

or :class:`NginxFactory` (``with NginxFactory(tmp_path) as start: start(conf, [sock])``; also exposed as the
``nginx_factory`` fixture): it stops every server it started and prints their error logs, which pytest shows
for failed tests. :class:`EchoBackend` is an aiohttp backend that answers with the sha256 of the body it
received and the request headers (or an SSE stream, or a chosen error status).

When running as root, ``user root;`` is prepended to configs without a ``user`` directive: workers running as
``nobody`` could not write body temp files under pytest's 0700 temp directories.

The master runs in the foreground (``-g 'daemon off;'``) so that ``Popen.pid`` *is* the master: stopping sends
SIGQUIT (graceful), then SIGTERM, then SIGKILL to that pid only. Workers exit with their master.
Relative paths in the config (pid, logs, temp directories) resolve against the prefix directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")

TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def nginx_binary() -> str:
    """Path of the nginx binary; fails loudly (no skip) when NGINX is not installed."""
    found = shutil.which("nginx")
    if found:
        return found
    for candidate in NGINX_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError("nginx is not installed: run `make test-deps` (apt-get install nginx)")


def prefix_directives() -> str:
    """Main-context and http-context lines that keep every file NGINX writes inside the prefix directory.

    Returns two blocks separated by a form feed: main-level lines and http-level lines.
    """
    main = "pid nginx.pid;\nerror_log logs/error.log info;\n"
    http = "".join(f"{d}_temp_path temp/{d};\n" for d in TEMP_DIRS)
    return main + "\f" + http


def self_contained_main(http_body: str, *, worker_processes: int = 1) -> str:
    """A complete nginx.conf around ``http_body`` (the inside of ``http { }``) with prefix-relative paths."""
    main, _, http = prefix_directives().partition("\f")
    return (
        f"worker_processes {worker_processes};\n{main}"
        "events { worker_connections 1024; }\n"
        "http {\n"
        f"{http}"
        "access_log logs/access.log;\n"
        f"{http_body}\n"
        "}\n"
    )


def listening_socket() -> socket.socket:
    """A listening socket on 127.0.0.1 at a port the OS chose, for NGINX to inherit.

    NGINX cannot report a port it chose itself, so the test binds (port 0), reads the port back, renders the
    config with it and hands the socket to NGINX (``NGINX`` environment variable, the mechanism of its binary
    upgrade): no moment where another process could take the port.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(511)
    return sock


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


class NginxServer:
    """One NGINX master started from a prefix directory; use :meth:`start`, stop with :meth:`stop`."""

    def __init__(self, prefix: Path, conf_path: Path, process: subprocess.Popen[bytes]) -> None:
        self.prefix = prefix
        self.conf_path = conf_path
        self.process = process

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    def start(
        cls, prefix: Path, conf_text: str, *, sockets: Sequence[socket.socket], timeout: float = 15.0
    ) -> NginxServer:
        """Write the config into ``prefix``, check it with ``nginx -t``, start the master on the inherited
        ``sockets`` (from :func:`listening_socket`; the config listens on their addresses) and wait until it
        has started its workers. The caller's copies of the sockets are closed: NGINX owns them now. Raises
        RuntimeError with the error log when NGINX fails."""
        binary = nginx_binary()
        prefix = prefix.resolve()
        for sub in ("logs", "conf", *(f"temp/{d}" for d in TEMP_DIRS)):
            (prefix / sub).mkdir(parents=True, exist_ok=True)
        conf_path = prefix / "conf" / "nginx.conf"
        if os.geteuid() == 0 and not any(line.strip().startswith("user ") for line in conf_text.splitlines()):
            # Workers would run as nobody, who cannot enter pytest's 0700 tmp directories (body temp files).
            conf_text = "user root;\n" + conf_text
        conf_path.write_text(conf_text)
        args = [binary, "-p", f"{prefix}/", "-c", str(conf_path)]
        check = subprocess.run([*args, "-t", "-q"], capture_output=True, timeout=timeout)
        if check.returncode != 0:
            raise RuntimeError(
                f"nginx -t failed:\n{check.stderr.decode(errors='replace')}\n--- conf ---\n{conf_text}"
            )
        stderr_path = prefix / "logs" / "stderr.log"
        fds = [sock.fileno() for sock in sockets]
        env = {**os.environ, "NGINX": "".join(f"{fd};" for fd in fds)}
        try:
            with open(stderr_path, "wb") as stderr:
                process = subprocess.Popen(
                    [*args, "-g", "daemon off;"],
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                    pass_fds=fds,
                    env=env,
                )
        finally:
            for sock in sockets:
                sock.close()
        server = cls(prefix, conf_path, process)
        deadline = time.monotonic() + timeout
        while not _children(process.pid):  # workers run once the listening sockets are set up
            if process.poll() is not None:
                raise RuntimeError(f"nginx exited with {process.returncode}:\n{server.error_log()}")
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"nginx started no worker within {timeout}s:\n{server.error_log()}")
            time.sleep(0.02)
        return server

    def error_log(self) -> str:
        """Everything NGINX wrote to its error log and stderr (for failure messages)."""
        out = []
        for name in ("stderr.log", "error.log"):
            path = self.prefix / "logs" / name
            if path.exists():
                out.append(f"--- {name} ---\n{path.read_text(errors='replace')}")
        return "\n".join(out)

    def access_log(self, name: str = "access.log") -> str:
        path = self.prefix / "logs" / name
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGQUIT) of this master only, escalating to SIGTERM and SIGKILL."""
        for sig in (signal.SIGQUIT, signal.SIGTERM, signal.SIGKILL):
            if self.process.poll() is not None:
                return
            try:
                os.kill(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=timeout if sig != signal.SIGKILL else None)
                return
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> NginxServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class NginxFactory:
    """Starts NGINX servers under ``base``; closing stops them all (by pid) and prints their error logs
    (pytest shows captured output for failed tests). ``factory(conf_text, sockets) -> NginxServer``."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.started: list[NginxServer] = []

    def __call__(self, conf_text: str, sockets: Sequence[socket.socket]) -> NginxServer:
        server = NginxServer.start(self.base / f"nginx{len(self.started)}", conf_text, sockets=sockets)
        self.started.append(server)
        return server

    def close(self) -> None:
        for server in self.started:
            server.stop()
            print(server.error_log())

    def __enter__(self) -> NginxFactory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def nginx_factory(tmp_path: Path) -> Iterator[Callable[[str, Sequence[socket.socket]], NginxServer]]:
    """``start(conf_text, sockets) -> NginxServer``; every server is stopped at teardown. To use it, import it
    into a test module or conftest (or wrap :class:`NginxFactory` in a local fixture)."""
    with NginxFactory(tmp_path) as factory:
        yield factory


# --- test backends -----------------------------------------------------------------------------------------


class EchoBackend:
    """An aiohttp model-server stand-in on a free port.

    * any path: answers JSON ``{sha256, length, method, path, headers, port}`` describing what arrived
      (body hashed, so a 20 MB body is compared without echoing it) with header ``x-served-port``;
    * a path ending in ``/sse``: ``n`` SSE events ``gap`` seconds apart (query parameters), then ``[DONE]``.
    """

    def __init__(self) -> None:
        self.port = 0
        self.requests = 0
        self.fail_status: int | None = None
        """When set, every request is answered with this status and a JSON error body."""
        self._runner: Any = None

    async def start(self) -> EchoBackend:
        from aiohttp import web

        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    @property
    def key(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _handle(self, request: Any) -> Any:
        import asyncio
        import hashlib
        import json

        from aiohttp import web

        self.requests += 1
        if self.fail_status is not None:
            await request.read()
            return web.json_response(
                {"error": {"message": f"backend {self.port} failing", "code": self.fail_status}},
                status=self.fail_status,
                headers={"x-served-port": str(self.port)},
            )
        if request.path.endswith("/sse"):
            n = int(request.query.get("n", "5"))
            gap = float(request.query.get("gap", "0.1"))
            resp = web.StreamResponse(
                headers={"Content-Type": "text/event-stream", "x-served-port": str(self.port)}
            )
            await resp.prepare(request)
            for i in range(n):
                await resp.write(f"data: {json.dumps({'i': i})}\n\n".encode())
                await asyncio.sleep(gap)
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        digest = hashlib.sha256()
        length = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            length += len(chunk)
        return web.json_response(
            {
                "sha256": digest.hexdigest(),
                "length": length,
                "method": request.method,
                "path": request.path_qs,
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "port": self.port,
            },
            headers={"x-served-port": str(self.port)},
        )

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
