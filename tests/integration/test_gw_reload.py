"""Weighted backends and configuration reload on a real gateway (real sockets, real ext_proc pickers).

Mirrors the GIE conformance checks GatewayWeightedAcrossTwoInferencePools (70/30 within tolerance, every
answer from a pod of one of the pools) and GatewayFollowingEPPRouting (only the picker's choices), and proves
``--watch-config``'s promise: a reload under load drops no request, in-flight streams finish on the old
routes, new requests take the new ones, and the old pickers are closed once drained.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from prometheus_client import CollectorRegistry
from test_gw_grpc_picker import epp
from test_gw_support import Backend, ScriptedPicker, backends, metric_value, running_gateway

from inferoute.gateway.config import parse_config
from inferoute.gateway.reload import ConfigWatcher
from inferoute.picking import Destination

CHAT = {"model": "m-1", "messages": [{"role": "user", "content": "hi"}]}


def backend(name: str, weight: int, pods: list[Backend], target: str | None) -> dict[str, Any]:
    epp_cfg: dict[str, Any] = {"enabled": False}
    if target is not None:
        epp_cfg = {"endpoint": target, "timeout_ms": 3000}  # target: http://host:port (plain text)
    return {
        "name": name,
        "weight": weight,
        "epp": epp_cfg,
        "endpoints": [{"name": p.name, "address": "127.0.0.1", "port": p.port} for p in pods],
    }


def config(*backends_: dict[str, Any], path: str = "/") -> dict[str, Any]:
    return {"listen": "127.0.0.1:0", "routes": [{"path": path, "backends": list(backends_)}]}


async def post_many(url: str, n: int, concurrency: int) -> list[tuple[int, str]]:
    """n POSTs with ``concurrency`` workers; (status, served_by) per answer."""
    out: list[tuple[int, str]] = []
    todo = iter(range(n))
    async with aiohttp.ClientSession() as s:

        async def worker() -> None:
            for _ in todo:
                async with s.post(url + "/v1/completions", json=CHAT) as r:
                    doc = await r.json(content_type=None)
                    out.append((r.status, doc.get("served_by", "?") if r.status == 200 else "?"))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


async def test_weighted_seventy_thirty_across_two_pools_each_through_its_own_picker() -> None:
    async with backends("a1", "a2", "a3", "b1", "b2", "b3") as pods:
        a, b = pods[:3], pods[3:]
        pa, pb = ScriptedPicker([p.key for p in a]), ScriptedPicker([p.key for p in b])
        async with epp(pa) as ta, epp(pb) as tb:
            cfg = parse_config(config(backend("ns/primary", 70, a, ta), backend("ns/secondary", 30, b, tb)))
            async with running_gateway(cfg, ScriptedPicker([])) as gw:
                got = await post_many(gw.url, 200, 5)
    assert all(status == 200 for status, _ in got)
    served = Counter(name for _, name in got)
    primary = sum(served[p.name] for p in a) / 200
    # the conformance test's tolerance: max(0.10, 4.5 sigma) around 0.7 ...
    assert abs(primary - 0.7) <= max(0.10, 4.5 * math.sqrt(0.7 * 0.3 / 200))
    # ... and smooth weighted round robin is exact
    assert primary == 0.7
    assert set(served) <= {p.name for p in pods}
    assert len(pa.requests) == 140 and len(pb.requests) == 60  # each pool asked only its own picker


async def test_a_picker_answering_with_the_other_pools_pod_is_refused() -> None:
    async with backends("a", "b") as (a, b):
        rogue = ScriptedPicker([], script=lambda req: Destination((b.key,)))
        async with epp(rogue) as target:
            cfg = parse_config(config(backend("ns/a", 1, [a], target), backend("ns/b", 0, [b], None)))
            reg = CollectorRegistry()
            async with (
                running_gateway(cfg, ScriptedPicker([]), reg) as gw,
                aiohttp.ClientSession() as s,
                s.post(gw.url + "/v1/completions", json=CHAT) as r,
            ):
                assert r.status == 502
                assert "may not use" in (await r.json())["error"]["message"]
    assert b.requests == []
    assert metric_value(reg, "inferoute_gateway_errors_total", {"cause": "invalid-destination"}) == 1


async def test_reload_under_load_drops_nothing_and_retires_the_old_picker(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    async with backends("old", "new") as (old, new):
        p_old, p_new = ScriptedPicker([old.key]), ScriptedPicker([new.key])
        async with epp(p_old) as t_old, epp(p_new) as t_new:
            first = config(backend("ns/pool", 1, [old], t_old))
            path.write_text(yaml.safe_dump(first))
            reg = CollectorRegistry()
            async with running_gateway(parse_config(first), ScriptedPicker([]), reg) as gw:
                watcher = ConfigWatcher(path, gw.reload, reg)
                watcher.prime()
                assert not await watcher.check()  # unchanged file: nothing to do
                old_deciders = gw.route_table
                async with aiohttp.ClientSession() as s:
                    # streams in flight on the old route while the configuration changes
                    streams = [asyncio.create_task(_stream(s, gw.url, n=20, gap=0.02)) for _ in range(10)]
                    load = asyncio.create_task(post_many(gw.url, 300, 8))
                    await asyncio.wait_for(old.sse_started.wait(), 10)
                    path.write_text(yaml.safe_dump(config(backend("ns/pool", 1, [new], t_new))))
                    assert await watcher.check()
                    assert old_deciders.retired and old_deciders.active > 0  # streams still on it
                    after = await post_many(gw.url, 20, 4)
                    texts = await asyncio.gather(*streams)
                    during = await load
                await asyncio.wait_for(old_deciders.drained.wait(), 10)
                for _ in range(100):  # the retire task closes the old set right after the drain
                    if not old_deciders._owned:
                        break
                    await asyncio.sleep(0.01)
    assert all(t.count("data: {") == 20 and t.endswith("data: [DONE]\n\n") for t in texts)
    assert all('"served_by": "old"' in t for t in texts)  # in-flight requests kept their route
    assert all(status == 200 for status, _ in during)  # no request dropped across the reload
    assert {name for _, name in during} <= {"old", "new"}
    assert after and all(r == (200, "new") for r in after)  # new requests take the new route
    assert metric_value(reg, "inferoute_gateway_config_reloads_total", {"result": "ok"}) == 1
    assert old_deciders._owned == []  # the old picker's channel was closed after the drain


async def _stream(s: aiohttp.ClientSession, url: str, n: int, gap: float) -> str:
    async with s.post(url + "/v1/completions", json={**CHAT, "stream": True, "n": n, "gap": gap}) as r:
        assert r.status == 200
        return await r.text()


async def test_an_invalid_file_keeps_the_running_routes(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    async with backends("a") as (a,):
        first = config(backend("ns/pool", 1, [a], None))
        path.write_text(yaml.safe_dump(first))
        reg = CollectorRegistry()
        async with running_gateway(parse_config(first), ScriptedPicker([]), reg) as gw:
            watcher = ConfigWatcher(path, gw.reload, reg)
            watcher.prime()
            path.write_text("routes: [{path: no-slash}]\n")
            assert not await watcher.check()
            path.write_text(yaml.safe_dump({**first, "listen": "127.0.0.1:1"}))  # restart-only key
            assert await watcher.check()
            got = await post_many(gw.url, 3, 1)
    assert got == [(200, "a")] * 3
    assert metric_value(reg, "inferoute_gateway_config_reloads_total", {"result": "invalid"}) == 1
    assert metric_value(reg, "inferoute_gateway_config_reloads_total", {"result": "ok"}) == 1
