"""The scheduler benchmark's building blocks (small sizes: a smoke test that its numbers mean something)."""

from __future__ import annotations

from inferoute.bench.scheduler import build_director, measure_latency, prompts, vllm_metrics_page
from inferoute.epp.datalayer.metrics import ENGINES, ParseCache, parse_metrics
from inferoute.picking import Destination, PickRequest


def test_synthetic_vllm_page_parses_like_a_real_one() -> None:
    page = vllm_metrics_page()
    assert len(page) > 20_000  # histograms included, like vLLM's
    m = parse_metrics(page, ENGINES["vllm"], 0.0, ParseCache())
    assert (m.waiting, m.running, m.kv_usage, m.block_size, m.num_gpu_blocks) == (3, 12, 0.37, 16, 27000)
    assert m.active_adapters == {"sql"} and m.max_lora == 2


def test_director_rig_and_latency_row() -> None:
    director = build_director(20, "gie-default")
    body = prompts(2000, count=1)[0]
    assert 1900 < len(body) < 2200
    d, s = director.decide(PickRequest("POST", "/v1/completions", {}, body))
    s.response_finished()
    assert isinstance(d, Destination)
    row = measure_latency(20, "predicted-ttft", 1000, picks=50)
    assert row.endpoints == 20 and row.picks == 50 and 0 < row.p50_us <= row.p99_us
