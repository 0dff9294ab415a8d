"""``inferoute up`` / ``make up`` as a user runs it: a real process, a real ``curl``, Ctrl-C."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner

from inferoute.gateway.cli import up_command
from inferoute.gateway.config import DEFAULT_LISTEN, default_config
from inferoute.gateway.up import UpOptions

ROOT = Path(__file__).resolve().parents[2]
INFEROUTE = Path(sys.executable).parent / "inferoute"


def _read_banner(proc: subprocess.Popen[str], limit_s: float = 60.0) -> str:
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "stop: Ctrl-C" in line:
            return "".join(lines)
    raise AssertionError(f"no ready banner; got {''.join(lines)!r}")


def _banner_port(banner: str) -> int:
    """The port ``:0`` was bound to, as the banner states it."""
    found = re.search(r"gateway on http://127\.0\.0\.1:(\d+)", banner)
    assert found, banner
    port = int(found.group(1))
    assert port != 0 and f"http://127.0.0.1:{port}/metrics" in banner
    return port


def test_up_is_answered_by_curl_and_stops_cleanly_on_ctrl_c() -> None:
    curl = shutil.which("curl")
    assert curl, "the curl binary is required for this test"
    proc = subprocess.Popen(
        [
            str(INFEROUTE),
            "up",
            "--listen",
            "127.0.0.1:0",
            "--sim-base-port",
            "0",
            "--time-scale",
            "0.02",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        banner = _read_banner(proc)
        port = _banner_port(banner)
        assert f"http://127.0.0.1:{port}/metrics" in banner
        assert banner.count("sim-") == 4 and "sql-lora" in banner and "chat-lora" in banner
        example = re.search(r"curl -s (\S+) .* -d '(.+)'", banner)
        assert example, banner
        body = json.loads(example.group(2))
        body["max_tokens"] = 4
        out = subprocess.run(
            [
                curl,
                "-s",
                "-S",
                "--max-time",
                "30",
                "-H",
                "Content-Type: application/json",
                "-d",
                json.dumps(body),
                "-D",
                "-",
                example.group(1),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        head, _, payload = out.stdout.partition("\n\n")  # text mode turned CRLF into LF
        assert head.startswith("HTTP/1.1 200"), out.stdout
        doc = json.loads(payload)
        assert doc["object"] == "chat.completion" and doc["choices"][0]["message"]["content"]
        assert "x-request-id" in head.lower()
        streaming = re.search(r"curl -sN (\S+) .* -d '(.+)'", banner)
        assert streaming, banner
        sbody = json.loads(streaming.group(2))
        assert sbody["stream"] is True and sbody["model"] == "sql-lora"
        sbody["max_tokens"] = 5
        sse = subprocess.run(
            [
                curl,
                "-sN",
                "--max-time",
                "30",
                "-H",
                "Content-Type: application/json",
                "-d",
                json.dumps(sbody),
                streaming.group(1),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        events = [ln for ln in sse.splitlines() if ln.startswith("data: ")]
        assert len(events) >= 3 and events[-1] == "data: [DONE]"
        metrics = subprocess.run(
            [curl, "-s", f"http://127.0.0.1:{port}/metrics"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        assert 'inferoute_gateway_requests_total{code="200",route="/"} 2.0' in metrics
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
        stderr = proc.stderr.read() if proc.stderr else ""
        assert code == 0, stderr
        assert "Traceback" not in stderr
        assert "SIGINT: stopping" in (proc.stdout.read() if proc.stdout else "")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def test_up_refuses_a_busy_port_with_a_clear_message() -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [str(INFEROUTE), "up", "--listen", f"127.0.0.1:{port}", "--sim-base-port", "0"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 1
    assert f"cannot start the gateway on 127.0.0.1:{port}: address already in use" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_make_up_defaults_to_127_0_0_1_8080() -> None:
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\nup:", 1)[1].split("\n\n", 1)[0]
    assert "inferoute up" in recipe and "--listen" not in recipe  # make up relies on the default
    assert DEFAULT_LISTEN == "127.0.0.1:8080"
    assert UpOptions().listen is None and default_config().listen == "127.0.0.1:8080"
    assert UpOptions().sim_base_port == 8100 and UpOptions().replicas == 4
    help_text = CliRunner().invoke(up_command, ["--help"]).output
    assert "127.0.0.1:8080" in help_text


async def test_up_with_a_config_file_serves_that_config(tmp_path: Path) -> None:
    import asyncio

    import aiohttp

    from inferoute.sim import DEFAULT_MODEL, SimConfig, SimPool

    async with await SimPool.start(SimConfig(time_scale=0.02), replicas=2) as pool:
        cfg = tmp_path / "gw.yaml"
        cfg.write_text(
            "pool:\n  endpoints:\n"
            + "".join(
                f"    - {{name: {e.name}, address: {e.address}, port: {e.port}}}\n" for e in pool.endpoints
            )
            + "routes:\n  - {path: /v1/, bbr: {default_model: fallback}}\n"
        )
        proc = await asyncio.create_subprocess_exec(
            str(INFEROUTE),
            "up",
            "--config",
            str(cfg),
            "--listen",
            "127.0.0.1:0",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            banner = ""
            while "stop: Ctrl-C" not in banner:
                line = await asyncio.wait_for(proc.stdout.readline(), 60)
                assert line, banner
                banner += line.decode()
            port = _banner_port(banner)
            assert "replicas" not in banner  # no simulator: the file's pool is served
            assert "/v1/ -> embedded" in banner
            body = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            async with (
                aiohttp.ClientSession() as s,
                s.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as r,
            ):
                assert r.status == 200
                assert (await r.json())["object"] == "chat.completion"
            async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/other") as r:
                assert r.status == 404  # only the file's route exists
            proc.send_signal(signal.SIGINT)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
