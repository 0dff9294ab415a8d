"""Model Server Protocol parsing: engine mappings, LoRA newest-series rule, cache config, failures."""

from __future__ import annotations

import pytest

from inferoute.epp.datalayer.metrics import (
    ENGINES,
    MetricsParseError,
    ParseCache,
    engine_for,
    find_family,
    parse_metrics,
)
from inferoute.errors import InferouteError

VLLM_PAGE = b"""# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 1234.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 7.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
vllm:num_requests_waiting_by_reason{reason="capacity"} 99.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.42
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="2",running_lora_adapters="old",waiting_lora_adapters=""} 1.7e9
vllm:lora_requests_info{max_lora="2",running_lora_adapters="sql, chat",waiting_lora_adapters="math"} 1.8e9
vllm:lora_requests_info{max_lora="2",running_lora_adapters="older",waiting_lora_adapters=""} 1.6e9
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="32",cache_dtype="auto",num_gpu_blocks="27000"} 1.0
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{le="0.001",model_name="m"} 0.0
vllm:time_to_first_token_seconds_count{model_name="m"} 10.0
"""


def test_vllm_page_is_read() -> None:
    m = parse_metrics(VLLM_PAGE, ENGINES["vllm"], now=5.0)
    assert (m.waiting, m.running, m.kv_usage) == (3.0, 7.0, 0.42)
    assert m.block_size == 32 and m.num_gpu_blocks == 27000
    assert m.scraped_at == 5.0


def test_lora_newest_series_wins() -> None:
    m = parse_metrics(VLLM_PAGE, ENGINES["vllm"], now=0)
    assert m.active_adapters == frozenset({"sql", "chat"})
    assert m.waiting_adapters == frozenset({"math"})
    assert m.max_lora == 2


def test_prefix_sharing_family_is_not_confused() -> None:
    # vllm:num_requests_waiting_by_reason must not be read as vllm:num_requests_waiting
    samples = find_family(VLLM_PAGE, "vllm:num_requests_waiting")
    assert [s.value for s in samples] == [3.0]


def test_family_at_page_start_and_without_trailing_newline() -> None:
    page = b"vllm:num_requests_waiting 2\nvllm:num_requests_running 1\nvllm:kv_cache_usage_perc 0.5"
    m = parse_metrics(page, ENGINES["vllm"], now=0)
    assert (m.waiting, m.running, m.kv_usage) == (2.0, 1.0, 0.5)
    assert m.block_size is None and not m.active_adapters


def test_several_model_series_add_up() -> None:
    page = (
        b'vllm:num_requests_waiting{model_name="a"} 2\nvllm:num_requests_waiting{model_name="b"} 3\n'
        b'vllm:num_requests_running 1\nvllm:kv_cache_usage_perc{model_name="a"} 0.1\n'
        b'vllm:kv_cache_usage_perc{model_name="b"} 0.3\n'
    )
    m = parse_metrics(page, ENGINES["vllm"], now=0)
    assert m.waiting == 5.0 and m.kv_usage == 0.3


def test_sglang_mapping() -> None:
    page = (
        b'sglang:num_queue_reqs{model_name="x"} 4\nsglang:num_running_reqs{model_name="x"} 2\n'
        b'sglang:token_usage{model_name="x"} 0.25\n'
        b'sglang:cache_config_info{page_size="64",num_pages="900"} 1\n'
    )
    m = parse_metrics(page, ENGINES["sglang"], now=0)
    assert (m.waiting, m.running, m.kv_usage, m.block_size, m.num_gpu_blocks) == (4, 2, 0.25, 64, 900)


def test_trtllm_serve_mapping() -> None:
    page = (
        b"trtllm_num_requests_waiting 1\ntrtllm_num_requests_running 6\ntrtllm_kv_cache_utilization 0.5\n"
        b"trtllm_kv_cache_tokens_per_block 32\ntrtllm_kv_cache_max_blocks 4096\n"
    )
    m = parse_metrics(page, ENGINES["trtllm-serve"], now=0)
    assert (m.waiting, m.running, m.kv_usage, m.block_size, m.num_gpu_blocks) == (1, 6, 0.5, 32, 4096)


def test_triton_label_selected_series() -> None:
    page = (
        b'nv_trt_llm_request_metrics{request_type="waiting"} 3\n'
        b'nv_trt_llm_request_metrics{request_type="scheduled"} 9\n'
        b'nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction"} 0.7\n'
        b'nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="tokens_per"} 64\n'
        b'nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max"} 100\n'
    )
    m = parse_metrics(page, ENGINES["triton-trtllm"], now=0)
    assert (m.waiting, m.running, m.kv_usage, m.block_size, m.num_gpu_blocks) == (3, 9, 0.7, 64, 100)


def test_percentage_kv_is_normalised() -> None:
    page = b"vllm:num_requests_waiting 0\nvllm:num_requests_running 0\nvllm:kv_cache_usage_perc 85\n"
    assert parse_metrics(page, ENGINES["vllm"], now=0).kv_usage == pytest.approx(0.85)


def test_missing_required_family_fails_naming_it() -> None:
    page = b"vllm:num_requests_waiting 0\nvllm:kv_cache_usage_perc 0.1\n"
    with pytest.raises(MetricsParseError, match="vllm:num_requests_running"):
        parse_metrics(page, ENGINES["vllm"], now=0)


def test_a_garbage_value_rejects_the_page_naming_the_metric() -> None:
    page = b"vllm:num_requests_waiting abc\nvllm:num_requests_running 1\nvllm:kv_cache_usage_perc 0.1\n"
    with pytest.raises(MetricsParseError, match="num_requests_waiting"):
        parse_metrics(page, ENGINES["vllm"], now=0)


def test_unknown_engine_lists_valid_choices() -> None:
    with pytest.raises(InferouteError) as e:
        engine_for("tgi")
    assert e.value.cause == "config" and "sglang" in e.value.message and "vllm" in e.value.message


def test_parse_cache_skips_known_absent_and_static_families() -> None:
    cache = ParseCache(recheck=1.0, static_refresh=10.0)
    base = b"vllm:num_requests_waiting 0\nvllm:num_requests_running 0\nvllm:kv_cache_usage_perc 0.1\n"
    lora = b'vllm:lora_requests_info{max_lora="1",running_lora_adapters="a",waiting_lora_adapters=""} 5\n'
    info = b'vllm:cache_config_info{block_size="16",num_gpu_blocks="100"} 1\n'
    vllm = ENGINES["vllm"]
    m = parse_metrics(base + info, vllm, now=0.0, cache=cache)
    assert m.block_size == 16 and not m.active_adapters
    # LoRA appears: not looked for until the recheck interval has passed
    assert not parse_metrics(base + info + lora, vllm, now=0.5, cache=cache).active_adapters
    assert parse_metrics(base + info + lora, vllm, now=1.1, cache=cache).active_adapters == {"a"}
    # the cache configuration is static: re-read only every 10 s
    changed = info.replace(b'"16"', b'"32"')
    assert parse_metrics(base + changed, vllm, now=5.0, cache=cache).block_size == 16
    assert parse_metrics(base + changed, vllm, now=10.5, cache=cache).block_size == 32
