"""The simulator's KV events over real ZMQ sockets, read the way a vLLM consumer reads them (plain pyzmq and
the ``msgpack`` package): live PUB frames, the ROUTER replay with its end marker, data-parallel port offsets,
render and reset endpoints."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import msgpack
import pytest
import zmq
import zmq.asyncio

from inferoute.kvevents.config import KV_EVENTS_LABEL, KV_REPLAY_LABEL, KVEventsConfig
from inferoute.sim import DEFAULT_MODEL, SimConfig, SimPool
from inferoute.sim.tokenizer import encode

CFG = SimConfig(
    time_scale=0.05,
    block_size=16,
    kv_events=KVEventsConfig(
        enable_kv_cache_events=True,
        publisher="zmq",
        endpoint="tcp://127.0.0.1:*",
        replay_endpoint="tcp://127.0.0.1:*",
    ),
)


@pytest.fixture
async def pool() -> AsyncIterator[SimPool]:
    async with await SimPool.start(CFG, replicas=2) as p:
        yield p


async def replay(ctx: zmq.asyncio.Context, endpoint: str, start: int) -> list[list[bytes]]:
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(endpoint)
    try:
        await dealer.send_multipart([b"", start.to_bytes(8, "big")])
        out: list[list[bytes]] = []
        async with asyncio.timeout(10):
            while True:
                msg = await dealer.recv_multipart()
                out.append(msg)
                if msg[2] == b"\xff" * 8:
                    return out
    finally:
        dealer.close(linger=0)


async def test_events_live_and_replayed(pool: SimPool) -> None:
    ep0, ep1 = pool.endpoints
    pub0 = ep0.labels[KV_EVENTS_LABEL]
    assert pub0.startswith("tcp://127.0.0.1:") and ep1.labels[KV_EVENTS_LABEL] != pub0
    assert pool.replicas[1].kv_events is not None and pool.replicas[1].kv_events.dp_rank == 1
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv@")
    sub.connect(pub0)
    text = "You are a careful assistant. " * 20
    try:
        async with aiohttp.ClientSession() as http:
            url = pool.urls[0]
            body = {"model": DEFAULT_MODEL, "prompt": text, "max_tokens": 40, "ignore_eos": True}
            async with http.post(url + "/v1/completions/render", json=body) as r:
                assert r.status == 200
                rendered = (await r.json())["prompt_token_ids"]
            assert rendered == encode(text)
            for _ in range(3):
                async with http.post(url + "/v1/completions", json=body) as r:
                    assert r.status == 200
            async with http.post(url + "/reset_prefix_cache") as r:
                assert r.status == 200
        # the ring holds every batch: replay from 0 returns them in order, then the end marker
        msgs = await replay(ctx, ep0.labels[KV_REPLAY_LABEL], 0)
        assert msgs[-1] == [b"", b"kv@sim-0@" + DEFAULT_MODEL.encode(), b"\xff" * 8, b""]
        seqs = [int.from_bytes(m[2], "big") for m in msgs[:-1]]
        assert seqs == list(range(len(seqs))) and len(seqs) >= 3
        batches = [msgpack.unpackb(m[3]) for m in msgs[:-1]]
        first = batches[0][1][0]
        assert first["type"] == "BlockStored" and first["parent_block_hash"] is None
        assert first["token_ids"] == rendered[: len(first["token_ids"])]
        assert len(first["token_ids"]) == 16 * len(first["block_hashes"]) == 16 * (len(rendered) // 16)
        assert batches[-1][1] == [{"type": "AllBlocksCleared"}]
        assert all(b[2] == 0 for b in batches)  # rank 0
        # a replay from the middle starts there
        tail = await replay(ctx, ep0.labels[KV_REPLAY_LABEL], 2)
        assert [int.from_bytes(m[2], "big") for m in tail[:-1]] == seqs[2:]
        # live frames that reached the subscriber are the same three-frame messages
        live: list[list[bytes]] = []
        while await sub.poll(timeout=0):
            live.append(await sub.recv_multipart())
        for topic, seq, payload in live:
            assert topic == b"kv@sim-0@" + DEFAULT_MODEL.encode()
            assert payload == msgs[int.from_bytes(seq, "big")][3]
    finally:
        sub.close(linger=0)
        ctx.term()
