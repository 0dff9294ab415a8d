"""vLLM's KV-event wire contract, checked against an independent reading (the ``msgpack`` package, CBOR bytes
written out by hand) rather than against our own encoder alone."""

from __future__ import annotations

import hashlib

import msgpack
import pytest

from inferoute.kvevents.config import binds, offset_endpoint_port, parse_kv_events_config
from inferoute.kvevents.hashing import block_digests, none_hash, wire_hash
from inferoute.kvevents.wire import (
    END_SEQ,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    WireError,
    decode_batch,
    encode_batch,
    hash_u64,
    parse_seq,
    parse_topic,
    seq_bytes,
)

# The upstream wire-contract test's batch (vLLM docs/features/kv_events.md), verbatim.
UPSTREAM_EXAMPLE = [
    1.5,
    [
        {
            "type": "BlockStored",
            "block_hashes": [11, 2**64 - 1],
            "parent_block_hash": 10,
            "token_ids": [1, 2, 3, 4],
            "block_size": 2,
            "lora_id": None,
            "medium": "GPU",
            "lora_name": "adapter",
            "extra_keys": [["adapter"], ["adapter", ["mm-id", 0]]],
            "group_idx": 0,
            "kv_cache_spec_kind": "full_attention",
            "locality": "LOCAL",
            "session_id": "session",
        },
        {"type": "BlockRemoved", "block_hashes": [11], "medium": "CPU", "group_idx": 0, "ownership": "kvcr"},
        {"type": "AllBlocksCleared"},
    ],
    1,
]


def test_upstream_example_decodes() -> None:
    batch = decode_batch(msgpack.packb(UPSTREAM_EXAMPLE), seq=7, topic=b"kv@p@m")
    assert batch.ts == 1.5 and batch.data_parallel_rank == 1 and batch.seq == 7
    stored, removed, cleared = batch.events
    assert isinstance(stored, BlockStored)
    assert stored.block_hashes == (11, 2**64 - 1)
    assert stored.parent_block_hash == 10
    assert stored.token_ids == (1, 2, 3, 4) and stored.block_size == 2
    assert stored.lora_name == "adapter"
    assert stored.extra_keys == (("adapter",), ("adapter", ["mm-id", 0]))
    assert removed == BlockRemoved((11,), "CPU")
    assert cleared == AllBlocksCleared()


def test_our_batch_reads_back_with_msgpack_as_vllm_026_sends_it() -> None:
    event = BlockStored((5, 6), None, (1, 2, 3, 4), 2, None, (None, None))
    raw = msgpack.unpackb(encode_batch(2.5, [event, BlockRemoved((5,)), AllBlocksCleared()], 0))
    assert raw[0] == 2.5 and raw[2] == 0
    stored, removed, cleared = raw[1]
    # the seven leading fields are always present (even null), in declaration order, tag first
    assert list(stored)[:8] == [
        "type",
        "block_hashes",
        "parent_block_hash",
        "token_ids",
        "block_size",
        "lora_id",
        "medium",
        "lora_name",
    ]
    assert stored["parent_block_hash"] is None and stored["extra_keys"] == [None, None]
    assert stored["kv_cache_spec_kind"] == "full_attention"
    assert removed == {"type": "BlockRemoved", "block_hashes": [5], "medium": "GPU", "group_idx": 0}
    assert cleared == {"type": "AllBlocksCleared"}


def test_legacy_array_form() -> None:
    event = BlockStored((2**64 - 1,), 3, (9, 9), 2)
    raw = msgpack.unpackb(encode_batch(1.0, [event, BlockRemoved((1,))], None, legacy=True))
    assert len(raw) == 2  # no rank
    assert raw[1][0] == ["BlockStored", [2**64 - 1], 3, [9, 9], 2, None, "GPU", None]
    assert raw[1][1] == ["BlockRemoved", [1], "GPU"]
    back = decode_batch(encode_batch(1.0, [event], None, legacy=True))
    assert back.events == (event,)


