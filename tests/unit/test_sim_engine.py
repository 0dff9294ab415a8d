"""The engine's scheduler and latency model, driven with plain numbers (a fake timeline, no sleeps)."""

from __future__ import annotations

import itertools

import pytest

from inferoute.errors import InferouteError
from inferoute.sim.config import SimConfig
from inferoute.sim.engine import Engine, SimRequest, StepResult

# Round numbers so expected times can be written down.
BASE, PER_SEQ, PREFILL_BASE, PER_TOKEN, LORA = 0.010, 0.001, 0.020, 0.001, 0.050
_ids = itertools.count()


def config(**kw: object) -> SimConfig:
    defaults: dict[str, object] = dict(
        step_base_s=BASE,
        step_per_seq_s=PER_SEQ,
        prefill_base_s=PREFILL_BASE,
        prefill_per_token_s=PER_TOKEN,
        lora_load_s=LORA,
        step_per_context_token_s=0.0,
        block_size=4,
        kv_cache_blocks=1000,
        max_model_len=4096,
    )
    defaults.update(kw)
    return SimConfig(**defaults)  # type: ignore[arg-type]


def req(
    prompt: list[int] | int, out: int, lora: str | None = None, max_tokens: int | None = None
) -> SimRequest:
    n = next(_ids)
    # integer prompts get tokens of their own, so they never share a cached prefix by accident
    tokens = list(range(n * 100_000, n * 100_000 + prompt)) if isinstance(prompt, int) else prompt
    return SimRequest(f"r{n}", lora or "m", tokens, out, max_tokens or out, lora=lora)


def run(engine: Engine, until: float = 1e9) -> list[StepResult]:
    """Advance event by event (as the shell's timer does) until idle or ``until``."""
    out: list[StepResult] = []
    while (t := engine.next_event_time()) is not None and t <= until:
        out.extend(engine.advance(t))
    return out


def token_times(results: list[StepResult], r: SimRequest) -> list[float]:
    return [res.at for res in results if r in res.progressed]


def test_single_request_timeline() -> None:
    e = Engine(config())
    r = req(10, 3)
    e.submit(r, 1.0)
    assert e.next_event_time() == 1.0
    results = run(e)
    ttft = BASE + PER_SEQ + PREFILL_BASE + PER_TOKEN * 10
    itl = BASE + PER_SEQ
    assert token_times(results, r) == pytest.approx([1 + ttft, 1 + ttft + itl, 1 + ttft + 2 * itl])
    assert r.done and r.finish_reason == "length" and r.generated == 3
    assert r.first_token_at == pytest.approx(1 + ttft)
    assert e.next_event_time() is None and e.num_running == 0 and e.kv.usage == 0.0
    assert e.stats.prompt_tokens == 10 and e.stats.generation_tokens == 3
    assert e.stats.success == {"length": 1}
    assert e.stats.ttft.count == 1 and e.stats.itl.count == 2


def test_time_scale_multiplies_every_duration() -> None:
    slow, fast = Engine(config()), Engine(config(time_scale=0.1))
    a, b = req(10, 3), req(10, 3)
    slow.submit(a, 0.0)
    fast.submit(b, 0.0)
    run(slow)
    run(fast)
    assert b.finished_at == pytest.approx(a.finished_at * 0.1)  # type: ignore[operator]


def test_prefix_hit_shortens_time_to_first_token() -> None:
    e = Engine(config())
    prompt = list(range(100))
    first = req(prompt, 2)
    e.submit(first, 0.0)
    run(e)
    second = req(prompt, 2)
    e.submit(second, 10.0)
    run(e)
    assert first.cached_tokens == 0
    assert second.cached_tokens == 96  # 25 full blocks, but the last token is always recomputed: 24 blocks
    ttft1 = first.first_token_at - first.arrival  # type: ignore[operator]
    ttft2 = second.first_token_at - second.arrival  # type: ignore[operator]
    assert ttft1 == pytest.approx(BASE + PER_SEQ + PREFILL_BASE + PER_TOKEN * 100)
    assert ttft2 == pytest.approx(BASE + PER_SEQ + PREFILL_BASE + PER_TOKEN * 4)
    assert e.stats.prefix_queries == 200 and e.stats.prefix_hits == 96


