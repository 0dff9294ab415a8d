"""The precise prefix index (pure): keys recomputed from events' token ids, reference-counted residency, and
the simulator engine's real event stream round-tripping through it."""

from __future__ import annotations

from inferoute.clock import FakeClock
from inferoute.epp.learned import Placed
from inferoute.epp.precise.index import PreciseIndex, request_keys, root_key
from inferoute.epp.precise.tracker import Action, SeqTracker
from inferoute.kvevents.config import KVEventsConfig
from inferoute.kvevents.wire import AllBlocksCleared, BlockRemoved, BlockStored, decode_batch, encode_batch
from inferoute.sim.config import SimConfig
from inferoute.sim.engine import Engine, SimRequest

TOKENS = list(range(1, 129))  # 128 tokens


def stored(
    hashes: list[int], parent: int | None, tokens: list[int], bs: int, lora: str | None = None
) -> BlockStored:
    return BlockStored(tuple(hashes), parent, tuple(tokens), bs, lora)


def fnv1a_64(data: bytes) -> int:
    """FNV-1a, 64 bits (Go's ``hash/fnv.New64a``), written out: the oracle for the index's C one."""
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & ((1 << 64) - 1)
    return h


def test_block_keys_are_llm_ds_fnv64a_over_canonical_cbor() -> None:
    # llm-d's chunkedTokenDatabase: init = fnv64a(hashSeed); root = hash(init, nil, model);
    # key = fnv64a(cbor([parent, tokens, nil])); the CBOR below is written out by hand
    init = fnv1a_64(b"")
    assert init == 0xCBF29CE484222325  # FNV's offset basis: the hash of nothing
    root = root_key("", "m")
    assert root == fnv1a_64(b"\x83\x1b" + init.to_bytes(8, "big") + b"\xf6\x61m")  # [uint64, null, "m"]
    seeded = fnv1a_64(b"seed").to_bytes(8, "big")
    assert root_key("seed", "m") == fnv1a_64(b"\x83\x1b" + seeded + b"\xf6\x61m")
    assert root >= 1 << 32  # (so the parent below is encoded in 8 bytes)
    # tokens 1, 2, 300, 70000 use the four shortest uint forms; a trailing partial block is not keyed
    tokens = [1, 2, 300, 70000, 5]
    body = b"\x84\x01\x02\x19\x01\x2c\x1a\x00\x01\x11\x70"
    first = fnv1a_64(b"\x83\x1b" + root.to_bytes(8, "big") + body + b"\xf6")
    assert request_keys(tokens, 4, root) == [first]
    assert PreciseIndex(4).keys_for(tokens, "m") == [first]
    assert PreciseIndex(4, "seed").keys_for(tokens, "m") != [first]
    small = fnv1a_64(b"\x83\x07\x82\x01\x02\xf6")  # a small parent takes one byte
    assert request_keys([1, 2, 3], 2, 7) == [small]


def test_speculative_entries_expire_and_go_with_their_endpoint() -> None:
    clock = FakeClock(0.0)
    idx = PreciseIndex(4, speculative_ttl=2.0, clock=clock.now)
    keys = idx.keys_for(TOKENS[:16], "m")
    idx.apply([Placed("a", tuple(keys[:2]), 1), Placed("b", tuple(keys), 1)])
    assert idx.match(keys, ["a", "b"]) == {"a": 2, "b": 4} and idx.size() == 0
    idx.forget(["b"])
    assert idx.match(keys, ["a", "b"]) == {"a": 2}
    clock.advance(1.0)
    idx.apply([Placed("a", tuple(keys[:1]), 1)])  # refreshes the first key only
    clock.advance(1.5)
    assert idx.match(keys, ["a"]) == {"a": 1}
    # a server's own event makes it real: it outlives the speculation
    idx.apply_events("a", [stored([1], None, TOKENS[:8], 8)], "m")
    clock.advance(5.0)
    idx.apply([])
    assert idx.match(keys, ["a"]) == {"a": 2}
    assert PreciseIndex(4).speculative_ttl == 0.0  # off by default: Placed records are ignored
    off = PreciseIndex(4)
    off.apply([Placed("a", tuple(keys), 1)])
    assert off.match(keys, ["a"]) == {}


def test_engine_blocks_smaller_than_picker_blocks() -> None:
    idx = PreciseIndex(block_size=64)
    # 8 engine blocks of 16 in two events: 4 then 4 (the second parented on the 4th)
    idx.apply_events("a", [stored([1, 2, 3, 4], None, TOKENS[:64], 16)], "m")
    idx.apply_events("a", [stored([5, 6, 7, 8], 4, TOKENS[64:], 16)], "m")
    keys = idx.keys_for(TOKENS, "m")
    assert len(keys) == 2
    assert idx.match(keys, ["a", "b"]) == {"a": 2}
    # evicting engine block 8 (it completes the 2nd picker block) drops that key only
    idx.apply_events("a", [BlockRemoved((8,))], "m")
    assert idx.match(keys, ["a"]) == {"a": 1}
    # other model: other keys
    assert idx.match(idx.keys_for(TOKENS, "other"), ["a"]) == {}