def test_hash_forms_and_bad_payloads() -> None:
    assert hash_u64(-1) == 2**64 - 1
    assert hash_u64(b"\x00" * 24 + (7).to_bytes(8, "big")) == 7
    for bad in (True, 2**64, "x", b""):
        with pytest.raises(WireError):
            hash_u64(bad)
    with pytest.raises(WireError):
        decode_batch(b"\xc1")
    with pytest.raises(WireError):
        decode_batch(msgpack.packb({"ts": 1}))
    with pytest.raises(WireError):
        decode_batch(msgpack.packb([1.0, [{"type": "BlockStored", "block_hashes": [1]}]]))
    assert decode_batch(msgpack.packb([1.0, [{"type": "SomethingNew"}]])).events == ()


def test_frames_and_topic() -> None:
    assert seq_bytes(0) == b"\x00" * 8 and seq_bytes(258) == b"\x00" * 6 + b"\x01\x02"
    assert seq_bytes(-1) == END_SEQ and parse_seq(END_SEQ) == -1
    assert parse_seq(b"\x00" * 7 + b"\x05" + b"i" * 16) == 5  # snapshot-style 24-byte frame
    with pytest.raises(WireError):
        parse_seq(b"\x01")
    assert parse_topic(b"kv@10.0.0.1@meta/llama@x") == ("10.0.0.1", "meta/llama@x")
    assert parse_topic(b"pod") == ("pod", "")


def test_sha256_cbor_block_hash_matches_hand_written_cbor() -> None:
    root = none_hash("0")
    assert root == hashlib.sha256(b"\x61\x30").digest()  # CBOR text string "0"
    tokens = [1, 2, 300, 4]
    d0, d1 = block_digests(tokens, 2, root)
    # (parent: bytes(32), (1, 2): array of 2 uints, None) as canonical CBOR
    cbor0 = b"\x83" + b"\x58\x20" + root + b"\x82\x01\x02" + b"\xf6"
    assert d0 == hashlib.sha256(cbor0).digest()
    cbor1 = b"\x83" + b"\x58\x20" + d0 + b"\x82\x19\x01\x2c\x04" + b"\xf6"
    assert d1 == hashlib.sha256(cbor1).digest()
    lora = block_digests(tokens[:2], 2, root, ("ad",))[0]
    assert lora == hashlib.sha256(b"\x83\x58\x20" + root + b"\x82\x01\x02" + b"\x81\x62ad").digest()
    assert wire_hash(d1) == int.from_bytes(d1[24:], "big")
    # chaining from the middle gives the same digests as hashing from the start
    assert block_digests(tokens, 2, root, parent=d0, start_block=1) == [d1]


def test_kv_events_config() -> None:
    cfg = parse_kv_events_config(
        '{"enable_kv_cache_events": true, "endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558"}'
    )
    assert cfg.enabled and cfg.publisher == "zmq"
    r2 = cfg.for_rank(2)
    assert (r2.endpoint, r2.replay_endpoint) == ("tcp://*:5559", "tcp://*:5560")
    assert offset_endpoint_port("inproc://x", 1) == "inproc://x_dp1"
    assert offset_endpoint_port("tcp://127.0.0.1:*", 3) == "tcp://127.0.0.1:*"
    assert binds("tcp://*:1") and binds("ipc:///tmp/x") and not binds("tcp://10.0.0.1:5557")
    assert cfg.topic_for("sim-0", "m") == "kv@sim-0@m"
    assert not parse_kv_events_config('{"enable_kv_cache_events": false}').enabled
    for bad, words in (
        ("[]", "JSON object"),
        ('{"endpont": "x"}', "unknown field"),
        ('{"hwm": "1"}', "hwm"),
        ('{"buffer_steps": 0}', "buffer_steps"),
        ('{"publisher": "kafka"}', "publisher"),
        ('{"endpoint": "http://x"}', "endpoint"),
        ("{", "not JSON"),
    ):
        with pytest.raises(ValueError, match=words):
            parse_kv_events_config(bad)
