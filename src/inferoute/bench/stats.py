"""Summaries of benchmark points, knees and target checks (pure).

A *point* is one contender x workload x rate run. :func:`summarize` reduces its per-request results to
latency percentiles, throughput and cache-hit figures, excluding the warm-up (requests planned before
``warmup`` seconds). :func:`knee` finds where a contender's curve bends; the ``check_*`` functions state
issue 6's targets as pass/miss with the measured ratios.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from inferoute.bench.loadgen import RequestResult


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(slots=True)
class PointSummary:
    """The figures of one point. Latencies in seconds, throughputs per second of wall time."""

    contender: str
    workload: str
    rate: float
    planned: int = 0
    measured: int = 0
    offered_rate: float = 0.0
    """Measured requests / length of the measured window (the Poisson draw's actual rate)."""
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    ttft_p50: float = math.nan
    ttft_p90: float = math.nan
    ttft_p99: float = math.nan
    ttft_mean: float = math.nan
    itl_p50: float = math.nan
    itl_p90: float = math.nan
    e2e_p50: float = math.nan
    e2e_p90: float = math.nan
    output_tps: float = 0.0
    request_tps: float = 0.0
    cache_hit_rate: float = math.nan
    """Cached prompt tokens / prompt tokens, from the responses' usage (client side)."""
    send_lag_p99: float = math.nan
    """The load generator's own lateness: large values mean the client, not the server, was saturated."""
    served: dict[str, int] = field(default_factory=dict)
    """Measured requests per serving replica (from the ``x-inference-pod`` header)."""
    server: dict[str, float] = field(default_factory=dict)
    """Server-side counters scraped from the simulator pool (deltas over the point)."""
    cpu: dict[str, float] = field(default_factory=dict)
    """CPU evidence over the point's traffic (:mod:`inferoute.bench.cpu`): ``sim_cpu``, ``router_cpu``,
    ``loadgen_cpu`` (cores used), the matching ``*_wait`` (run-queue seconds per second), ``machine_busy``,
    ``load1``."""
    groups: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per request group (workloads that report classes, e.g. overload's ``<tenant>/<class>``): ``ttft_p90``,
    ``ok``, ``rejected`` (429s), ``goodput`` (successful requests per second of the measured window)."""

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def as_dict(self) -> dict[str, Any]:
        return {k: _clean(v) for k, v in asdict(self).items()}


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 6)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


def group_stats(results: Sequence[RequestResult], warmup: float) -> dict[str, dict[str, float]]:
    """Per-group p90 TTFT, successes, 429s and goodput over the measured window."""
    measured = [r for r in results if r.scheduled >= warmup]
    if not measured:
        return {}
    begin = min(r.sent for r in measured)
    end = max((r.finished for r in measured if r.finished is not None), default=begin)
    window = max(end - begin, 1e-9)
    out: dict[str, dict[str, float]] = {}
    for group in sorted({r.group for r in measured}):
        rs = [r for r in measured if r.group == group]
        ok = [r for r in rs if r.ok]
        ttfts = [t for r in ok if (t := r.ttft) is not None]
        out[group] = {
            "ttft_p90": percentile(ttfts, 90),
            "ok": float(len(ok)),
            "rejected": float(sum(1 for r in rs if r.status == 429)),
            "goodput": len(ok) / window,
        }
    return out


def summarize(
    contender: str,
    workload: str,
    rate: float,
    results: Sequence[RequestResult],
    warmup: float,
    duration: float | None = None,
) -> PointSummary:
    """Reduce one point's results; requests planned before ``warmup`` seconds are left out.

    ``duration`` (the plan's length) gives the offered rate of the measured window; without it the
    nominal ``rate`` is used.
    """
    s = PointSummary(contender, workload, rate, planned=len(results))
    measured = [r for r in results if r.scheduled >= warmup]
    s.measured = len(measured)
    s.offered_rate = len(measured) / (duration - warmup) if duration and duration > warmup else rate
    ok = [r for r in measured if r.ok]
    s.ok = len(ok)
    s.errors = dict(Counter(r.error for r in measured if r.error is not None))
    ttfts = [t for r in ok if (t := r.ttft) is not None]
    itls = [gap for r in ok for gap in r.itls]
    e2es = [t for r in ok if (t := r.e2e) is not None]
    s.ttft_p50, s.ttft_p90, s.ttft_p99 = (percentile(ttfts, q) for q in (50, 90, 99))
    s.ttft_mean = sum(ttfts) / len(ttfts) if ttfts else math.nan
    s.itl_p50, s.itl_p90 = percentile(itls, 50), percentile(itls, 90)
    s.e2e_p50, s.e2e_p90 = percentile(e2es, 50), percentile(e2es, 90)
    if measured:
        begin = min(r.sent for r in measured)
        end = max((r.finished for r in measured if r.finished is not None), default=begin)
        window = max(end - begin, 1e-9)
        s.output_tps = sum(r.output_tokens for r in ok) / window
        s.request_tps = len(ok) / window
        s.send_lag_p99 = percentile([r.send_lag for r in measured], 99)
    prompt = sum(r.prompt_tokens for r in ok)
    if prompt:
        s.cache_hit_rate = sum(r.cached_tokens for r in ok) / prompt
    s.served = dict(sorted(Counter(r.served_by or "?" for r in ok).items()))
    return s


@dataclass(frozen=True, slots=True)
class Knee:
    """Where a curve bends: ``rate`` is the last rate before saturation (None if even the first saturates)."""

    rate: float | None
    saturated_at: float | None
    reason: str


def knee(points: Sequence[PointSummary], ttft_factor: float = 3.0, min_goodput: float = 0.9) -> Knee:
    """The knee of one contender's rate curve.

    A point is *saturated* when its completed-request rate falls below ``min_goodput`` x the offered
    rate, when it has errors on more than 1% of requests, or when its p90 TTFT exceeds ``ttft_factor`` x
    the p90 TTFT at the lightest rate. The knee is the last rate before the first saturated point.
    """
    ordered = sorted(points, key=lambda p: p.rate)
    if not ordered:
        return Knee(None, None, "no points")
    base = ordered[0].ttft_p90
    last_ok: float | None = None
    for p in ordered:
        why = _saturation(p, base, ttft_factor, min_goodput)
        if why:
            return Knee(last_ok, p.rate, why)
        last_ok = p.rate
    return Knee(last_ok, None, "not saturated in the measured range")


def _saturation(p: PointSummary, base_ttft: float, ttft_factor: float, min_goodput: float) -> str:
    if p.measured and p.error_count > 0.01 * p.measured:
        return f"errors {p.error_count}/{p.measured}"
    offered = p.offered_rate if p.offered_rate > 0 else p.rate
    if offered > 0 and p.request_tps < min_goodput * offered:
        return f"completed {p.request_tps:.2f}/s < {min_goodput:.0%} of offered {offered:.2f}/s"
    if not math.isnan(base_ttft) and p.ttft_p90 > ttft_factor * base_ttft:
        return f"p90 TTFT {p.ttft_p90:.3f}s > {ttft_factor:g}x light-load {base_ttft:.3f}s"
    return ""


@dataclass(frozen=True, slots=True)
class TargetCheck:
    name: str
    passed: bool
    detail: str


def by_contender(points: Iterable[PointSummary]) -> dict[str, list[PointSummary]]:
    out: dict[str, list[PointSummary]] = {}
    for p in points:
        out.setdefault(p.contender, []).append(p)
    for series in out.values():
        series.sort(key=lambda p: p.rate)
    return out


def at_rate(series: Sequence[PointSummary], rate: float) -> PointSummary | None:
    return next((p for p in series if math.isclose(p.rate, rate)), None)


def check_shared_prefix(
    points: Sequence[PointSummary], baseline: str, ours: Sequence[str], peers: Sequence[str]
) -> tuple[float | None, list[TargetCheck]]:
    """Issue 6's shared-prefix targets, evaluated at the baseline's knee rate.

    Returns the comparison rate and the checks: our best p90 TTFT ≤ 1/5 of the baseline's and ≤ the best
    peer's, and our output throughput ≥ 1.3x the baseline's. "Our best" is the inferoute configuration
    with the lowest p90 TTFT at that rate. Below the baseline's saturation every contender carries the
    offered load, so the throughput ratio at the knee is ~1 by construction; the throughput target is
    therefore also checked at the first rate where the baseline saturates and on the peak (capacity) over
    all measured rates.
    """
    series = by_contender(points)
    if baseline not in series:
        return None, [TargetCheck("baseline present", False, f"{baseline} not measured")]
    k = knee(series[baseline])
    rate = k.rate if k.rate is not None else series[baseline][0].rate
    base = at_rate(series[baseline], rate)
    mine = [p for name in ours if name in series and (p := at_rate(series[name], rate)) is not None]
    theirs = [p for name in peers if name in series and (p := at_rate(series[name], rate)) is not None]
    if base is None or not mine:
        return rate, [TargetCheck("inferoute present", False, "no inferoute point at the knee rate")]
    best = min(mine, key=_ttft_key)
    checks = [
        TargetCheck(
            "p90 TTFT ≤ 1/5 of round-robin",
            best.ttft_p90 <= base.ttft_p90 / 5,
            f"{best.contender} {best.ttft_p90:.3f}s vs {baseline} {base.ttft_p90:.3f}s "
            f"(ratio {_ratio(best.ttft_p90, base.ttft_p90)})",
        )
    ]
    if theirs:
        best_peer = min(theirs, key=_ttft_key)
        checks.append(
            TargetCheck(
                "p90 TTFT ≤ best peer",
                best.ttft_p90 <= best_peer.ttft_p90,
                f"{best.contender} {best.ttft_p90:.3f}s vs {best_peer.contender} {best_peer.ttft_p90:.3f}s "
                f"(ratio {_ratio(best.ttft_p90, best_peer.ttft_p90)})",
            )
        )
    checks.append(_throughput_check(f"at the knee, {rate:g}/s", best, base))
    if k.saturated_at is not None:
        sat_base = at_rate(series[baseline], k.saturated_at)
        sat_best = at_rate(series[best.contender], k.saturated_at)
        if sat_base is not None and sat_best is not None:
            checks.append(
                _throughput_check(f"where round-robin saturates, {k.saturated_at:g}/s", sat_best, sat_base)
            )
    peak_base = max(series[baseline], key=lambda p: p.output_tps)
    peak_best = max(series[best.contender], key=lambda p: p.output_tps)
    checks.append(_throughput_check("peak over the measured rates", peak_best, peak_base))
    return rate, checks


def capacity_at_slo(points: Sequence[PointSummary], slo: float = 1.0) -> float:
    """The highest offered rate up to which every measured rate kept p90 TTFT under ``slo`` (0: none)."""
    best = 0.0
    for p in sorted(points, key=lambda p: p.rate):
        if not p.ok or not p.ttft_p90 < slo:
            break
        best = p.rate
    return best


def check_kv_pressure(
    points: Sequence[PointSummary], ours: Sequence[str], peers: Sequence[str], slo: float
) -> list[TargetCheck]:
    """Issue 15's kv-pressure targets: inferoute's best profile (highest capacity at p90 TTFT < ``slo``) has
    ≥ 1.5x the best peer's capacity and a p90 TTFT no worse than the best peer's at every measured rate up to
    1.5x that peer's capacity; ``predicted-ttft`` has at least ``gie-default``'s capacity. A capacity equal to
    the highest measured rate is a lower bound (shown with ≥)."""
    series = by_contender(points)
    top = max(p.rate for p in points)
    caps = {name: capacity_at_slo(ps, slo) for name, ps in series.items()}

    def shown(name: str) -> str:
        return f"{name} {'≥ ' if caps[name] == top else ''}{caps[name]:g}/s"

    mine = [n for n in ours if n in caps]
    theirs = [n for n in peers if n in caps]
    if not mine or not theirs:
        return [TargetCheck("inferoute and a peer present", False, "need both to compare capacities")]
    best = max(mine, key=lambda n: caps[n])
    peer = max(theirs, key=lambda n: caps[n])
    checks = [
        TargetCheck(
            f"capacity at p90 TTFT < {slo:g}s ≥ 1.5x best peer",
            caps[best] >= 1.5 * caps[peer] and caps[best] > 0,
            f"{shown(best)} vs {shown(peer)} (ratio {_ratio(caps[best], caps[peer])})",
        )
    ]
    limit = 1.5 * caps[peer]
    pairs = [
        (p, q) for p in series[best] if p.rate <= limit and (q := at_rate(series[peer], p.rate)) is not None
    ]
    worse = [
        f"{p.rate:g}/s {p.ttft_p90:.3f}s vs {q.ttft_p90:.3f}s"
        for p, q in pairs
        if not p.ttft_p90 <= q.ttft_p90
    ]
    checks.append(
        TargetCheck(
            f"p90 TTFT ≤ best peer at every rate up to 1.5x its capacity ({limit:g}/s)",
            bool(pairs) and not worse,
            f"{best} vs {peer} at {len(pairs)} rate(s)" + (f"; worse at {', '.join(worse)}" if worse else ""),
        )
    )
    ptt, gie = "inferoute/predicted-ttft", "inferoute/gie-default"
    if ptt in caps and gie in caps:
        checks.append(
            TargetCheck(
                "predicted-ttft capacity ≥ gie-default",
                caps[ptt] >= caps[gie],
                f"{shown(ptt)} vs {shown(gie)}",
            )
        )
    return checks


def _throughput_check(where: str, best: PointSummary, base: PointSummary) -> TargetCheck:
    at = "" if best.rate == base.rate else f" at {best.rate:g}/s vs {base.rate:g}/s"
    return TargetCheck(
        f"output throughput ≥ 1.3x round-robin ({where})",
        best.output_tps >= 1.3 * base.output_tps,
        f"{best.contender} {best.output_tps:.0f} tok/s vs {base.contender} {base.output_tps:.0f} tok/s{at} "
        f"(ratio {_ratio(best.output_tps, base.output_tps)})",
    )


def check_lora_waits(
    points: Sequence[PointSummary], ours: Sequence[str], peers: Sequence[str], counter: str
) -> list[TargetCheck]:
    """Issue 6's multi-lora target: our best configuration has fewer adapter-slot waits than every peer,
    summed over all rates (server counter ``counter``)."""
    series = by_contender(points)

    def total(name: str) -> float:
        return sum(p.server.get(counter, 0.0) for p in series.get(name, []))

    mine = {n: total(n) for n in ours if n in series}
    theirs = {n: total(n) for n in peers if n in series}
    if not mine or not theirs:
        return [TargetCheck("adapter-slot waits < every peer", False, "missing inferoute or peer points")]
    best = min(mine, key=lambda n: mine[n])
    worst_margin = min(theirs, key=lambda n: theirs[n])
    return [
        TargetCheck(
            "adapter-slot waits < every peer",
            all(mine[best] < v for v in theirs.values()),
            f"{best} {mine[best]:.0f} waits vs fewest among peers {worst_margin} {theirs[worst_margin]:.0f}",
        )
    ]


def _ttft_key(p: PointSummary) -> float:
    return math.inf if math.isnan(p.ttft_p90) else p.ttft_p90


def _ratio(a: float, b: float) -> str:
    if b == 0 or math.isnan(a) or math.isnan(b):
        return "n/a"
    return f"{a / b:.2f}"


def server_delta(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """Counter deltas between two scrapes (keys missing before count from 0)."""
    return {k: v - before.get(k, 0.0) for k, v in after.items()}
