"""Request bodies pass through as they arrive on routes where nothing needs them first (no BBR, picker
without body); they are buffered (and replayable) everywhere else."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from test_gw_support import ScriptedPicker, backends, gateway_config, running_gateway

from inferoute.picking import Destination

STREAMING_ROUTE: dict[str, Any] = {
    "bbr": {"enabled": False, "max_body_size": 1_000_000},
    "epp": {"body": "headers_only"},
}


async def test_body_reaches_the_upstream_before_the_client_finished_sending() -> None:
    first, rest = b"a" * 70_000, b"b" * 300_000
    async with backends("a") as (a,):
        picker = ScriptedPicker([a.key])

        async def body() -> AsyncIterator[bytes]:
            yield first
            # a buffering gateway would wait for the rest before calling the upstream: this would time out
            await asyncio.wait_for(a.first_bytes.wait(), 10)
            yield rest

        async with (
            running_gateway(gateway_config([a], **STREAMING_ROUTE), picker) as gw,
            aiohttp.ClientSession() as s,
            s.post(gw.url + "/v1/upload", data=body()) as r,
        ):
            assert r.status == 200
            doc = await r.json()
    assert doc["sha256"] == hashlib.sha256(first + rest).hexdigest()
    assert doc["headers"].get("transfer-encoding") == "chunked"  # no Content-Length was known
    assert picker.requests[0].body == b""


async def test_declared_length_is_kept_and_limit_enforced_while_streaming() -> None:
    async with backends("a") as (a,):
        route = {**STREAMING_ROUTE, "bbr": {"enabled": False, "max_body_size": 1000}}
        async with (
            running_gateway(gateway_config([a], **route), ScriptedPicker([a.key])) as gw,
            aiohttp.ClientSession() as s,
        ):
            async with s.post(gw.url + "/v1/upload", data=b"x" * 900) as r:
                assert r.status == 200
                assert (await r.json())["headers"]["content-length"] == "900"
            async with s.post(gw.url + "/v1/upload", data=b"x" * 1001) as r:
                assert r.status == 413  # refused up front from Content-Length

            async def too_much() -> AsyncIterator[bytes]:
                for _ in range(6):
                    yield b"y" * 300

            async with s.post(gw.url + "/v1/upload", data=too_much()) as r:
                assert r.status == 413  # counted while streaming
                assert (await r.json())["error"]["code"] == 413
    assert [req["len"] for req in a.requests] == [900]


async def test_streamed_body_still_walks_past_a_dead_endpoint(refused_port: Any) -> None:
    dead = f"127.0.0.1:{refused_port()}"
    async with backends("a") as (a,):
        picker = ScriptedPicker([], script=lambda req: Destination((dead, a.key)))
        pool = {
            "pool": {
                "endpoints": [
                    {"address": "127.0.0.1", "port": int(dead.split(":")[1])},
                    {"address": "127.0.0.1", "port": a.port},
                ]
            }
        }

        async def body() -> AsyncIterator[bytes]:
            yield b"hello "
            yield b"world"

        async with (
            running_gateway(gateway_config([a], top=pool, **STREAMING_ROUTE), picker) as gw,
            aiohttp.ClientSession() as s,
            s.post(gw.url + "/v1/upload", data=body()) as r,
        ):
            assert r.status == 200
            doc = await r.json()
    assert doc["served_by"] == "a" and doc["sha256"] == hashlib.sha256(b"hello world").hexdigest()
