"""Reports: markdown tables, CSV/JSON files and plots."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from inferoute.bench.report import (
    load_points,
    markdown_tables,
    markdown_targets,
    plot_workload,
    write_json,
    write_summary_csv,
)
from inferoute.bench.stats import PointSummary, TargetCheck, knee


def pts() -> list[PointSummary]:
    out = []
    for name, ttfts in (
        ("inferoute/gie-default", (0.1, 0.12, 0.2)),
        ("vllm-router/round_robin", (0.3, 2, 9)),
    ):
        for rate, t in zip((1.0, 2.0, 4.0), ttfts, strict=True):
            p = PointSummary(name, "shared-prefix", rate, planned=10, measured=10, ok=10)
            p.ttft_p50, p.ttft_p90, p.output_tps, p.request_tps = t / 2, t, 100 * rate, rate
            p.cache_hit_rate = 0.5
            p.server = {"lora_slot_waits": 3.0}
            out.append(p)
    return out


def test_markdown_table_has_a_row_per_point_and_the_knees() -> None:
    points = pts()
    knees = {"inferoute/gie-default": knee(points[:3]), "vllm-router/round_robin": knee(points[3:])}
    text = markdown_tables(
        "shared-prefix", points, knees, [("lora_slot_waits", "slot waits"), ("absent", "never measured")]
    )
    rows = [line for line in text.splitlines() if line.startswith("| inferoute") or line.startswith("| vllm")]
    assert len(rows) == 6
    assert "| slot waits |" in text and "| 3 |" in text
    assert "never measured" not in text  # a server column no point has is left out
    assert "`inferoute/gie-default`: 4/s (not saturated" in text
    assert "`vllm-router/round_robin`: 1/s — saturates at 2/s" in text
    assert "50%" in text


def test_targets_markdown_says_pass_and_miss() -> None:
    text = markdown_targets([TargetCheck("a", True, "x"), TargetCheck("b", False, "y")])
    assert text.splitlines() == ["- PASS — a: x", "- MISS — b: y"]


def test_files_and_plots(tmp_path: Path) -> None:
    points = pts()
    write_summary_csv(tmp_path / "s.csv", points)
    with (tmp_path / "s.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and rows[0]["contender"] == "inferoute/gie-default"
    write_json(
        tmp_path / "r.json",
        {"seed": 1},
        points,
        {"shared-prefix": {"c": knee(points[:3])}},
        {"shared-prefix": [TargetCheck("a", True, "x")]},
    )
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["meta"] == {"seed": 1} and len(data["points"]) == 6
    assert data["knees"]["shared-prefix"]["c"]["rate"] == 4.0
    meta, back = load_points(tmp_path / "r.json")
    assert meta == {"seed": 1}
    assert [(p.contender, p.rate, p.ttft_p90, p.server) for p in back] == [
        (p.contender, p.rate, p.ttft_p90, p.server) for p in points
    ]
    assert math.isnan(back[0].itl_p90)  # NaN survives the round trip (null in JSON)
    written = plot_workload(tmp_path, "shared-prefix", points, "note", [("lora_slot_waits", "waits")])
    assert [p.name for p in written] == [
        "shared-prefix-ttft-p90.png",
        "shared-prefix-throughput.png",
        "shared-prefix-cache-hit.png",
        "shared-prefix-lora-slot-waits.png",
    ]
    for p in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert p.stat().st_size < 200_000