def test_different_prefix_or_adapter_misses() -> None:
    e = Engine(config(lora_adapters=("a",)))
    prompt = list(range(40))
    e.submit(req(prompt, 1), 0.0)
    run(e)
    other = req([7, *prompt[1:]], 1)
    lora = req(prompt, 1, lora="a")
    e.submit(other, 1.0)
    e.submit(lora, 1.0)
    run(e)
    assert other.cached_tokens == 0
    assert lora.cached_tokens == 0  # adapters hash under their own namespace


def test_batching_slows_every_step() -> None:
    alone = Engine(config())
    a = req(4, 20)
    alone.submit(a, 0.0)
    itl_alone = _steady_itl(run(alone), a)

    crowded = Engine(config())
    rs = [req(4, 20) for _ in range(8)]
    for r in rs:
        crowded.submit(r, 0.0)
    itl_crowded = _steady_itl(run(crowded), rs[0])
    assert itl_alone == pytest.approx(BASE + PER_SEQ)
    assert itl_crowded == pytest.approx(BASE + 8 * PER_SEQ)


def _steady_itl(results: list[StepResult], r: SimRequest) -> float:
    times = token_times(results, r)
    return times[-1] - times[-2]


def test_max_num_seqs_queues_the_rest_fifo() -> None:
    e = Engine(config(max_num_seqs=2))
    rs = [req(4, 3) for _ in range(3)]
    for r in rs:
        e.submit(r, 0.0)
    e.advance(0.0)
    assert e.num_running == 2 and e.num_waiting == 1
    run(e)
    assert rs[2].admitted_at == pytest.approx(rs[0].finished_at)  # type: ignore[arg-type]
    assert rs[2].admitted_at > 0  # type: ignore[operator]
    assert e.stats.queue.count == 3 and e.stats.queue.sum == pytest.approx(rs[2].admitted_at)


def test_full_waiting_queue_rejects_with_429() -> None:
    e = Engine(config(max_num_seqs=1, max_waiting=2))
    e.submit(req(4, 5), 0.0)
    e.advance(0.0)  # admitted: the queue is empty again
    e.submit(req(4, 5), 0.001)
    e.submit(req(4, 5), 0.001)
    with pytest.raises(InferouteError) as info:
        e.submit(req(4, 5), 0.002)
    assert info.value.status == 429 and info.value.cause == "queue-full"
    assert e.num_waiting == 2 and e.stats.rejected_queue_full == 1


def test_admission_waits_for_kv_blocks_head_of_line() -> None:
    # 4 blocks of 4 tokens. A's prompt takes 3, B's needs 2 (does not fit beside A), C's needs 1 (would fit).
    e = Engine(config(kv_cache_blocks=4))
    a, b, c = req(12, 1), req(8, 1), req(2, 1)
    for r in (a, b, c):
        e.submit(r, 0.0)
    e.advance(0.0)
    assert a.state == "running" and b.state == "waiting" and c.state == "waiting"
    assert e.kv.num_free == 1
    run(e)
    assert b.admitted_at == pytest.approx(a.finished_at)  # type: ignore[arg-type]
    assert c.admitted_at == pytest.approx(a.finished_at)  # type: ignore[arg-type]  # FIFO: not before B
    assert e.stats.preemptions == 0


def test_kv_usage_grows_with_the_output() -> None:
    e = Engine(config(kv_cache_blocks=100))
    r = req(4, 20)
    e.submit(r, 0.0)
    e.advance(0.0)
    assert e.kv_usage == pytest.approx(1 / 100)  # the prompt's block only
    while r.generated < 10:
        t = e.next_event_time()
        assert t is not None
        e.advance(t)
    e.advance(e.next_event_time())  # type: ignore[arg-type]  # the step feeding token 10 needs block 4
    assert e.kv_usage == pytest.approx(4 / 100)  # 4 prompt + 10 fed tokens -> ceil(14 / 4) blocks
    run(e)
    assert e.kv_usage == 0.0