def test_engine_blocks_larger_than_picker_blocks_and_copies() -> None:
    idx = PreciseIndex(block_size=8)
    idx.apply_events("a", [stored([1, 2], None, TOKENS[:32], 16)], "m")
    idx.apply_events("b", [stored([9], None, TOKENS[:16], 16)], "m")
    keys = idx.keys_for(TOKENS[:32], "m")
    assert len(keys) == 4
    assert idx.match(keys, ["a", "b"]) == {"a": 4, "b": 2}
    # a second physical copy on a: one removal leaves it resident
    idx.apply_events("a", [stored([1], None, TOKENS[:16], 16)], "m")
    assert idx.residency(keys[0], "a") == 2
    idx.apply_events("a", [BlockRemoved((1,))], "m")
    assert idx.match(keys, ["a"]) == {"a": 4}
    idx.apply_events("a", [BlockRemoved((1,))], "m")
    assert idx.match(keys, ["a", "b"]) == {"b": 2}
    idx.apply_events("b", [AllBlocksCleared()], "m")
    assert idx.match(keys, ["a", "b"]) == {}
    assert idx.size() == 2  # a's second engine block still owns its two keys


def test_lora_orphans_and_malformed() -> None:
    idx = PreciseIndex(block_size=16)
    idx.apply_events("a", [stored([1], None, TOKENS[:16], 16, lora="ad")], "m")
    assert idx.match(idx.keys_for(TOKENS[:16], "ad"), ["a"]) == {"a": 1}
    assert idx.match(idx.keys_for(TOKENS[:16], "m"), ["a"]) == {}
    idx.apply_events("a", [stored([7], 12345, TOKENS[:16], 16)], "m")
    assert idx.orphans == 1
    idx.apply_events("a", [stored([8, 9], None, TOKENS[:16], 16)], "m")
    assert idx.malformed == 1
    idx.clear("a")
    assert idx.size() == 0 and idx.endpoints() == []


def test_simulator_events_round_trip_through_the_index() -> None:
    """Engine (block 16) -> msgpack wire -> index (block 64): the index says what the engine caches."""
    cfg = SimConfig(
        block_size=16,
        kv_cache_blocks=40,
        kv_events=KVEventsConfig(enable_kv_cache_events=True, publisher="zmq"),
    )
    engine = Engine(cfg)
    idx = PreciseIndex(block_size=64)
    t = 0.0
    prompts = [[g * 1000 + i for i in range(300)] for g in range(4)]  # 4 groups of 18 full blocks
    for n in range(12):
        engine.submit(SimRequest(f"r{n}", "m", prompts[n % 4], 20, 20, output_seed=n), t)
        while (nxt := engine.next_event_time()) is not None:
            t = nxt
            engine.advance(t)
        for events in engine.take_event_batches():
            idx.apply_events("sim-0", decode_batch(encode_batch(t, events)).events, "m")
        for p in prompts:
            keys = idx.keys_for(p, "m")
            held = idx.match(keys, ["sim-0"]).get("sim-0", 0)
            cached = engine.kv.cached_prefix(_hashes(engine, p))
            assert held == cached * 16 // 64  # exactly the engine's cached prefix, in picker blocks
    assert engine.kv.evictions > 0  # the pool was under pressure: removals were exercised


def _hashes(engine: Engine, prompt: list[int]) -> list[int]:
    req = SimRequest("q", "m", prompt, 1, 1)
    engine._hash_blocks(req, 0)
    return req.hashes


def test_sequence_tracker() -> None:
    t = SeqTracker()
    assert t.on_live(0) is Action.APPLY
    t.applied(0)
    assert t.on_live(1) is Action.APPLY
    t.applied(1)
    assert t.on_live(3) is Action.REPLAY and t.replay_from == 2
    t.applied(2)
    t.applied(3)
    assert t.on_live(4) is Action.APPLY
    t.applied(4)
    assert t.on_live(0) is Action.RESTART
    t.restart(0)
    assert t.on_live(1) is Action.REPLAY and t.replay_from == 0
    late = SeqTracker()  # joined mid-stream: replay from 0
    assert late.on_live(7) is Action.REPLAY and late.replay_from == 0
    for s in range(8):
        late.applied(s)
    assert late.on_live(8) is Action.APPLY
    dup = SeqTracker()  # live messages queued during a replay are duplicates
    for s in range(5):
        dup.applied(s)
    assert dup.on_live(3) is Action.DUPLICATE and dup.on_live(4) is Action.DUPLICATE
    assert dup.on_live(5) is Action.APPLY
