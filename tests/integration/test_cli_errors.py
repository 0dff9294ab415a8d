"""Every user mistake on the command line ends with exit status != 0 and ONE line naming the flag, key or file
and what is valid -- no traceback, no HTTP status. Each case runs the real ``inferoute`` command in a
subprocess (the cases run concurrently to keep the test short)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

GOOD_ENDPOINTS = "endpoints: [{name: a, address: 127.0.0.1, port: 9}]\n"


def _files(tmp: Path, busy: int) -> dict[str, str]:
    files = {
        "endpoints.yaml": GOOD_ENDPOINTS,
        "gw-typo.yaml": "listen: 127.0.0.1:0\nroutes:\n  - path: /v1/\n    bbbr: {}\n",
        "gw-busy.yaml": f"listen: 127.0.0.1:{busy}\nroutes:\n  - path: /v1/\n",
        "gw-badyaml.yaml": "listen: [unclosed\n",
        "gw-h2c.yaml": "listen: 127.0.0.1:0\npool: {app_protocol: h2c}\nroutes:\n  - path: /v1/\n",
        "gw-noca.yaml": "listen: 127.0.0.1:0\nroutes:\n  - path: /v1/\n"
        "    epp: {endpoint: 127.0.0.1:1, ca_file: ca.pem}\n",
        "gw-timeouts.yaml": "listen: 127.0.0.1:0\ntimeouts: {connect: 0}\nroutes:\n  - path: /v1/\n",
        "epp-typo.yaml": "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n"
        "plugins:\n- type: queue-scorrer\n",
    }
    for name, text in files.items():
        (tmp / name).write_text(text)
    (tmp / "latin1.yaml").write_bytes("listen: 'caf\u00e9'\n".encode("latin-1"))  # not UTF-8
    (tmp / "dir").mkdir()
    return {name: str(tmp / name) for name in [*files, "latin1.yaml", "dir"]}


# (arguments, words the one line must contain)
def _cases(f: dict[str, str], busy: int) -> list[tuple[list[str], list[str]]]:
    ep = ["--endpoints", f["endpoints.yaml"], "--host", "127.0.0.1"]
    free = ["--grpc-port", "0", "--health-port", "0", "--metrics-port", "0"]
    return [
        (["--log-level", "LOUD", "sim"], ["--log-level", "DEBUG, INFO, WARNING, ERROR"]),
        (["up", "--sim-base-port", "65534"], ["--sim-base-port", "65535"]),
        (["up", "--listen", "nohost"], ["--listen"]),
        (["nginx-config", "--config", f["gw-typo.yaml"]], ["gw-typo.yaml", "bbbr"]),
        (["nginx-config", "--config", "/nonexistent/gw.yaml"], ["--config", "/nonexistent/gw.yaml"]),
        (["nginx-config", "--decider", "nocolon"], ["--decider", "HOST:PORT"]),
        (["envoy-config", "--epp", "127.0.0.1:9002", "--listen", "99999"], ["--listen", "65535"]),
        (["envoy-config", "--epp", "127.0.0.1", "--listen", "8080"], ["--epp", "HOST:PORT"]),
        (["gateway", "--config", "/nonexistent/gw.yaml"], ["/nonexistent/gw.yaml"]),
        (["gateway", "--config", f["gw-typo.yaml"]], ["gw-typo.yaml", "bbbr"]),
        (["gateway", "--config", f["gw-badyaml.yaml"]], ["gw-badyaml.yaml"]),
        (["gateway", "--config", f["gw-busy.yaml"]], [f"127.0.0.1:{busy}", "in use"]),
        (["gateway", "--mode", "nginx", "--config", f["gw-busy.yaml"]], [f"127.0.0.1:{busy}", "in use"]),
        (["gateway", "--workers", "0", "--config", f["gw-typo.yaml"]], ["--workers"]),
        (["gateway", "--mode", "nginx", "--config", f["gw-h2c.yaml"]], ["pool.app_protocol", "--mode nginx"]),
        (["epp", *ep, "--grpc-port", "99999"], ["--grpc-port", "65535"]),
        (["epp", *ep, "--metrics-port", "-1"], ["--metrics-port", "65535"]),
        (["epp", *ep, "--profile", "fast"], ["--profile", "gie-default"]),
        (["epp", *ep, "--profile", "random", "--config", f["epp-typo.yaml"]], ["--profile", "--config"]),
        (["epp", *ep, *free, "--config", f["epp-typo.yaml"]], ["plugins[0].type", "queue-scorrer", "valid"]),
        (["epp", "--endpoints", "/nonexistent/e.yaml"], ["--endpoints", "/nonexistent/e.yaml"]),
        (
            ["epp", *ep, "--grpc-port", str(busy), "--health-port", "0", "--metrics-port", "0"],
            [str(busy), "--grpc-port"],
        ),
        (
            ["epp", *ep, "--grpc-port", "0", "--health-port", str(busy), "--metrics-port", "0"],
            [str(busy), "--health-port"],
        ),
        (["epp", *ep, "--grpc-port", "0", "--health-port", "0", "--metrics-port", str(busy)], [str(busy)]),
        (["sim", "--port", str(busy)], [str(busy), "--port", "in use"]),
        (["sim", "--port", "65535", "--replicas", "2"], ["--port", "65535"]),
        (["gateway", "--config", f["latin1.yaml"]], ["latin1.yaml", "not UTF-8", "0xe9"]),
        (["nginx-config", "--config", f["latin1.yaml"]], ["latin1.yaml", "not UTF-8"]),
        (["epp", *ep, "--config", f["latin1.yaml"]], ["config file", "latin1.yaml", "not UTF-8"]),
        (["epp", "--endpoints", f["latin1.yaml"]], ["endpoints file", "latin1.yaml", "not UTF-8"]),
        (["envoy-config", "--epp", "h:1", "--listen", "1", "--endpoints", f["latin1.yaml"]], ["latin1.yaml"]),
        (["gateway", "--config", f["gw-typo.yaml"], "--listen", ":80x"], ["--listen", "HOST:PORT"]),
        # past the limit fails before forking (were it ignored, the busy port stops it before any worker)
        (["gateway", "--workers", "100000", "--config", f["gw-busy.yaml"]], ["--workers"]),
        (["nginx-config", "--listen", "8080; include /etc/passwd"], ["--listen", "HOST:PORT"]),
        (["nginx-config", "--workers", "lots"], ["--workers", "auto"]),
        (["envoy-config", "--epp", "h:abc", "--listen", "1"], ["--epp", "HOST:PORT"]),
        (
            ["envoy-config", "--epp", "h:1", "--listen", "1", "--listen-address", "nohost"],
            ["--listen-address"],
        ),
        (
            ["envoy-config", "--epp", "h:1", "--listen", "1", "--epp-ca", f["endpoints.yaml"]],
            ["--epp-ca", "PEM"],
        ),
        (["epp", *ep, "--grace", "-1"], ["--grace"]),
        (
            ["epp", *ep, *free, "--cert-path", str(Path(f["endpoints.yaml"]).parent)],
            ["--cert-path", "tls.crt"],
        ),
        (["epp", *ep, *free, "--client-ca", f["endpoints.yaml"]], ["--client-ca", "PEM"]),
        (["controller", "--gateway-listen", "nope"], ["--gateway-listen", "HOST:PORT"]),
        (["controller", "--controller-name", ""], ["--controller-name", "DOMAIN/PATH"]),
        (["controller", "--controller-name", "inferoute"], ["--controller-name", "DOMAIN/PATH"]),
        # checked before any cluster is asked (there is none here: that would be another line)
        (
            ["controller", "--picker-tls", "--picker-ca-file", "/nonexistent/ca.crt"],
            ["--picker-ca-file", "/nonexistent/ca.crt"],
        ),
        (
            ["controller", "--picker-tls", "--picker-ca-file", f["endpoints.yaml"]],
            ["--picker-ca-file", "PEM"],
        ),
        (["controller", "--picker-tls", "--picker-ca-file", f["dir"]], ["--picker-ca-file", "directory"]),
        (["controller", "--output-dir", f["endpoints.yaml"]], ["--output-dir", "not a directory"]),
        (["controller", "--output-dir", "/proc/inferoute-out"], ["--output-dir", "cannot create"]),
        (["sim", "--lora-adapters", ","], ["--lora-adapters", "empty adapter name"]),
        (["sim", "--lora-adapters", "a,b,a"], ["--lora-adapters", "a named twice"]),
        (["sim", "--lora-adapters", "m", "--model", "m"], ["--lora-adapters", "base model"]),
        (["sim", "--model", " "], ["--model", "empty"]),
        (["sim", "--hash-seed", "abc"], ["--hash-seed", "4294967295"]),
        (["sim", "--hash-seed", "4294967296"], ["--hash-seed", "4294967295"]),
        (
            ["sim", "--max-num-seqs", "64", "--max-num-batched-tokens", "32"],
            ["--max-num-batched-tokens", "--max-num-seqs"],
        ),
        (["nginx-config", "--model-header", "X Model"], ["--model-header", "header name"]),
        (["nginx-config", "--pass-header", "x;y"], ["--pass-header", "header name"]),
        (["nginx-config", "--decider-ca", f["endpoints.yaml"]], ["--decider-ca", "--decider-tls"]),
        (["nginx-config", "--listen", "443 ssl; include x"], ["--listen", "listen parameters"]),
        (
            ["gateway", "--config", f["gw-noca.yaml"]],
            ["gw-noca.yaml", "routes[0].epp.ca_file", "no such file"],
        ),
        (["gateway", "--config", f["gw-timeouts.yaml"]], ["gw-timeouts.yaml", "timeouts.connect", "> 0"]),
        (["bench", "routing", "--rates", "abc"], ["--rates", "abc"]),
        (["bench", "gateway", "--duration", "-1"], ["--duration"]),
        (["bench", "nosuch"], ["nosuch"]),
        # every benchmark refuses a bad value before it starts anything (these ran, hung or crashed late)
        (["bench", "sim", "--streams", "abc"], ["--streams", "abc"]),
        (["bench", "sim", "--warmup", "-1"], ["--warmup"]),
        (["bench", "sim", "--out", f["dir"]], ["--out", "directory"]),
        (["bench", "scheduler", "--picks", "0"], ["--picks"]),
        (["bench", "scheduler", "--lifecycle-requests", "0"], ["--lifecycle-requests"]),
        (["bench", "scheduler", "--profiles", "fast"], ["--profiles", "gie-default"]),
        (["bench", "sim-metrics", "--scrapes", "0"], ["--scrapes"]),
        (["bench", "picker", "--pickers", "nope"], ["--pickers", "embedded"]),
        (["bench", "picker", "--workers", "abc"], ["--workers"]),
        (["bench", "picker", "--open-loop", "50"], ["--open-loop", "RATE:DELAY_MS"]),
        (["bench", "gateway", "--rate", "0"], ["--rate"]),
        (["bench", "gateway", "--paths", "nope"], ["--paths", "nginx"]),
        (["bench", "gateway", "--slice", "0"], ["--slice"]),
        (["bench", "gateway", "--out", f["endpoints.yaml"]], ["--out"]),
        (["bench", "nginx", "--connections", "0"], ["--connections"]),
        (["bench", "routing", "--replicas", "0"], ["--replicas"]),
        (["bench", "routing", "--out", f["endpoints.yaml"]], ["--out", "not a directory"]),
        (["bench", "routing-crosscheck", "--guidellm", "/nonexistent"], ["--guidellm", "executable"]),
        (["epp", *ep, "--sync-redis", "localhost"], ["--sync-redis", "redis://"]),
        (["epp", *ep, "--ha-lease-name", "x"], ["--ha-lease-name", "--ha-enable-leader-election"]),
        (["epp", *ep, "--kubeconfig", f["endpoints.yaml"]], ["--kubeconfig", "--pool-name"]),
        (["epp", *ep, "--refresh-metrics-interval", "0"], ["--refresh-metrics-interval"]),
        (
            ["sim", "--kv-events-config", '{"enable_kv_cache_events": true, "endpoint": "tcp://*:99999"}'],
            ["port"],
        ),
        (["nosuch"], ["nosuch"]),
    ]


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inferoute", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=None if env is None else {**os.environ, **env},
    )


def test_every_mistake_is_one_clear_line(tmp_path: Path, busy_port: int) -> None:
    cases = _cases(_files(tmp_path, busy_port), busy_port)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(_run, [args for args, _ in cases]))
    for (args, words), res in zip(cases, results, strict=True):
        errors = [line for line in res.stderr.splitlines() if ": error: " in line]
        shown = f"inferoute {' '.join(args)} -> {res.returncode}\n{res.stderr}"
        assert res.returncode != 0, shown
        assert "Traceback" not in res.stderr, shown
        assert len(errors) == 1, shown
        line = errors[0]
        assert line.startswith("inferoute"), shown
        for word in words:
            assert word in line, f"{word!r} missing: {shown}"
        for status in ("500 ", "Error: 5", "400 "):
            assert status not in line, f"an HTTP status in a CLI message: {shown}"


def test_an_unreadable_kubeconfig_is_named(tmp_path: Path) -> None:
    files = {"latin1": "clusters: caf\u00e9\n".encode("latin-1"), "yaml": b"a: [b\n", "other": b"x: 1\n"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda n: _run(["controller"], {"KUBECONFIG": str(tmp_path / n)}), files))
    for name, res in zip(files, results, strict=True):
        errors = [line for line in res.stderr.splitlines() if ": error: " in line]
        assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
        assert len(errors) == 1 and f"kubeconfig {tmp_path / name}" in errors[0], res.stderr