def test_running_out_of_blocks_preempts_the_newest_and_recomputes() -> None:
    # 5 blocks of 4 tokens; A and B each take 2 for their prompt, then both grow while decoding.
    e = Engine(config(kv_cache_blocks=5))
    a, b = req(8, 8), req(8, 8)
    e.submit(a, 0.0)
    e.submit(b, 0.0)
    results = run(e)
    assert e.stats.preemptions >= 1 and b.preemptions >= 1 and a.preemptions == 0
    assert a.finished_at < b.finished_at  # type: ignore[operator]  # the older request keeps running
    for r in (a, b):
        assert r.done and r.finish_reason == "length" and r.generated == 8
        times = token_times(results, r)
        assert len(times) == 8 and times == sorted(times)  # no token lost or repeated across the preemption
    assert b.cached_tokens == 0  # reported from the first admission
    assert e.kv_usage == 0.0 and e.num_waiting == 0
    assert e.stats.generation_tokens == 16 and e.stats.prompt_tokens == 16  # prompts counted once


def test_lora_requests_wait_for_a_slot_and_pay_the_load() -> None:
    e = Engine(config(lora_adapters=("a", "b"), max_loras=1))
    ra, rb, base = req(4, 5, lora="a"), req(4, 1, lora="b"), req(4, 1)
    for r in (ra, rb, base):
        e.submit(r, 0.0)
    e.advance(0.0)
    assert ra.state == "running" and rb.state == "waiting"
    assert base.state == "running"  # a base-model request is not stuck behind the adapter wait
    assert e.running_loras == ["a"] and e.waiting_loras == ["b"] and e.loaded_loras == ["a"]
    first_step = e.next_event_time()
    assert first_step == pytest.approx(BASE + 2 * PER_SEQ + PREFILL_BASE + 8 * PER_TOKEN + LORA)
    run(e)
    assert rb.admitted_at == pytest.approx(ra.finished_at)  # type: ignore[arg-type]
    assert e.loaded_loras == ["b"]
    assert e.stats.lora_loads == 2 and e.stats.lora_slot_waits == 1  # b waited (counted once over many steps)
    # b's admission step paid one load: TTFT = its queue wait + the loading prefill step
    assert rb.first_token_at - rb.admitted_at == pytest.approx(  # type: ignore[operator]
        BASE + PER_SEQ + PREFILL_BASE + 4 * PER_TOKEN + LORA
    )


def test_active_adapter_is_reused_without_load_cost() -> None:
    e = Engine(config(lora_adapters=("a",), max_loras=1))
    e.submit(req(4, 1, lora="a"), 0.0)
    run(e)
    again = req([1, 2, 3], 1, lora="a")
    e.submit(again, 5.0)
    run(e)
    assert again.first_token_at - 5.0 == pytest.approx(BASE + PER_SEQ + PREFILL_BASE + 3 * PER_TOKEN)  # type: ignore[operator]


def test_long_prompts_are_prefilled_in_chunks() -> None:
    e = Engine(config(max_num_batched_tokens=100, max_num_seqs=8))
    r = req(250, 1)
    e.submit(r, 0.0)
    results = run(e)
    assert len(results) == 3  # 100 + 100 + 50 prompt tokens
    assert r.first_token_at == pytest.approx(3 * (BASE + PER_SEQ + PREFILL_BASE) + 250 * PER_TOKEN)


def test_request_arriving_mid_step_waits_for_the_next_step() -> None:
    e = Engine(config())
    a = req(4, 10)
    e.submit(a, 0.0)
    e.advance(0.0)
    step_end = e.next_event_time()
    assert step_end is not None
    b = req(4, 1)
    e.submit(b, step_end / 2)
    assert e.next_event_time() == step_end  # no extra wake-up while a step runs
    run(e)
    assert b.admitted_at == pytest.approx(step_end)


