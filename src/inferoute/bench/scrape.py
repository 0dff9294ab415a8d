"""Server-side counters of the simulator pool, scraped from each replica's ``/metrics``.

:func:`pool_counters` sums chosen samples across replicas. Counters are compared before and after a point
(:func:`inferoute.bench.stats.server_delta`). The LoRA slot-wait count is what the multi-lora target compares.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Mapping, Sequence

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

# Samples (by sample name, labels summed) kept from the simulator's /metrics.
SERVER_SAMPLES: Mapping[str, str] = {
    "vllm:prefix_cache_hits_total": "prefix_cache_hits",
    "vllm:prefix_cache_queries_total": "prefix_cache_queries",
    "vllm:num_preemptions_total": "preemptions",
    "vllm:request_success_total": "requests_finished",
    "vllm:prompt_tokens_total": "prompt_tokens",
    "vllm:generation_tokens_total": "generation_tokens",
    "vllm:time_to_first_token_seconds_sum": "server_ttft_sum_s",
    "vllm:time_to_first_token_seconds_count": "server_ttft_count",
    "inferoute_sim:rejected_queue_full_total": "rejected_queue_full",
    # Requests that found no free adapter slot, and adapter loads (inferoute's simulator). For servers
    # without these counters, LoRA waits are measured by sampling (LoraWaitSampler).
    "inferoute_sim:lora_slot_waits_total": "lora_slot_waits",
    "inferoute_sim:lora_loads_total": "lora_loads",
}
LORA_WAITS = "lora_slot_waits"
"""Requests that found every adapter slot busy (the simulator counts each request once)."""
LORA_LOADS = "lora_loads"
LORA_WAIT_SECONDS = "lora_waiting_adapter_seconds"
"""Sampled: sum over replicas and time of the number of adapters that waiting requests ask for."""


def parse_samples(text: str, wanted: Mapping[str, str] = SERVER_SAMPLES) -> dict[str, float]:
    """Sum the wanted samples of one Prometheus exposition (pure)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = wanted.get(sample.name)
            if key is not None:
                out[key] = out.get(key, 0.0) + float(sample.value)
    return out


def add(totals: Iterable[Mapping[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for t in totals:
        for k, v in t.items():
            out[k] = out.get(k, 0.0) + v
    return out


def waiting_adapters(text: str) -> int:
    """Adapters named in ``waiting_lora_adapters`` of the newest ``vllm:lora_requests_info`` series (pure).

    vLLM exposes one series per label combination with the wall time as value; the newest one is current.
    """
    newest: tuple[float, int] | None = None
    for family in text_string_to_metric_families(text):
        if family.name != "vllm:lora_requests_info":
            continue
        for sample in family.samples:
            waiting = sample.labels.get("waiting_lora_adapters", "")
            count = len([a for a in waiting.split(",") if a.strip()])
            if newest is None or sample.value >= newest[0]:
                newest = (float(sample.value), count)
    return 0 if newest is None else newest[1]


class LoraWaitSampler:
    """Scrapes every replica each ``interval`` seconds and integrates the number of adapters waiting for a
    slot (adapter-seconds). Started and stopped around a point with ``async with``."""

    def __init__(self, urls: Sequence[str], interval: float = 0.1) -> None:
        self.urls = list(urls)
        self.interval = interval
        self.adapter_seconds = 0.0
        self.samples = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LoraWaitSampler:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="lora-wait-sampler")
        return self

    async def __aexit__(self, *exc: object) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        timeout = aiohttp.ClientTimeout(total=max(1.0, 5 * self.interval))
        async with aiohttp.ClientSession(timeout=timeout) as session:
            last = loop.time()
            while True:
                counts = await asyncio.gather(*(self._one(session, u) for u in self.urls))
                now = loop.time()
                self.adapter_seconds += sum(counts) * (now - last)
                self.samples += 1
                last = now
                await asyncio.sleep(self.interval)

    async def _one(self, session: aiohttp.ClientSession, url: str) -> int:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.get(url.rstrip("/") + "/metrics") as resp:
                if resp.status == 200:
                    return waiting_adapters(await resp.text())
        return 0


async def pool_counters(urls: Sequence[str], scrape_timeout: float = 5.0) -> dict[str, float]:
    """Scrape every replica and add their samples (a replica that does not answer contributes nothing)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=scrape_timeout)) as session:

        async def one(url: str) -> dict[str, float]:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(url.rstrip("/") + "/metrics") as resp:
                    if resp.status == 200:
                        return parse_samples(await resp.text())
            return {}

        return add(await asyncio.gather(*(one(u) for u in urls)))
