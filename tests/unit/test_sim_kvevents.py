"""The engine's KV events (pure: engine step -> event batches) and generated tokens in the prefix cache."""

from __future__ import annotations

from inferoute.kvevents.config import KVEventsConfig
from inferoute.kvevents.hashing import block_digests, none_hash, wire_hash
from inferoute.kvevents.wire import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from inferoute.sim.config import SimConfig
from inferoute.sim.engine import Engine, SimRequest
from inferoute.sim.protocol import output_token_id

ON = KVEventsConfig(enable_kv_cache_events=True, publisher="zmq")


def engine(blocks: int = 100, events: bool = True, **kw: object) -> Engine:
    cfg = SimConfig(
        block_size=4,
        kv_cache_blocks=blocks,
        max_model_len=4096,
        kv_events=ON if events else KVEventsConfig(),
        step_per_context_token_s=0.0,
        **kw,  # type: ignore[arg-type]
    )
    return Engine(cfg)


def run(e: Engine, *reqs: SimRequest) -> list[list[KVEvent]]:
    t = 0.0
    for r in reqs:
        e.submit(r, t)
    while (nxt := e.next_event_time()) is not None:
        t = nxt
        e.advance(t)
    return e.take_event_batches()


def flat(batches: list[list[KVEvent]]) -> list[KVEvent]:
    return [ev for b in batches for ev in b]


def test_stored_blocks_carry_vllm_hashes_parent_and_tokens() -> None:
    e = engine()
    prompt = list(range(1, 11))  # 2 full blocks of 4 + 2 tokens
    batches = run(e, SimRequest("a", "m", prompt, 1, 1))
    assert len(batches) == 1  # one step, one batch
    (stored,) = batches[0]
    assert isinstance(stored, BlockStored)
    digests = block_digests(prompt, 4, none_hash("0"))
    assert stored.block_hashes == tuple(wire_hash(d) for d in digests)
    assert stored.parent_block_hash is None
    assert stored.token_ids == tuple(prompt[:8]) and stored.block_size == 4
    assert stored.extra_keys == (None, None) and stored.lora_name is None

    # a second request sharing the first block stores only the new ones, parented on the shared block
    other = [*prompt[:4], 50, 51, 52, 53, 54]
    (stored2,) = flat(run(e, SimRequest("b", "m", other, 1, 1)))
    assert isinstance(stored2, BlockStored)
    assert stored2.parent_block_hash == stored.block_hashes[0]
    assert stored2.token_ids == (50, 51, 52, 53)


def test_lora_blocks_carry_the_adapter_as_extra_key() -> None:
    e = engine(lora_adapters=("ad",))
    (stored,) = flat(run(e, SimRequest("a", "ad", [1, 2, 3, 4, 5], 1, 1, lora="ad")))
    assert isinstance(stored, BlockStored)
    assert stored.lora_name == "ad" and stored.extra_keys == (("ad",),)
    digest = block_digests([1, 2, 3, 4], 4, none_hash("0"), ("ad",))[0]
    assert stored.block_hashes == (wire_hash(digest),)


def test_each_eviction_is_one_removed_event_and_each_copy_one_stored() -> None:
    e = engine(blocks=4)
    run(e, SimRequest("a", "m", list(range(100, 113)), 1, 1))  # 3 full blocks + 1 partial: all 4 blocks
    events = flat(run(e, SimRequest("b", "m", list(range(200, 213)), 1, 1)))
    removed = [ev for ev in events if isinstance(ev, BlockRemoved)]
    stored = [ev for ev in events if isinstance(ev, BlockStored)]
    assert len(removed) == 3 and all(len(r.block_hashes) == 1 for r in removed)
    assert events.index(removed[0]) < events.index(stored[0])  # evicted before the new blocks are stored
    assert sum(len(s.block_hashes) for s in stored) == 3


def test_reset_prefix_cache_clears() -> None:
    e = engine()
    run(e, SimRequest("a", "m", list(range(8)), 1, 1))
    assert e.reset_prefix_cache()
    assert e.take_event_batches() == [[AllBlocksCleared()]]
    assert e.kv.num_cached == 0
    e.submit(SimRequest("b", "m", list(range(9)), 50, 50), 0.0)
    e.advance(0.05)
    assert e.num_running == 1
    assert not e.reset_prefix_cache()  # in use: refused, as vLLM


def test_generated_tokens_join_the_prefix_cache() -> None:
    for events in (True, False):
        e = engine(events=events)
        prompt = list(range(1000, 1006))  # 6 tokens: 1 full block, then 2 of the second
        first = SimRequest("a", "m", prompt, 10, 10, output_seed=7)
        batches = run(e, first)
        # prompt + 9 generated tokens with KV computed = 15 -> 3 full blocks
        assert len(first.hashes) == 3
        follow = prompt + [output_token_id(7, i) for i in range(8)] + [5, 5, 5]
        second = SimRequest("b", "m", follow, 1, 1)
        run(e, second)
        assert second.cached_tokens == 12  # all three blocks hit, generated ones included
        if events:
            stored = [ev for ev in flat(batches) if isinstance(ev, BlockStored)]
            assert [s.block_hashes for s in stored][1:] == [(first.hashes[1],), (first.hashes[2],)]
            assert stored[1].parent_block_hash == first.hashes[0]
            assert stored[1].token_ids == (1004, 1005, output_token_id(7, 0), output_token_id(7, 1))


def test_no_events_without_config() -> None:
    e = engine(events=False)
    assert run(e, SimRequest("a", "m", list(range(9)), 2, 2)) == []


def test_cli_rejects_a_bad_kv_events_config() -> None:
    from click.testing import CliRunner

    from inferoute.sim.cli import command

    result = CliRunner().invoke(command, ["--kv-events-config", '{"enable_kv_cache_events": 1}'])
    assert result.exit_code == 2
    assert "kv-events-config.enable_kv_cache_events: wrong type" in result.output
