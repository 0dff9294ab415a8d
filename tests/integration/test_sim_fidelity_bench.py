"""`inferoute bench sim` end to end at a tiny size: a real simulator process, the timestamping client."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_bench_sim_small_sweep(tmp_path: Path) -> None:
    out = tmp_path / "fidelity.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "inferoute",
            "bench",
            "sim",
            "--streams",
            "4,8",
            "--duration",
            "1",
            "--warmup",
            "0.5",
            "--max-tokens",
            "20",
            "--time-scale",
            "0.5",
            "--no-pin",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "max streams with p99 delay" in proc.stdout
    result = json.loads(out.read_text())
    levels = result["levels"]
    assert [lv["streams"] for lv in levels] == [4, 8]
    for lv in levels:
        assert lv["errors"] == 0
        assert lv["requests"] > 0
        # 4-8 streams at ~5 ms per token for 1 s: hundreds of tokens, each stamped and timed
        assert lv["tokens"] > 100
        assert lv["delay_p50_ms"] >= 0 and lv["delay_p99_ms"] >= lv["delay_p50_ms"]
        assert lv["server_p50_ms"] <= lv["delay_p50_ms"] + 1.0
    assert result["meta"]["time_scale"] == 0.5
