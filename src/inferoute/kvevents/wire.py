"""The KV-event wire contract of vLLM (``vllm/distributed/kv_events.py``), both directions. Pure code.

Encoding (vLLM >= 0.26, after vLLM #42892): the batch is a msgpack *array* ``[ts, events, dp_rank]``; each
event is a msgpack *map* whose ``"type"`` key names it. ``BlockStored`` always carries its seven leading
fields (``block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium, lora_name``) even when
null, then ``extra_keys`` (one entry per block), ``group_idx`` and ``kv_cache_spec_kind``, as a real vLLM 0.26
capture shows. The legacy form (vLLM <= 0.23, ``legacy=True``) is a tagged array ``["BlockStored", field...]``
in declaration order with trailing null fields omitted.

Decoding accepts both forms, unknown extra fields, hashes as unsigned or signed 64-bit integers or as raw
digests (the last 8 bytes, big-endian, as llm-d's ``getHashAsUint64``), and rejects anything else with
:class:`WireError`.

Frames: live ``[topic, seq (8 bytes big-endian), payload]``; replay request ``["", start_seq]``; replay reply
(post vLLM #45177) ``["", topic, seq, payload]`` per buffered batch, then ``["", topic, END_SEQ, ""]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

U64 = (1 << 64) - 1
END_SEQ = b"\xff" * 8
"""The replay end marker: sequence -1 as a signed 8-byte big-endian integer."""
MEDIUM_GPU = "GPU"


class WireError(ValueError):
    """A frame or payload that does not follow the contract."""


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Blocks newly cached by the engine, in sequence order; ``parent_block_hash`` is the block before the
    first one (None at the start of a sequence)."""

    block_hashes: tuple[int, ...]
    parent_block_hash: int | None
    token_ids: tuple[int, ...]
    block_size: int
    lora_name: str | None = None
    extra_keys: tuple[tuple[Any, ...] | None, ...] | None = None
    medium: str | None = MEDIUM_GPU


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: tuple[int, ...]
    medium: str | None = MEDIUM_GPU


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class EventBatch:
    ts: float
    events: tuple[KVEvent, ...]
    data_parallel_rank: int | None = None
    seq: int = -1
    """The frame's sequence number (not part of the payload)."""
    topic: bytes = field(default=b"")


# -- encoding ---------------------------------------------------------------------------------------------
def _stored_fields(e: BlockStored) -> list[tuple[str, Any]]:
    extra = [list(k) if k is not None else None for k in e.extra_keys] if e.extra_keys is not None else None
    return [
        ("block_hashes", list(e.block_hashes)),
        ("parent_block_hash", e.parent_block_hash),
        ("token_ids", list(e.token_ids)),
        ("block_size", e.block_size),
        ("lora_id", None),
        ("medium", e.medium),
        ("lora_name", e.lora_name),
        ("extra_keys", extra),
        ("group_idx", 0),
        ("kv_cache_spec_kind", "full_attention"),
    ]


def _fields(e: KVEvent) -> list[tuple[str, Any]]:
    if isinstance(e, BlockStored):
        return _stored_fields(e)
    if isinstance(e, BlockRemoved):
        return [("block_hashes", list(e.block_hashes)), ("medium", e.medium), ("group_idx", 0)]
    return []


def event_obj(e: KVEvent, legacy: bool = False) -> Any:
    """The msgpack object of one event: a ``{"type": ...}`` map, or (legacy) a tagged array."""
    name = type(e).__name__
    fields = _fields(e)
    if legacy:  # declaration order; vLLM <= 0.23 ended BlockStored at extra_keys, BlockRemoved at medium
        values = [v for _, v in fields[: 8 if isinstance(e, BlockStored) else 2]]
        if isinstance(e, BlockStored) and values[-1] is None:
            values.pop()  # a trailing default is omitted
        return [name, *values]
    return {"type": name, **dict(fields)}


_encoder = msgspec.msgpack.Encoder()


def encode_batch(
    ts: float, events: Sequence[KVEvent], dp_rank: int | None = 0, *, legacy: bool = False
) -> bytes:
    """msgpack of ``[ts, [event...], dp_rank]`` (the rank omitted when None, as vLLM's omit_defaults)."""
    batch: list[Any] = [ts, [event_obj(e, legacy) for e in events]]
    if dp_rank is not None:
        batch.append(dp_rank)
    return _encoder.encode(batch)


def seq_bytes(seq: int) -> bytes:
    return seq.to_bytes(8, "big", signed=seq < 0)


def live_frames(topic: bytes, seq: int, payload: bytes) -> list[bytes]:
    return [topic, seq_bytes(seq), payload]


