"""The real NGINX accepts every configuration ``inferoute nginx-config`` generates (``nginx -t``), and answers
every error it produces itself with OpenAI-style JSON."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from nginx_harness import NginxServer, listening_socket, nginx_binary, nginx_factory

from inferoute.integrations.nginx import NginxOptions, render

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_nginx_config import OPTION_SETS

__all__ = ["nginx_factory"]  # the fixture


@pytest.mark.parametrize("opts", OPTION_SETS)
def test_nginx_accepts_the_generated_configuration(opts: NginxOptions, tmp_path: Path) -> None:
    for sub in ("logs", "temp"):
        (tmp_path / sub).mkdir()
    conf = tmp_path / "nginx.conf"
    conf.write_text(render(replace(opts, self_contained=True, listen="127.0.0.1:8999")))  # -t binds nothing
    done = subprocess.run(
        [nginx_binary(), "-t", "-q", "-p", str(tmp_path), "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr


BAD_REQUESTS = [
    # (what, raw request, status the client gets)
    ("URI too long", b"GET /v1/" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    ("header too large", b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 10_000 + b"\r\n\r\n", 431),
    ("garbage request line", b"HELLO\r\n\r\n", 400),
    ("path above the root", b"GET /../../etc HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("HTTP/1.1 without Host", b"GET /v1/models HTTP/1.1\r\n\r\n", 400),
    ("bad header name", b"GET /v1/models HTTP/1.1\r\nHost: x\r\nBad Header\x01: y\r\n\r\n", 400),
    ("bad Content-Length", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400),
    (
        "bad chunk size",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        400,
    ),
    (
        "body over the limit",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n",
        413,
    ),
    ("TRACE", b"TRACE /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    ("unknown Transfer-Encoding", b"POST /v1/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    ("HTTP/3.0 request line", b"GET /v1/models HTTP/3.0\r\nHost: x\r\n\r\n", 505),
    ("internal error URI", b"GET /_inferoute/error/400 HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    ("decider path", b"GET /_inferoute/done HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    ("outside the locations", b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    ("decider unreachable", b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", 502),
]


def _exchange(port: int, raw: bytes) -> tuple[int, bytes, bytes]:
    """Send ``raw``, read until NGINX closes or the announced body arrived: (status, head, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        data = b""
        while True:
            head, sep, body = data.partition(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head) if sep else None
            if length and len(body) >= int(length.group(1)):
                break
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head, body


def test_every_error_nginx_answers_itself_is_openai_json(
    nginx_factory: Callable[[str, Sequence[socket.socket]], NginxServer], refused_port: Callable[[], int]
) -> None:
    """Requests NGINX refuses before (or instead of) asking the decider get JSON, not NGINX's HTML pages --
    including those it refuses before it has parsed a URI (a named-location error_page cannot serve them)."""
    sock = listening_socket()
    port = sock.getsockname()[1]
    opts = NginxOptions(
        listen=f"127.0.0.1:{port}", decider=f"127.0.0.1:{refused_port()}", max_body_size=10**6
    )
    nginx_factory(render(replace(opts, self_contained=True)), [sock])
    for what, raw, expected in BAD_REQUESTS:
        status, head, body = _exchange(port, raw)
        assert status == expected, (what, head, body)
        assert re.search(rb"(?im)^content-type: application/json", head), (what, head, body)
        error = json.loads(body)["error"]
        assert error["code"] == expected and error["message"] and error["type"], (what, error)
