"""Routing benchmark reports: JSON, CSV, PNG plots and a markdown summary.

Everything here reads :class:`~inferoute.bench.stats.PointSummary` objects and writes files; the
markdown is built by pure functions (:func:`markdown_tables`) so the same text goes to ``summary.md``
and to docs.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from inferoute.bench.loadgen import RequestResult
from inferoute.bench.stats import Knee, PointSummary, TargetCheck, by_contender, knee

SUMMARY_FIELDS = (
    "workload",
    "contender",
    "rate",
    "measured",
    "ok",
    "errors",
    "ttft_p50",
    "ttft_p90",
    "ttft_p99",
    "itl_p50",
    "itl_p90",
    "e2e_p50",
    "e2e_p90",
    "output_tps",
    "request_tps",
    "cache_hit_rate",
    "send_lag_p99",
)


def write_summary_csv(path: Path, points: Iterable[PointSummary]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*SUMMARY_FIELDS, "server"])
        for p in points:
            d = p.as_dict()
            d["errors"] = p.error_count
            w.writerow(
                [
                    *("" if d[k] is None else d[k] for k in SUMMARY_FIELDS),
                    json.dumps(d["server"], sort_keys=True),
                ]
            )


class RequestCsv:
    """Appends per-request rows (one file for the whole run)."""

    FIELDS = (
        "workload",
        "contender",
        "rate",
        "index",
        "group",
        "model",
        "scheduled",
        "sent",
        "status",
        "error",
        "ttft",
        "e2e",
        "mean_itl",
        "max_itl",
        "output_tokens",
        "prompt_tokens",
        "cached_tokens",
        "served_by",
        "router",
        "send_lag",
    )

    def __init__(self, path: Path) -> None:
        self.path = path
        with path.open("w", newline="") as f:
            csv.writer(f).writerow(self.FIELDS)

    def append(self, workload: str, contender: str, rate: float, results: Sequence[RequestResult]) -> None:
        with self.path.open("a", newline="") as f:
            w = csv.writer(f)
            for r in results:
                row = {"workload": workload, "contender": contender, "rate": rate, **r.row()}
                w.writerow([row[k] for k in self.FIELDS])


def write_json(
    path: Path,
    meta: Mapping[str, Any],
    points: Sequence[PointSummary],
    knees: Mapping[str, Mapping[str, Knee]],
    targets: Mapping[str, Sequence[TargetCheck]],
) -> None:
    payload = {
        "meta": dict(meta),
        "points": [p.as_dict() for p in points],
        "knees": {
            w: {
                c: {"rate": k.rate, "saturated_at": k.saturated_at, "reason": k.reason} for c, k in ks.items()
            }
            for w, ks in knees.items()
        },
        "targets": {
            w: [{"name": t.name, "passed": t.passed, "detail": t.detail} for t in ts]
            for w, ts in targets.items()
        },
    }
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def knees_for(points: Sequence[PointSummary]) -> dict[str, Knee]:
    return {name: knee(series) for name, series in by_contender(points).items()}


def _fmt(value: float, scale: float = 1.0, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value * scale:.{digits}f}"


def _count(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def markdown_tables(
    workload: str,
    points: Sequence[PointSummary],
    knees: Mapping[str, Knee],
    server_columns: Sequence[tuple[str, str]] = (),
) -> str:
    """One markdown table per workload: a row per contender x rate, then the knees."""
    series = by_contender(p for p in points if p.workload == workload)
    server_columns = [c for c in server_columns if any(c[0] in p.server for p in points)]
    head = [
        "contender",
        "rate/s",
        "ok",
        "err",
        "TTFT p50 s",
        "TTFT p90 s",
        "ITL p90 ms",
        "e2e p90 s",
        "out tok/s",
        "cache hit",
    ] + [title for _, title in server_columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rows in series.items():
        for p in rows:
            cells = [
                name,
                f"{p.rate:g}",
                str(p.ok),
                str(p.error_count),
                _fmt(p.ttft_p50),
                _fmt(p.ttft_p90),
                _fmt(p.itl_p90, 1000, 1),
                _fmt(p.e2e_p90),
                f"{p.output_tps:.0f}",
                _fmt(p.cache_hit_rate, 100, 0) + ("%" if not math.isnan(p.cache_hit_rate) else ""),
            ]
            cells += [_count(p.server.get(key, 0.0)) for key, _ in server_columns]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Knees (last rate before saturation):")
    lines.append("")
    for name in series:
        k = knees.get(name)
        if k is None:
            continue
        at = f"{k.rate:g}/s" if k.rate is not None else "below the lightest rate"
        why = (
            f" — saturates at {k.saturated_at:g}/s: {k.reason}"
            if k.saturated_at is not None
            else f" ({k.reason})"
        )
        lines.append(f"- `{name}`: {at}{why}")
    return "\n".join(lines) + "\n"


def markdown_targets(checks: Sequence[TargetCheck]) -> str:
    return "\n".join(f"- {'PASS' if t.passed else 'MISS'} — {t.name}: {t.detail}" for t in checks) + "\n"


def plot_workload(
    out_dir: Path,
    workload: str,
    points: Sequence[PointSummary],
    title_note: str = "",
    server_charts: Sequence[tuple[str, str]] = (),
) -> list[Path]:
    """PNGs for a workload: p90 TTFT vs rate, output throughput vs rate, cache hit rate vs rate (when any
    point had a hit), and one chart per ``(server counter, label)`` in ``server_charts``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [p for p in points if p.workload == workload]
    series = by_contender(mine)
    charts: list[tuple[str, str, Any, bool]] = [
        ("ttft-p90", "p90 time to first token (s)", lambda p: p.ttft_p90, True),
        ("throughput", "output tokens/s", lambda p: p.output_tps, False),
    ]
    if any(p.cache_hit_rate > 0 for p in mine):
        charts.append(("cache-hit", "prompt cache hit rate (%)", lambda p: p.cache_hit_rate * 100, False))
    for key, label in server_charts:
        if any(key in p.server for p in mine):
            charts.append((key.replace("_", "-"), label, lambda p, k=key: p.server.get(k, math.nan), False))
    written: list[Path] = []
    for slug, ylabel, get, log_y in charts:
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=80)
        for i, (name, rows) in enumerate(series.items()):
            style = "-" if name.startswith("inferoute/") else "--"
            marker = "osD^vP*X"[i % 8]
            ax.plot(
                [p.rate for p in rows],
                [get(p) for p in rows],
                style,
                marker=marker,
                markersize=4,
                linewidth=1.4,
                label=name,
            )
        ax.set_xlabel("offered rate (requests/s)")
        ax.set_ylabel(ylabel)
        if log_y:
            ax.set_yscale("log")
        ax.set_title(f"{workload}: {ylabel}" + (f"\n{title_note}" if title_note else ""), fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6, ncol=2, loc="best", framealpha=0.7)
        fig.tight_layout()
        path = out_dir / f"{workload}-{slug}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def load_points(path: Path) -> tuple[dict[str, Any], list[PointSummary]]:
    """Read back ``run.json``: (meta, point summaries)."""
    data = json.loads(path.read_text())
    points: list[PointSummary] = []
    for raw in data["points"]:
        fields: dict[str, Any] = {k: (math.nan if v is None else v) for k, v in raw.items()}
        points.append(PointSummary(**fields))
    return dict(data["meta"]), points
