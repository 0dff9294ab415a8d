"""End to end: OpenAI SDK -> stock NGINX -> inferoute decider (real embedded picker) -> simulator replicas.

Also runs the real command line (``inferoute gateway --mode nginx``) as a separate process, and checks that
every generated configuration variant passes ``nginx -t``.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import openai
import pytest
import trustme
from nginx_harness import NginxFactory, listening_socket, nginx_binary, prefix_directives

from inferoute.gateway.config import default_config
from inferoute.gateway.nginx_decider.server import start_decider
from inferoute.integrations.nginx import NginxOptions, render
from inferoute.sim import DEFAULT_MODEL, POD_HEADER, PORT_HEADER, SimConfig, SimPool


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[NginxFactory]:
    with NginxFactory(tmp_path) as factory:
        yield factory


@pytest.fixture
async def pool() -> AsyncIterator[SimPool]:
    sim = await SimPool.start(SimConfig(time_scale=0.05), replicas=3)
    try:
        yield sim
    finally:
        await sim.aclose()


def nginx_conf(decider_port: int, nginx_port: int, report: str = "post_action") -> str:
    return render(
        NginxOptions(
            decider=f"127.0.0.1:{decider_port}",
            listen=f"127.0.0.1:{nginx_port}",
            self_contained=True,
            worker_processes="1",
            report=report,
        )
    )


@pytest.mark.parametrize("report", ["post_action", "syslog"])
async def test_openai_sdk_through_nginx_with_the_embedded_picker(
    pool: SimPool, nginx: NginxFactory, report: str
) -> None:
    cfg = default_config(pool.endpoints, "127.0.0.1:0", path="/v1/")
    running = await start_decider(cfg)
    try:
        sock = listening_socket()
        nginx_port = sock.getsockname()[1]
        server = await asyncio.to_thread(nginx, nginx_conf(running.port, nginx_port, report), [sock])
        client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{nginx_port}/v1", api_key="unused", max_retries=0
        )
        served: set[str] = set()
        for i in range(6):
            raw = await client.chat.completions.with_raw_response.create(
                model=DEFAULT_MODEL, messages=[{"role": "user", "content": f"hello {i}"}], max_tokens=8
            )
            completion = raw.parse()
            assert completion.choices[0].message.content
            served.add(f"127.0.0.1:{raw.headers[PORT_HEADER]}")
            assert raw.headers[POD_HEADER].startswith("sim-")
        stream = await client.chat.completions.create(
            model=DEFAULT_MODEL, messages=[{"role": "user", "content": "stream"}], max_tokens=16, stream=True
        )
        chunks = [c async for c in stream]
        assert len(chunks) >= 2
        await client.close()
        assert served <= {e.key for e in pool.endpoints}
        # The picker's response-phase accounting reached zero again for every endpoint (completion reports).
        embedded = running.route_table.embedded
        assert embedded is not None
        learned = embedded.learned  # type: ignore[attr-defined]
        await eventually(lambda: not any(learned.snapshot().inflight(e.key).requests for e in pool.endpoints))
        assert [learned.snapshot().inflight(e.key).requests for e in pool.endpoints] == [0, 0, 0]
        assert len(running.decider.pending) == 0
        log = server.access_log("inference.log")
        assert f'model="{DEFAULT_MODEL}"' in log
    finally:
        await running.aclose()


async def eventually(condition: Callable[[], bool], within: float = 10.0) -> None:
    """Poll ``condition`` until true or ``within`` seconds passed (then return; the caller asserts)."""
    deadline = time.monotonic() + within
    while True:
        if condition() or time.monotonic() > deadline:
            return
        await asyncio.sleep(0.02)


def _start_process(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as err:
        return subprocess.Popen(args, stderr=err)


def _announced_port(log: Path, proc: subprocess.Popen[bytes], within: float = 20.0) -> int:
    """The port the decider bound (``listen: ...:0``), from its start-up line."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode}: {log.read_text()}")
        found = re.search(r"NGINX decider listening on 127\.0\.0\.1:(\d+)", log.read_text())
        if found:
            return int(found.group(1))
        time.sleep(0.05)
    raise AssertionError(f"the decider never said where it listens: {log.read_text()}")


