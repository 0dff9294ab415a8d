"""Server counters and LoRA waits parsed from Prometheus text (pure)."""

from __future__ import annotations

from inferoute.bench.scrape import add, parse_samples, waiting_adapters

TEXT = """\
# HELP vllm:prefix_cache_hits Prefix cache hits.
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{model_name="m"} 640.0
# HELP vllm:prefix_cache_queries Prefix cache queries.
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{model_name="m"} 1000.0
# HELP vllm:request_success Count.
# TYPE vllm:request_success counter
vllm:request_success_total{finished_reason="length",model_name="m"} 7.0
vllm:request_success_total{finished_reason="stop",model_name="m"} 3.0
# HELP vllm:lora_requests_info Running stats on lora requests.
# TYPE vllm:lora_requests_info gauge
"""


def lora_line(running: str, waiting: str, value: str) -> str:
    labels = (
        f'max_lora="2",model_name="m",running_lora_adapters="{running}",waiting_lora_adapters="{waiting}"'
    )
    return "vllm:lora_requests_info{" + labels + "} " + value + "\n"


TEXT += lora_line("a,b", "c,d,e", "1.7e9") + lora_line("a", "f", "1.6e9")


def test_parse_samples_sums_labels() -> None:
    got = parse_samples(TEXT)
    assert got["prefix_cache_hits"] == 640
    assert got["prefix_cache_queries"] == 1000
    assert got["requests_finished"] == 10
    assert "lora_slot_waits" not in got


def test_waiting_adapters_reads_the_newest_series() -> None:
    assert waiting_adapters(TEXT) == 3
    assert waiting_adapters("") == 0
    empty = TEXT.replace('waiting_lora_adapters="c,d,e"', 'waiting_lora_adapters=""')
    assert waiting_adapters(empty) == 0


def test_add() -> None:
    assert add([{"a": 1.0}, {"a": 2.0, "b": 1.0}, {}]) == {"a": 3.0, "b": 1.0}
