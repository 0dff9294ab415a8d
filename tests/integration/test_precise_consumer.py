"""The picker's KV-event consumer over real ZMQ sockets: gaps recovered through replay with no lost block, a
publisher restart, a consumer restart rebuilding the same index, and precise routing end to end against
simulator replicas (tokenized through their render endpoint)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import aiohttp
from test_sim_kvevents_zmq import CFG

from inferoute.endpoints import Endpoint
from inferoute.epp.assembly import EppOptions, start_picker
from inferoute.epp.precise.index import PreciseIndex
from inferoute.epp.precise.subscriber import KVEventPool, SubscriberSettings
from inferoute.kvevents.config import KV_EVENTS_LABEL, KV_REPLAY_LABEL, KVEventsConfig
from inferoute.kvevents.wire import BlockRemoved, BlockStored, KVEvent, encode_batch
from inferoute.picking import Destination, PickRequest
from inferoute.sim import DEFAULT_MODEL, SimPool
from inferoute.sim.kvpublish import KVEventPublisher

TOKENS = list(range(1, 16 * 12 + 1))
NOOP: list[KVEvent] = [BlockRemoved((424242,))]  # an eviction of a block nobody knows: changes nothing


def chain(i: int) -> list[KVEvent]:
    """Batch i: engine block i (16 tokens), parented on block i-1."""
    return [BlockStored((i + 1,), i if i else None, tuple(TOKENS[16 * i : 16 * i + 16]), 16)]


async def until(cond: Callable[[], bool], within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while not cond():  # noqa: ASYNC110 - the subscriber task updates plain state; nothing to await
            await asyncio.sleep(0.005)


def publisher(endpoint: str = "tcp://127.0.0.1:*", replay: str = "tcp://127.0.0.1:*") -> KVEventPublisher:
    cfg = KVEventsConfig(
        enable_kv_cache_events=True, publisher="zmq", endpoint=endpoint, replay_endpoint=replay
    )
    return KVEventPublisher(cfg, "kv@pod@m")


def drop(pub: KVEventPublisher, events: list[KVEvent]) -> None:
    """Publish a batch that never reaches subscribers (as PUB does past its high-water mark)."""
    pub.ring.append(pub.seq, encode_batch(0.0, events))
    pub.seq += 1


async def heartbeat(pub: KVEventPublisher, pool: KVEventPool, cond: Callable[[], bool]) -> None:
    """Publish no-op batches until ``cond`` (the subscription is live: ZMQ's slow joiner is past)."""
    async with asyncio.timeout(10):
        while not cond():
            pub.publish(NOOP)
            await asyncio.sleep(0.01)


def endpoint(pub: KVEventPublisher) -> Endpoint:
    labels = {KV_EVENTS_LABEL: pub.endpoint, KV_REPLAY_LABEL: pub.replay_endpoint or ""}
    return Endpoint("pod", "127.0.0.1", 9, labels)


async def test_gap_publisher_restart_and_consumer_restart() -> None:
    pub = publisher()
    await pub.start()
    idx = PreciseIndex(block_size=16)
    pool = KVEventPool(idx, SubscriberSettings(socket_port=None))
    keys = idx.keys_for(TOKENS, "m")
    try:
        for i in range(3):  # before anyone listens: only the replay can deliver them
            pub.publish(chain(i))
        pool.sync([endpoint(pub)])
        await until(lambda: idx.match(keys, ["127.0.0.1:9"]).get("127.0.0.1:9") == 3)
        await heartbeat(pub, pool, lambda: pool.stats.batches > 3)
        drop(pub, chain(3))  # lost on the live stream
        for i in range(4, 12):
            pub.publish(chain(i))
        await until(lambda: idx.match(keys, ["127.0.0.1:9"]).get("127.0.0.1:9") == 12)
        assert pool.stats.gaps >= 1 and pool.stats.lost_batches == 0 and idx.orphans == 0

        # a consumer restart (a new picker process) rebuilds the same index from the replay ring
        idx2 = PreciseIndex(block_size=16)
        pool2 = KVEventPool(idx2, SubscriberSettings(socket_port=None))
        pool2.sync([endpoint(pub)])
        await until(lambda: idx2.match(keys, ["127.0.0.1:9"]).get("127.0.0.1:9") == 12)
        await pool2.aclose()

        # the publisher restarts (empty cache, sequence from 0) on the same addresses
        addrs = [a.replace("127.0.0.1", "*") for a in (pub.endpoint, pub.replay_endpoint or "")]
        await pub.aclose()
        pub = publisher(*addrs)  # a wildcard address binds (vLLM's rule)
        await pub.start()
        pub.publish(chain(0))
        await heartbeat(
            pub, pool, lambda: pool.stats.restarts == 1 and idx.endpoint_blocks("127.0.0.1:9") == 1
        )
        assert idx.match(keys, ["127.0.0.1:9"]) == {"127.0.0.1:9": 1}
        # the endpoint leaves the pool: its subscriber stops and its entries go
        pool.sync([])
        assert idx.size() == 0 and not pool.subscribers
    finally:
        await pool.aclose()
        await pub.aclose()


PRECISE = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: single-profile-handler
- type: token-producer
- type: precise-prefix-cache-producer
  parameters:
    tokenProcessorConfig: {blockSize: 64, hashSeed: "42"}
    indexerConfig: {kvBlockIndexConfig: {inMemoryConfig: {size: 100000000}}}
    kvEventsConfig:
      topicFilter: "kv@"
      concurrency: 4
      discoverPods: true
      podDiscoveryConfig: {socketPort: 5557}
- type: prefix-cache-scorer
  parameters: {prefixMatchInfoProducerName: precise-prefix-cache-producer}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: prefix-cache-scorer, weight: 2}
  - {pluginRef: max-score-picker}
"""


async def test_precise_routing_sees_what_another_router_placed() -> None:
    cfg = CFG  # KV events on free ports, with replay
    doc = "Reference manual of the quick brown fox. " * 60
    async with await SimPool.start(cfg, replicas=3) as sims:
        picker = await start_picker(EppOptions(endpoints=sims.endpoints, config_text=PRECISE, seed=1))
        try:
            # another router sends the document to replica 2: only the KV events can tell the picker
            async with aiohttp.ClientSession() as http:
                body = {
                    "model": DEFAULT_MODEL,
                    "messages": [{"role": "user", "content": doc}],
                    "max_tokens": 2,
                }
                async with http.post(sims.urls[2] + "/v1/chat/completions", json=body) as r:
                    assert r.status == 200
            producer = picker.config.plugins["precise-prefix-cache-producer"]
            key2 = sims.endpoints[2].key
            await until(lambda: producer.index.endpoint_blocks(key2) > 0)  # type: ignore[attr-defined]
            ask = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": doc + " Question?"}]}
            for _ in range(3):
                decision, session = await picker.pick(
                    PickRequest("POST", "/v1/chat/completions", {}, json.dumps(ask).encode())
                )
                assert isinstance(decision, Destination)
                assert decision.endpoints[0] == key2
                session.aborted("test")
        finally:
            await picker.aclose()
