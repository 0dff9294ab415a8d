"""``inferoute bench routing`` end to end: real simulator, real routers (ours and the Rust peers), real files.

This is the CI smoke test of the routing benchmark (the ``--quick`` shape, kept well under a minute).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from inferoute.bench.peers import Contender, select_contenders
from inferoute.bench.routing import RunConfig, run_benchmark


def live_children() -> list[int]:
    """Pids whose parent is this process (from /proc)."""
    me = str(os.getpid())
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if stat.rsplit(")", 1)[1].split()[1] == me:
                out.append(int(entry.name))
    return out


def quick_config(
    out: Path, contenders: list[Contender], rate: float, duration: float, seed: int, router_replicas: int = 1
) -> RunConfig:
    """One shared-prefix point per contender on two replicas at time scale 0.2 (a few seconds each)."""
    return RunConfig(
        workloads=["shared-prefix"],
        rates={"shared-prefix": [rate]},
        contenders=contenders,
        duration=duration,
        warmup=0.5,
        replicas=2,
        router_replicas=router_replicas,
        time_scale=0.2,
        seed=seed,
        out_dir=out,
        quick=True,
        command="test",
    )


async def test_quick_run_measures_every_contender_and_writes_reports(tmp_path: Path) -> None:
    contenders = select_contenders("inferoute/round-robin,inferoute/gie-default,sglang-router/cache_aware")
    cfg = quick_config(tmp_path, contenders, rate=4.0, duration=3.0, seed=5)
    points = await run_benchmark(cfg)
    assert [p.contender for p in points] == [c.name for c in contenders]
    for p in points:
        assert p.measured >= 4, p
        assert p.ok == p.measured and p.errors == {}, p
        assert 0 < p.ttft_p50 <= p.ttft_p90 < 5
        assert p.output_tps > 0
        assert p.server["requests_finished"] >= p.ok  # the pool really served them
        # CPU evidence: the pool, the router and this process (the load generator) each used some CPU,
        # measured over the traffic only; waits are run-queue seconds per second, never negative
        assert p.cpu["sim_cpu"] > 0 and p.cpu["router_cpu"] > 0 and p.cpu["loadgen_cpu"] > 0, p.cpu
        assert all(p.cpu[f"{r}_wait"] >= 0 for r in ("sim", "router", "loadgen")), p.cpu
        assert 0 < p.cpu["machine_busy"] <= 1 and p.cpu["wall_s"] >= 2.5, p.cpu
    rr = points[0]
    assert len(rr.served) == 2 and min(rr.served.values()) >= 1  # round-robin used both replicas

    run = json.loads((tmp_path / "run.json").read_text())
    assert len(run["points"]) == 3 and run["meta"]["seed"] == 5
    assert set(run["knees"]["shared-prefix"]) == {c.name for c in contenders}
    with (tmp_path / "requests.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(p.planned for p in points)
    assert {r["contender"] for r in rows} == {c.name for c in contenders}
    summary = (tmp_path / "summary.md").read_text()
    assert "| inferoute/gie-default | 4 |" in summary
    assert "| sglang-router/cache_aware | 4 | " in summary.split("CPU during each point")[1]
    assert "H100-equivalent" in summary  # time scale 0.2: the capacity also in modelled-H100 terms
    for chart in ("ttft-p90", "throughput", "cache-hit"):
        assert (tmp_path / f"shared-prefix-{chart}.png").stat().st_size > 1000
    # every process the runner started (simulators, routers) has been stopped and reaped
    assert live_children() == []


async def test_two_router_replicas_share_the_traffic_of_a_point(tmp_path: Path) -> None:
    """``--router-replicas 2``: two gateways (each its own picker) in front of one pool, requests spread
    over them per request, the same assignment for both contenders; logs and CPU cover both; our two
    instances sync through a redis-server of the point's own, stopped with it."""
    contenders = select_contenders("inferoute/round-robin,inferoute/precise-local")
    cfg = quick_config(tmp_path, contenders, rate=6.0, duration=2.5, seed=7, router_replicas=2)
    points = await run_benchmark(cfg)
    for p in points:
        assert p.measured >= 4 and p.ok == p.measured and p.errors == {}, p
        assert p.cpu["router_cpu"] > 0, p.cpu
    with (tmp_path / "requests.csv").open() as f:
        rows = list(csv.DictReader(f))
    by = {c.name: [r["router"] for r in rows if r["contender"] == c.name] for c in contenders}
    first, second = by.values()
    assert first == second and {"0", "1"} <= set(first)  # both instances got requests, same spread for both
    assert all(r["status"] == "200" for r in rows)
    logs = sorted(path.name for path in (tmp_path / "logs").iterdir())
    assert "shared-prefix-6-inferoute-precise-local-router-1.log" in logs, logs
    meta = json.loads((tmp_path / "run.json").read_text())["meta"]
    assert meta["router_replicas"] == 2 and meta["router_sync"] is True
    summary = (tmp_path / "summary.md").read_text()
    assert "2 instances of each router" in summary and "through Redis" in summary
    for i in ("", "-1"):
        picker = yaml.safe_load((tmp_path / f"gateway-precise-local{i}.yaml").read_text())["picker"]
        assert picker["sync_redis"].startswith("unix://") and picker["sync_interval"] == pytest.approx(0.04)
    redis_log = (tmp_path / "redis" / "shared-prefix-6-inferoute-precise-local" / "redis.log").read_text()
    assert "ready to accept connections" in redis_log and "ready to exit" in redis_log
    assert live_children() == []


def test_cli_rejects_bad_arguments(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "inferoute", "bench", "routing", *args, "--out", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )

    bad = run("--contenders", "nginx/magic")
    assert bad.returncode == 2 and "unknown contender" in bad.stderr
    bad = run("--rates", "0")
    assert bad.returncode == 2 and "positive" in bad.stderr
    bad = run("--router-replicas", "0")
    assert bad.returncode == 2 and "--router-replicas" in bad.stderr
    bad = run("--duration", "2", "--warmup", "3")
    assert bad.returncode == 2 and "warm-up" in bad.stderr


def test_children_die_with_a_killed_benchmark(tmp_path: Path) -> None:
    """Even a SIGKILLed run leaves no simulator or router behind (PR_SET_PDEATHSIG)."""
    script = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from inferoute.bench.peers import ManagedProcess\n"
        "async def main():\n"
        f"    p = ManagedProcess('sleeper', ['sleep', '60'], Path({str(tmp_path / 'log')!r}))\n"
        "    await p.start()\n"
        "    print(p.proc.pid, flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = 0
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert process_state(child) not in (None, "Z")
        parent.kill()
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while process_state(child) not in (None, "Z") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process_state(child) in (None, "Z")  # dead (a zombie only until init reaps it)
    finally:
        parent.kill()
        parent.wait(timeout=10)
        assert parent.stdout is not None
        parent.stdout.close()
        if child and process_state(child) not in (None, "Z"):
            os.kill(child, signal.SIGKILL)  # the test failed: still clean up


def process_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]
