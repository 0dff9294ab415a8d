"""InferenceObjective / InferenceModelRewrite objects from the Kubernetes API emulator into the picker's
request-control store (the one the YAML fills), through the real client."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from inferoute.epp.datalayer.kubernetes_crds import CrdSync
from inferoute.epp.datalayer.kubernetes_watch import load_kube_config
from inferoute.epp.requestcontrol.store import RequestControlStore, load_objectives
from kube_emulator import OBJECTIVES_URL, REWRITES_URL, KubeApi, kube_api, objective, rewrite

DEPRECATED_OBJECTIVES_URL = "/apis/inference.networking.x-k8s.io/v1alpha2/namespaces/{ns}/inferenceobjectives"


async def until(check: Callable[[], bool], deadline: float = 1.0) -> None:
    async with asyncio.timeout(deadline):
        while not check():  # noqa: ASYNC110 (the store has no change event; 5 ms polls)
            await asyncio.sleep(0.005)


@pytest.fixture
async def synced(tmp_path: Path) -> AsyncIterator[tuple[KubeApi, RequestControlStore]]:
    async with kube_api(tmp_path) as api:
        store = RequestControlStore()
        load_objectives(store, [{"name": "from-yaml", "priority": 5}], "objectives")
        sync = CrdSync(store, "pool", "default", load_kube_config(str(api.kubeconfig)))
        task = asyncio.create_task(sync.run())
        try:
            yield api, store
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task


async def test_objectives_follow_their_objects(synced: tuple[KubeApi, RequestControlStore]) -> None:
    api, store = synced
    await api.create(OBJECTIVES_URL, objective("critical", 2))
    await api.create(OBJECTIVES_URL, objective("batch", -1))
    await api.create(OBJECTIVES_URL, objective("unset", None))
    await api.create(OBJECTIVES_URL, objective("other-pool", 9, pool_name="elsewhere"))
    await until(lambda: store.priority("critical") == 2 and store.priority("batch") == -1)
    assert store.priority("unset") == 0 and "unset" in store.objectives()
    assert "other-pool" not in store.objectives()
    await api.patch(OBJECTIVES_URL, "critical", {"spec": {"priority": 3}})
    await until(lambda: store.priority("critical") == 3)
    await api.delete(OBJECTIVES_URL, "critical")
    await until(lambda: "critical" not in store.objectives())
    assert store.priority("from-yaml") == 5  # the YAML's entries are never touched


async def test_deprecated_group_is_still_read(synced: tuple[KubeApi, RequestControlStore]) -> None:
    api, store = synced
    await api.create(DEPRECATED_OBJECTIVES_URL, objective("old", 4, group="inference.networking.x-k8s.io"))
    await until(lambda: store.priority("old") == 4)


async def test_weighted_rewrites_follow_their_objects(synced: tuple[KubeApi, RequestControlStore]) -> None:
    api, store = synced
    rng = random.Random(7)
    await api.create(REWRITES_URL, rewrite("canary", "llama", {"llama-v1": 70, "llama-v2": 30}))
    await until(lambda: store.rewrite("llama", rng) is not None)
    picks = [store.rewrite("llama", rng) for _ in range(2000)]
    assert 0.65 < picks.count("llama-v1") / len(picks) < 0.75
    # an older object matching the same model wins (the reference's precedence)
    await api.create(
        REWRITES_URL, rewrite("older", "llama", {"llama-old": 1}, created="2026-01-01T00:00:00Z")
    )
    await until(lambda: store.rewrite("llama", rng) == "llama-old")
    await api.delete(REWRITES_URL, "older")
    await api.delete(REWRITES_URL, "canary")
    await until(lambda: store.rewrite("llama", rng) is None)