# -- decoding ---------------------------------------------------------------------------------------------
def hash_u64(value: object) -> int:
    """A block hash as llm-d reads it: uint64 as is, int64 reinterpreted, bytes = their last 8 bytes BE."""
    if isinstance(value, bool):
        raise WireError(f"block hash must be an integer or bytes, got {value!r}")
    if isinstance(value, int):
        if not -(1 << 63) <= value <= U64:
            raise WireError(f"block hash {value} outside 64 bits")
        return value & U64
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        if not raw:
            raise WireError("empty block hash")
        return int.from_bytes(raw[-8:], "big")
    raise WireError(f"block hash must be an integer or bytes, got {type(value).__name__}")


def parse_seq(frame: bytes) -> int:
    """An 8-byte big-endian sequence frame (-1 for the end marker); longer frames (vLLM's snapshot form
    appends a 16-byte publisher id) use their first 8 bytes."""
    if len(frame) < 8:
        raise WireError(f"sequence frame of {len(frame)} bytes (expected 8)")
    if frame[:8] == END_SEQ:
        return -1
    return int.from_bytes(frame[:8], "big")


_STORED_ORDER = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium")
_STORED_ORDER_TAIL = ("lora_name", "extra_keys")


def _as_map(obj: object) -> dict[str, Any]:
    if isinstance(obj, dict):
        if not isinstance(obj.get("type"), str):
            raise WireError("event map without a string 'type'")
        return obj
    if isinstance(obj, list) and obj and isinstance(obj[0], str):
        tag, values = obj[0], obj[1:]
        names: tuple[str, ...] = ()
        if tag == "BlockStored":
            names = _STORED_ORDER + _STORED_ORDER_TAIL
        elif tag == "BlockRemoved":
            names = ("block_hashes", "medium")
        return {"type": tag, **dict(zip(names, values, strict=False))}
    raise WireError(f"event must be a tagged map or array, got {type(obj).__name__}")


def _int_list(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(type(v) is int for v in value):
        raise WireError(f"{what} must be a list of integers")
    return tuple(value)


def _extra_keys(extra: object) -> tuple[tuple[Any, ...] | None, ...] | None:
    if not isinstance(extra, list):
        return None
    return tuple(tuple(k) if isinstance(k, list) else None for k in extra)


def decode_event(obj: object) -> KVEvent | None:
    """One event; None for event types this consumer does not know (skipped, as llm-d does)."""
    m = _as_map(obj)
    kind = m["type"]
    if kind == "BlockStored":
        hashes = m.get("block_hashes")
        if not isinstance(hashes, list):
            raise WireError("BlockStored.block_hashes must be a list")
        parent = m.get("parent_block_hash")
        size = m.get("block_size")
        if type(size) is not int or size < 1:
            raise WireError("BlockStored.block_size must be a positive integer")
        lora = m.get("lora_name")
        extra = m.get("extra_keys")
        return BlockStored(
            tuple(hash_u64(h) for h in hashes),
            None if parent is None else hash_u64(parent),
            _int_list(m.get("token_ids"), "BlockStored.token_ids"),
            size,
            lora if isinstance(lora, str) else None,
            _extra_keys(extra),
            m.get("medium") if isinstance(m.get("medium"), str) else None,
        )
    if kind == "BlockRemoved":
        hashes = m.get("block_hashes")
        if not isinstance(hashes, list):
            raise WireError("BlockRemoved.block_hashes must be a list")
        medium = m.get("medium")
        return BlockRemoved(tuple(hash_u64(h) for h in hashes), medium if isinstance(medium, str) else None)
    if kind == "AllBlocksCleared":
        return AllBlocksCleared()
    return None


def decode_batch(payload: bytes, seq: int = -1, topic: bytes = b"") -> EventBatch:
    """Decode one msgpack batch (either event form). Raises :class:`WireError`."""
    try:
        obj = msgspec.msgpack.decode(payload)
    except msgspec.DecodeError as exc:
        raise WireError(f"payload is not msgpack: {exc}") from exc
    if not isinstance(obj, list) or len(obj) < 2 or not isinstance(obj[1], list):
        raise WireError("batch must be an array [ts, events, dp_rank?]")
    ts = obj[0]
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        raise WireError("batch timestamp must be a number")
    rank = obj[2] if len(obj) > 2 and type(obj[2]) is int else None
    events = tuple(e for e in (decode_event(o) for o in obj[1]) if e is not None)
    return EventBatch(float(ts), events, rank, seq, topic)


def parse_topic(topic: bytes) -> tuple[str, str]:
    """``kv@<pod>@<model>`` -> (pod, model); a topic without two ``@`` is all pod (llm-d's parseTopic)."""
    text = topic.decode("utf-8", "replace")
    parts = text.split("@", 2)
    if len(parts) == 3:
        return parts[1], parts[2]
    return text, ""