async def test_cli_gateway_mode_nginx(pool: SimPool, nginx: NginxFactory, tmp_path: Path) -> None:
    sock = listening_socket()
    nginx_port = sock.getsockname()[1]
    eps = "\n".join(f"    - {{name: {e.name}, address: {e.address}, port: {e.port}}}" for e in pool.endpoints)
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(f"listen: 127.0.0.1:0\npool:\n  endpoints:\n{eps}\nroutes:\n  - path: /v1/\n")
    exe = Path(sys.executable).with_name("inferoute")
    args = [str(exe), "gateway", "--mode", "nginx", "--config", str(cfg)]
    proc = await asyncio.to_thread(_start_process, args, tmp_path / "decider.log")
    try:
        decider_port = await asyncio.to_thread(_announced_port, tmp_path / "decider.log", proc)
        # the NGINX configuration comes from the real command line, reading the same gateway file
        printed = await asyncio.to_thread(
            subprocess.run,
            [
                str(exe), "nginx-config", "--config", str(cfg), "--decider", f"127.0.0.1:{decider_port}",
                "--listen", f"127.0.0.1:{nginx_port}", "--self-contained", "--workers", "1",
            ],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        assert "location /v1/ {" in printed.stdout
        await asyncio.to_thread(nginx, printed.stdout, [sock])
        async with aiohttp.ClientSession() as http:
            body = {"model": DEFAULT_MODEL, "prompt": "hi", "max_tokens": 4}
            async with http.post(f"http://127.0.0.1:{nginx_port}/v1/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()
                assert resp.headers[POD_HEADER].startswith("sim-")
            deadline = time.monotonic() + 10
            text = ""
            while time.monotonic() < deadline:
                async with http.get(f"http://127.0.0.1:{decider_port}/_inferoute/metrics") as resp:
                    text = await resp.text()
                if 'inferoute_nginx_completions_total{outcome="ok"} 1.0' in text:
                    break
                await asyncio.sleep(0.05)
            assert 'inferoute_nginx_completions_total{outcome="ok"} 1.0' in text
            assert "inferoute_nginx_pending_sessions 0.0" in text
    finally:
        sock.close()  # unless NGINX took it
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, -signal.SIGTERM), (tmp_path / "decider.log").read_text()


@pytest.mark.parametrize(
    "opts",
    [
        NginxOptions(),
        NginxOptions(retries=0, accounting=False),
        NginxOptions(report="syslog", access_log="off"),
        NginxOptions(
            retries=4, default_upstream="127.0.0.1:9", pass_headers=("X-Gateway-Inference-Objective",)
        ),
        NginxOptions(locations=("/v1/chat/completions", "/v1/embeddings", "/responses"), listen="[::1]:8080"),
    ],
)
def test_generated_configs_pass_nginx_t(opts: NginxOptions, tmp_path: Path) -> None:
    conf = render(opts)
    _check(conf, tmp_path)


def test_tls_to_the_decider_config_passes_nginx_t(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    _check(
        render(NginxOptions(decider_tls=True, decider_ca=str(ca_file), decider_server_name="decider")),
        tmp_path,
    )


def _check(conf: str, tmp_path: Path) -> None:
    main, _, http = prefix_directives().partition("\f")
    # Not self-contained: keep NGINX's writes inside tmp_path anyway for the check.
    conf = main + conf.replace("http {\n", "http {\n" + http, 1)
    conf = conf.replace("/var/log/nginx/inference.log", "logs/inference.log")
    for sub in ("logs", "temp/client_body", "temp/proxy", "temp/fastcgi", "temp/uwsgi", "temp/scgi"):
        (tmp_path / sub).mkdir(parents=True, exist_ok=True)
    path = tmp_path / "nginx.conf"
    path.write_text(conf)
    result = subprocess.run(
        [nginx_binary(), "-t", "-p", f"{tmp_path}/", "-c", str(path)], capture_output=True, timeout=30
    )
    assert result.returncode == 0, result.stderr.decode() + "\n" + conf
