"""vLLM KV-cache events: the wire contract, shared by the simulator (publisher) and the picker (consumer).

Theory of operation
-------------------
A vLLM engine started with ``--kv-events-config`` tells the world which KV blocks it holds. After every
scheduler step that changed its prefix cache it publishes one *batch* on a ZMQ PUB socket as three frames,
``[topic, sequence (8-byte big-endian, from 0), msgpack(batch)]``; the batch is the array
``[timestamp, [event, ...], data_parallel_rank]``. Events are ``BlockStored`` (one per run of newly
cached full blocks, one per physical copy), ``BlockRemoved`` (one per evicted block) and
``AllBlocksCleared`` (prefix cache reset). A ROUTER socket on ``replay_endpoint`` answers
``["", start_seq]`` with every buffered batch from ``start_seq`` on, then an end marker (sequence ``-1``).

* :mod:`~inferoute.kvevents.wire` — the event types and their msgpack encoding (map-tagged events as vLLM
  >= 0.26 sends them, or the legacy tagged arrays), frame building and parsing, the replay messages. Pure.
* :mod:`~inferoute.kvevents.hashing` — vLLM's ``sha256_cbor`` block hashes and their 64-bit wire form. Pure.
* :mod:`~inferoute.kvevents.config` — vLLM's ``KVEventsConfig`` fields, parsed from the flag's JSON, and the
  per-data-parallel-rank endpoint offset.

The simulator's publisher (:mod:`inferoute.sim.kvpublish`) and the picker's subscriber
(:mod:`inferoute.epp.precise`) are thin ZMQ shells around these.
"""
