"""vLLM metric names and values as scraped, parsed with prometheus_client's own parser (no sockets)."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from inferoute.sim.config import SimConfig
from inferoute.sim.engine import Engine, SimRequest
from inferoute.sim.metrics import engine_registry
from inferoute.sim.stats import Histogram


def scrape(engine: Engine, wall: float = 1234.5) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    text = generate_latest(engine_registry(engine, wall_clock=lambda: wall)).decode()
    out: dict[str, list[tuple[str, dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.name, s.labels, s.value))
    return out


def value(samples: dict[str, list[tuple[str, dict[str, str], float]]], name: str) -> float:
    (only,) = samples[name]
    assert only[1]["model_name"] == "m"
    return only[2]


def test_histogram_buckets_are_le() -> None:
    h = Histogram((0.1, 1.0))
    h.observe(0.1)
    h.observe(0.5, n=3)
    h.observe(7.0)
    assert h.cumulative() == [("0.1", 1), ("1.0", 4), ("+Inf", 5)]
    assert h.count == 5 and h.sum == 0.1 + 1.5 + 7.0


def test_gauges_counters_and_histograms_use_vllm_names() -> None:
    e = Engine(
        SimConfig(
            model="m",
            kv_cache_blocks=100,
            block_size=16,
            lora_adapters=("a", "b"),
            max_loras=1,
            max_num_seqs=8,
        )
    )
    running = SimRequest("1", "a", list(range(40)), 50, 50, lora="a")
    waiting = SimRequest("2", "b", list(range(40)), 5, 5, lora="b")
    e.submit(running, 0.0)
    e.submit(waiting, 0.0)
    e.advance(0.0)
    s = scrape(e)
    assert value(s, "vllm:num_requests_running") == 1
    assert value(s, "vllm:num_requests_waiting") == 1
    assert value(s, "vllm:kv_cache_usage_perc") == pytest.approx(3 / 100)  # the prompt's ceil(40 / 16) blocks
    (info,) = s["vllm:cache_config_info"]
    assert info[1]["block_size"] == "16" and info[1]["num_gpu_blocks"] == "100" and info[2] == 1
    (lora,) = s["vllm:lora_requests_info"]
    assert lora[1] == {
        "model_name": "m",
        "max_lora": "1",
        "running_lora_adapters": "a",
        "waiting_lora_adapters": "b",
    }
    assert lora[2] == 1234.5  # the value is the wall-clock time of the scrape
    assert value(s, "vllm:prefix_cache_queries_total") == 40
    assert value(s, "vllm:prefix_cache_hits_total") == 0
    assert value(s, "vllm:prompt_tokens_total") == 40

    while (t := e.next_event_time()) is not None:
        e.advance(t)
    s = scrape(e)
    assert value(s, "vllm:generation_tokens_total") == 55
    success = {labels["finished_reason"]: v for _, labels, v in s["vllm:request_success_total"]}
    assert success == {"length": 2.0, "stop": 0.0}
    assert value(s, "vllm:time_to_first_token_seconds_count") == 2
    assert value(s, "vllm:inter_token_latency_seconds_count") == 53
    assert value(s, "vllm:e2e_request_latency_seconds_count") == 2
    assert value(s, "vllm:request_queue_time_seconds_count") == 2
    assert value(s, "vllm:request_queue_time_seconds_sum") > 0  # b waited for a's adapter slot
    assert value(s, "vllm:num_requests_running") == 0
    assert value(s, "inferoute_sim:lora_loads_total") == 2
    assert value(s, "inferoute_sim:lora_slot_waits_total") == 1
    assert value(s, "vllm:num_preemptions_total") == 0
    assert value(s, "vllm:request_prefill_time_seconds_count") == 2
    assert value(s, "vllm:request_time_per_output_token_seconds_count") == 2
    assert value(s, "vllm:request_generation_tokens_sum") == 55
    assert value(s, "vllm:request_params_max_tokens_sum") == 55


def test_lora_info_absent_without_adapters() -> None:
    s = scrape(Engine(SimConfig(model="m")))
    assert "vllm:lora_requests_info" not in s
    assert value(s, "vllm:kv_cache_usage_perc") == 0.0
