"""The scheduler benchmark's building blocks (small sizes: a smoke test that its numbers mean something)."""

from __future__ import annotations

from pathlib import Path

import inferoute
from inferoute.bench.scheduler import (
    build_director,
    build_picker,
    chat_bodies,
    compare_lifecycle,
    import_tree,
    lifecycle,
    measure_latency,
    measure_lifecycle,
    prompts,
    usage_chunk,
    vllm_metrics_page,
)
from inferoute.epp.datalayer.metrics import ENGINES, ParseCache, parse_metrics
from inferoute.epp.learned import LocalLearnedState, PrefixIndex
from inferoute.epp.requestcontrol.director import Session
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


def test_lifecycle_rig_runs_the_whole_session_and_reads_usage() -> None:
    picker = build_picker(5, "predicted-ttft")
    bodies = chat_bodies(4096, 3)
    assert all(3900 < len(b) < 4300 for b in bodies)
    assert bodies[0] != bodies[1]  # unique questions
    chunk = usage_chunk(1000)
    served = lifecycle(picker, PickRequest("POST", "/v1/chat/completions", {}, bodies[0]), chunk)
    assert served in picker.datastore.states
    assert picker.learned.snapshot().inflight(served).requests == 0  # released
    assert isinstance(picker.learned, LocalLearnedState)
    assert isinstance(picker.learned.prefix, PrefixIndex) and picker.learned.prefix.endpoint_size(served) > 0
    _, s = picker.director.decide(PickRequest("POST", "/v1/chat/completions", {}, bodies[1]))
    assert isinstance(s, Session)
    s.response_chunk(chunk)
    s.response_finished()
    assert s.usage is not None and (s.usage.prompt_tokens, s.usage.cached_tokens) == (1000, 500)
    row = measure_lifecycle(3, "gie-default", 4096, 20, batches=2, warm=10)
    assert row.requests == 20 and 0 < row.cpu_us <= row.cpu_us_median and row.prefix_blocks > 0


def test_compare_lifecycle_runs_another_tree_in_the_same_process() -> None:
    src = Path(inferoute.__file__).parent.parent
    other = import_tree(src, "inferoute_selftest")
    assert other.__name__ == "inferoute_selftest.bench.scheduler"
    assert other.Destination is not Destination  # its own classes, not ours
    row = compare_lifecycle(other, 3, "gie-default", 4096, 2, batch=5, warm=5)
    assert row.rounds == 2 and row.other_us >= 0 and row.this_us >= 0
