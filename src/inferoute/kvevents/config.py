"""vLLM's ``KVEventsConfig`` (``vllm/config/kv_events.py``): the ``--kv-events-config`` JSON. Pure.

The fields and defaults are vLLM's, with one difference: an absent ``topic`` means ``kv@{pod}@{model}`` (the
topic llm-d's consumer parses into pod and model) instead of vLLM's ``""``; ``{pod}`` and ``{model}`` in a
topic are replaced by the replica's name and served model. ``snapshot_endpoint`` (vLLM #57789, unmerged) is
accepted only when null.

Data-parallel ranks publish on their own sockets: the TCP port is offset by the rank (``inproc`` endpoints get
a ``_dp<rank>`` suffix), exactly as vLLM's ``offset_endpoint_port``. A ``*`` port (pick a free one) stays
``*``. An endpoint is bound when it contains ``*``, ``::``, ``ipc://`` or ``inproc://``, else connected.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import msgspec

DEFAULT_TOPIC = "kv@{pod}@{model}"
KV_EVENTS_LABEL = "kv-events-endpoint"
"""Endpoint label: the ZMQ address of a server's KV-event PUB socket (the simulator sets it)."""
KV_REPLAY_LABEL = "kv-events-replay-endpoint"
"""Endpoint label: the ZMQ address of its replay ROUTER socket."""


@dataclass(frozen=True, slots=True)
class KVEventsConfig:
    enable_kv_cache_events: bool = False
    publisher: str = "null"
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000
    hwm: int = 100_000
    max_queue_size: int = 100_000
    topic: str = DEFAULT_TOPIC
    snapshot_endpoint: str | None = None

    @property
    def enabled(self) -> bool:
        return self.enable_kv_cache_events and self.publisher == "zmq"

    def for_rank(self, rank: int) -> KVEventsConfig:
        """This config for data-parallel rank ``rank`` (ports offset by the rank)."""
        replay = self.replay_endpoint
        return replace(
            self,
            endpoint=offset_endpoint_port(self.endpoint, rank),
            replay_endpoint=offset_endpoint_port(replay, rank) if replay else None,
        )

    def topic_for(self, pod: str, model: str) -> str:
        return self.topic.replace("{pod}", pod).replace("{model}", model)


_FIELDS: dict[str, type | tuple[type, ...]] = {
    "enable_kv_cache_events": bool,
    "publisher": str,
    "endpoint": str,
    "replay_endpoint": (str, type(None)),
    "buffer_steps": int,
    "hwm": int,
    "max_queue_size": int,
    "topic": str,
    "snapshot_endpoint": (str, type(None)),
}


def parse_kv_events_config(text: str) -> KVEventsConfig:
    """Parse and validate the flag's JSON. Raises ValueError naming the bad field."""
    try:
        raw = msgspec.json.decode(text.encode())
    except msgspec.DecodeError as exc:
        raise ValueError(f"kv-events-config is not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError("kv-events-config must be a JSON object")
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise ValueError(f"kv-events-config: unknown field(s) {unknown}; valid: {', '.join(_FIELDS)}")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        want = _FIELDS[key]
        if (isinstance(value, bool) and want is int) or not isinstance(value, want):
            raise ValueError(f"kv-events-config.{key}: wrong type {type(value).__name__}")
        values[key] = value
    if values.get("enable_kv_cache_events") and "publisher" not in values:
        values["publisher"] = "zmq"
    cfg = KVEventsConfig(**values)
    if cfg.publisher not in ("zmq", "null"):
        raise ValueError(f"kv-events-config.publisher: {cfg.publisher!r} is not valid; valid: zmq, null")
    for key in ("buffer_steps", "hwm", "max_queue_size"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"kv-events-config.{key}: must be >= 1")
    if cfg.snapshot_endpoint is not None:
        raise ValueError("kv-events-config.snapshot_endpoint: snapshots are not supported")
    for key in ("endpoint", "replay_endpoint"):
        ep = getattr(cfg, key)
        if ep is not None and not ep.startswith(("tcp://", "ipc://", "inproc://")):
            raise ValueError(f"kv-events-config.{key}: {ep!r} must start with tcp://, ipc:// or inproc://")
        port = ep.rpartition(":")[2] if ep is not None and ep.startswith("tcp://") else "*"
        if port != "*" and not (port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"kv-events-config.{key}: {ep!r}: the port must be 1-65535 (or *)")
    return cfg


def offset_endpoint_port(endpoint: str, rank: int) -> str:
    if "inproc" in endpoint:
        return f"{endpoint}_dp{rank}"
    if "tcp" in endpoint and ":" in endpoint.removeprefix("tcp://"):
        base, _, port = endpoint.rpartition(":")
        if port == "*":
            return endpoint
        return f"{base}:{int(port) + rank}"
    return endpoint


def binds(endpoint: str) -> bool:
    """vLLM binds addresses with a wildcard host or port, ``::``, ``ipc://`` or ``inproc://``."""
    return any(s in endpoint for s in ("*", "::", "ipc://", "inproc://"))