def test_abort_releases_blocks_and_slot() -> None:
    e = Engine(config(max_num_seqs=1))
    a, b = req(8, 100), req(8, 1)
    e.submit(a, 0.0)
    e.submit(b, 0.0)
    e.advance(0.0)
    e.abort(a, 0.005)
    assert a.done and a.finish_reason == "abort" and e.kv.usage == 0.0
    run(e)
    assert b.done and b.finish_reason == "length"
    e.abort(b, 99.0)  # idempotent on finished requests
    assert e.stats.success == {"abort": 1, "length": 1}


def test_abort_of_a_waiting_request() -> None:
    e = Engine(config())
    a = req(4, 1)
    e.submit(a, 0.0)
    e.abort(a, 0.0)
    assert e.num_waiting == 0 and a.finish_reason == "abort"
    assert run(e) == []


def test_output_length_planning_is_deterministic() -> None:
    e = Engine(config(mean_output_tokens=50))
    prompt = list(range(30))
    assert e.plan_output(prompt, 77, ignore_eos=True) == 77
    n = e.plan_output(prompt, 1000, ignore_eos=False)
    assert n == Engine(config(mean_output_tokens=50)).plan_output(prompt, 1000, False)
    assert 1 <= n <= 1000
    draws = [e.plan_output([i, i + 1], 10_000, False) for i in range(400)]
    assert 35 < sum(draws) / len(draws) < 65  # exponential with mean 50
    assert max(e.plan_output([i], 5, False) for i in range(100)) == 5  # clipped to max_tokens


def test_stop_finish_reason_when_shorter_than_max_tokens() -> None:
    e = Engine(config())
    r = req(4, 2, max_tokens=10)
    e.submit(r, 0.0)
    run(e)
    assert r.finish_reason == "stop" and r.generated == 2


def test_length_checks() -> None:
    e = Engine(config(max_model_len=100, kv_cache_blocks=10))
    assert e.check_lengths(30, None) == 70
    assert e.check_lengths(30, 20) == 20
    with pytest.raises(InferouteError) as info:
        e.check_lengths(90, 20)
    assert info.value.status == 400 and "maximum context length is 100" in info.value.message
    with pytest.raises(InferouteError):
        e.check_lengths(100, None)
    with pytest.raises(InferouteError) as info:
        e.check_lengths(60, 1)  # 61 tokens > 10 blocks x 4
    assert "KV cache" in info.value.message


def test_output_is_shortened_to_fit_a_small_cache() -> None:
    e = Engine(config(kv_cache_blocks=10))
    r = req(20, 100)
    e.submit(r, 0.0)
    assert r.output_tokens == 20
    run(e)
    assert r.done and r.finish_reason == "stop"


def test_unknown_adapter_is_rejected() -> None:
    e = Engine(config(lora_adapters=("a",)))
    with pytest.raises(InferouteError) as info:
        e.submit(req(4, 1, lora="nope"), 0.0)
    assert info.value.status == 404


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="max_num_batched_tokens must be >= max_num_seqs"):
        SimConfig(max_num_seqs=100, max_num_batched_tokens=50)
    with pytest.raises(ValueError, match="time_scale"):
        SimConfig(time_scale=0)
    with pytest.raises(ValueError, match="failure_rate"):
        SimConfig(failure_rate=1.5)
    with pytest.raises(ValueError, match="base model"):
        SimConfig(model="m", lora_adapters=("m",))
    assert SimConfig(lora_adapters=("a",)).served_models == (SimConfig().model, "a")


def test_long_contexts_slow_decoding() -> None:
    per_ctx = 0.00001
    e = Engine(config(step_per_context_token_s=per_ctx))
    short, long = req(4, 3), req(1000, 3)
    e.submit(short, 0.0)
    results = run(e)
    itl_short = _steady_itl(results, short)
    e.submit(long, 10.0)
    results = run(e)
    itl_long = _steady_itl(results, long)
    # the third token's step reads the prompt plus the two tokens already generated
    assert itl_short == pytest.approx(BASE + PER_SEQ + per_ctx * (4 + 2))
    assert itl_long == pytest.approx(BASE + PER_SEQ + per_ctx * (1000 + 2))
