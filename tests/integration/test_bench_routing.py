"""``inferoute bench routing`` end to end: real simulator, real routers (ours and the Rust peers), real files.

This is the CI smoke test of the routing benchmark (the ``--quick`` shape, kept well under a minute).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from inferoute.bench.peers import select_contenders
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


async def test_quick_run_measures_every_contender_and_writes_reports(tmp_path: Path) -> None:
    contenders = select_contenders("inferoute/round-robin,inferoute/gie-default,sglang-router/cache_aware")
    cfg = RunConfig(
        workloads=["shared-prefix"],
        rates={"shared-prefix": [4.0]},
        contenders=contenders,
        duration=3.0,
        warmup=0.5,
        replicas=2,
        time_scale=0.2,
        seed=5,
        out_dir=tmp_path,
        quick=True,
        command="test",
    )
    points = await run_benchmark(cfg)
    assert [p.contender for p in points] == [c.name for c in contenders]
    for p in points:
        assert p.measured >= 4, p
        assert p.ok == p.measured and p.errors == {}, p
        assert 0 < p.ttft_p50 <= p.ttft_p90 < 5
        assert p.output_tps > 0
        assert p.server["requests_finished"] >= p.ok  # the pool really served them
    rr = points[0]
    assert len(rr.served) == 2 and min(rr.served.values()) >= 1  # round-robin used both replicas

    run = json.loads((tmp_path / "run.json").read_text())
    assert len(run["points"]) == 3 and run["meta"]["seed"] == 5
    assert set(run["knees"]["shared-prefix"]) == {c.name for c in contenders}
    rows = list(csv.DictReader((tmp_path / "requests.csv").open()))
    assert len(rows) == sum(p.planned for p in points)
    assert {r["contender"] for r in rows} == {c.name for c in contenders}
    summary = (tmp_path / "summary.md").read_text()
    assert "| inferoute/gie-default | 4 |" in summary
    for chart in ("ttft-p90", "throughput", "cache-hit"):
        assert (tmp_path / f"shared-prefix-{chart}.png").stat().st_size > 1000
    # every process the runner started (simulators, routers) has been stopped and reaped
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
    bad = run("--duration", "2", "--warmup", "3")
    assert bad.returncode == 2 and "warm-up" in bad.stderr
