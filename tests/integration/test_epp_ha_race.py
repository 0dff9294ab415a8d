"""Two standbys race for an expired Lease on the Kubernetes API emulator (with the API server's optimistic
concurrency): the second write carries a stale resourceVersion and gets 409 Conflict, exactly one replica
leads, and the loser stays a standby that keeps polling while the winner renews."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

import httpx2
import pytest

from inferoute.clock import FakeClock
from inferoute.epp.datalayer.kubernetes_watch import api_status, load_kube_config
from inferoute.epp.ha import HaOptions, LeaseElector
from kube_emulator import LEASES_URL, KubeApi, kube_api

LEASE = {
    "apiVersion": "coordination.k8s.io/v1",
    "kind": "Lease",
    "metadata": {"name": "pool-epp", "namespace": "default"},
    "spec": {
        "holderIdentity": "dead",
        "leaseDurationSeconds": 1,
        "leaseTransitions": 4,
        "renewTime": "2026-12-05T08:00:00.000000Z",
    },
}


async def lease_spec(api: KubeApi) -> dict[str, object]:
    async with api.client.get(LEASES_URL.format(ns="default") + "/pool-epp") as resp:
        spec: dict[str, object] = (await resp.json())["spec"]
    return spec


async def until(check: Callable[[], bool], deadline: float = 5.0) -> None:
    async with asyncio.timeout(deadline):
        while not check():  # noqa: ASYNC110 (the elector has no change event)
            await asyncio.sleep(0.01)


async def test_two_standbys_race_for_an_expired_lease(tmp_path: Path) -> None:
    async with kube_api(tmp_path) as api:
        await api.create(LEASES_URL, LEASE)
        clock = FakeClock()
        config = load_kube_config(str(api.kubeconfig))
        timings = {"lease_duration": 1, "renew_deadline": 0.6, "retry_period": 0.1}
        a, b = (LeaseElector(HaOptions("pool-epp", "default", n, **timings), config, clock) for n in "ab")
        assert (await a.read(), await b.read()) == ("wait", "wait")  # "dead" holds it
        clock.advance(1.01)  # no renewal seen for longer than the lease, by the replicas' clock
        assert (await a.read(), await b.read()) == ("acquire", "acquire")  # both read the same version
        await a.write("acquire")
        with pytest.raises(httpx2.HTTPStatusError) as err:
            await b.write("acquire")
        assert (api_status(err.value) or (0, ""))[0] == 409 and api.handler.lease_conflicts == 1
        assert a.is_leader() and not b.is_leader()
        spec = await lease_spec(api)
        assert (spec["holderIdentity"], spec["leaseTransitions"]) == ("a", 5)

        async def tick() -> None:  # the replicas' clock follows real time from here on
            while True:
                await asyncio.sleep(0.01)
                clock.advance(0.01)

        tasks = [asyncio.create_task(f()) for f in (tick, a.run, b.run)]
        try:
            rounds = b.rounds
            await until(lambda: b.rounds >= rounds + 10)  # the loser keeps polling (a second or so) ...
            assert a.is_leader() and not b.is_leader()  # ... as a standby: a renews, b never takes over
            spec = await lease_spec(api)
            assert (spec["holderIdentity"], spec["leaseTransitions"]) == ("a", 5)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        assert (await lease_spec(api))["holderIdentity"] == ""  # the leader released it on stop
