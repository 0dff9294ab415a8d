"""``inferoute bench sim-metrics``: the CPU cost of one simulator replica's ``/metrics`` page per scrape.

A replica with 2 LoRA adapters serves ``--requests`` completions first (every histogram populated, a ~30 KB
page), then the page is produced ``--scrapes`` times while the replica is idle, two ways in the same run:
``cached`` (what ``GET /metrics`` does: :class:`inferoute.sim.metrics.MetricsPage`, rendered again only when
something changed) and ``full render`` (``generate_latest`` of every collector on each scrape, what the
simulator did before the cache, and still does when the engine changed since the last scrape). CPU time is
``time.process_time``; the picker scrapes every replica 20 times a second, so the share of a core at 20 Hz
is printed too.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

import aiohttp
import click
from prometheus_client import generate_latest

from inferoute.sim import SimConfig, SimPool


def _cpu_per_call(fn: Callable[[], bytes], n: int) -> float:
    t0 = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - t0) / n


async def _measure(requests: int, scrapes: int) -> list[str]:
    cfg = SimConfig(time_scale=0.01, lora_adapters=("sql-lora", "chat-lora"), max_loras=2)
    async with await SimPool.start(cfg, replicas=1) as pool:
        async with aiohttp.ClientSession() as s:
            for i in range(requests):
                model = ("sql-lora", "chat-lora", cfg.model)[i % 3]
                body = {"model": model, "prompt": f"hello {i}", "max_tokens": 16}
                async with s.post(pool.urls[0] + "/v1/completions", json=body) as r:
                    await r.read()
        replica = pool.replicas[0]
        page = replica.metrics_page
        size = len(page.body())
        cached = _cpu_per_call(page.body, scrapes)
        full = _cpu_per_call(lambda: generate_latest(replica.metrics_registry), scrapes)
    load = os.getloadavg()[0]
    lines = [f"page {size:,} bytes, {scrapes} scrapes each, load average {load:.2f}"]
    for name, cost in (("cached (idle)", cached), ("full render", full)):
        lines.append(
            f"{name:>14}: {cost * 1e6:8.1f} µs CPU per scrape, {cost * 20 * 100:6.2f}% of a core at 20 Hz"
        )
    lines.append(f"full render / cached: {full / cached:.0f}x")
    return lines


@click.command("sim-metrics")
@click.option(
    "--requests",
    default=200,
    show_default=True,
    type=click.IntRange(min=0),
    help="Completions served before measuring.",
)
@click.option(
    "--scrapes", default=400, show_default=True, type=click.IntRange(min=1), help="Scrapes timed per variant."
)
def command(requests: int, scrapes: int) -> None:
    """CPU per scrape of a simulator replica's /metrics page: cached vs a full render."""
    for line in asyncio.run(_measure(requests, scrapes)):
        click.echo(line)
