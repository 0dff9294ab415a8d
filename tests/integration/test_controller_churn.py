"""Pod churn through ``inferoute controller``: while clients send requests through a gateway that reloads
the controller's file (``--watch-config``'s watcher, polling every second), a pod turns unready, another is
deleted and a new one appears; the test measures when the gateway stops (or starts) sending to each.

The pool has no picker, so the gateway round-robins over exactly the endpoints the controller wrote: the
figures are the controller's path alone (watch event -> translation -> file -> reload), which is also what
bounds a fail-open pool and the destinations a gateway accepts from a picker. The controller's own part (API
change to file written) is measured separately from the gateway's poll. Four simulator pods listen on
127.0.0.1-4 at one port (the pool's targetPort), so the fake pods' podIPs are real.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from test_controller_kmock import Cluster, cluster, eventually
from test_epp_kubernetes_load import IPS, load, pods, port_free_on_all

from k8s_objects import http_route, inference_pool, pod, pool_ref


async def _serving(c: Cluster, n: int, check: bool = False) -> bool:
    """Whether the gateway routes to ``n`` endpoints now (``check``: read the file first; otherwise only
    the running watcher applies it)."""
    if check:
        await c.routes()
    assert c.gw is not None
    table = c.gw.route_table.route_table
    return len(table) == 1 and len(table[0].route.backends[0].endpoints) == n  # type: ignore[attr-defined]


async def _file_changes(path: Path, times: list[float]) -> None:
    """Appends the time of every change of ``path``'s content (polled every 5 ms)."""
    last = await asyncio.to_thread(path.read_bytes)
    while True:
        await asyncio.sleep(0.005)
        now = await asyncio.to_thread(path.read_bytes)
        if now != last:
            times.append(time.monotonic())
            last = now


async def test_pod_churn_reaches_the_gateway_through_the_controller(tmp_path: Path) -> None:
    port = port_free_on_all(IPS)
    async with pods(port) as arrivals, cluster(tmp_path) as c:
        await c.create(inference_pool("sims", [port], picker=None))
        for i, ip in enumerate(IPS[:3]):
            await c.create(pod(f"p{i}", "sims", ip=ip))
        await c.create(http_route("chat", [pool_ref("sims")]))
        await eventually(lambda: _serving(c, 3, check=True))
        assert c.watcher is not None
        watching = asyncio.create_task(c.watcher.run())  # what the gateway runs with --watch-config
        writes: list[float] = []
        noticing = asyncio.create_task(_file_changes(c.config_file, writes))
        stop, statuses = asyncio.Event(), []
        try:
            clients = [asyncio.create_task(load(c.gw.url, stop, statuses)) for _ in range(8)]  # type: ignore[union-attr]
            await asyncio.sleep(0.5)
            t_unready = time.monotonic()
            await c.patch("Pod", "p0", {"status": {"conditions": [{"type": "Ready", "status": "False"}]}})
            await eventually(lambda: _serving(c, 2))
            await asyncio.sleep(0.3)
            t_deleted = time.monotonic()
            await c.delete("Pod", "p1")
            t_added = time.monotonic()
            await c.create(pod("p3", "sims", ip=IPS[3]))
            await eventually(lambda: _serving(c, 2) if arrivals[IPS[3]] else False)
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*clients)
        finally:
            watching.cancel()
            noticing.cancel()
    written = [min(w for w in writes if w >= t) - t for t in (t_unready, t_deleted)]
    unready = max(arrivals[IPS[0]]) - t_unready
    deleted = max(arrivals[IPS[1]]) - t_deleted
    added = min(t for t in arrivals[IPS[3]] if t >= t_added) - t_added
    print(
        f"through the controller: last request to the unready pod {unready * 1000:.0f} ms after the change, "
        f"to the deleted pod {deleted * 1000:.0f} ms, first to the new pod {added * 1000:.0f} ms; "
        f"{len(statuses)} requests, {sum(s != 200 for s in statuses)} failed; the controller wrote the file "
        f"{written[0] * 1000:.0f} and {written[1] * 1000:.0f} ms after the first two changes"
    )
    assert max(written) < 1.0  # the controller's part: watch event, 50 ms debounce, translation, write
    assert statuses and all(s == 200 for s in statuses)
    assert arrivals[IPS[2]]  # the steady pod served throughout
    # the watcher's 1 s poll + translation + reload, with a margin for a loaded CI machine
    assert max(unready, deleted, added) < 2.5
