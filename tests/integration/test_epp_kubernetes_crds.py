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
from inferoute.epp.requestcontrol.store import RequestControlStore, load_objectives, load_rewrites
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


async def test_an_object_outranks_the_yaml_entry_of_its_name(
    synced: tuple[KubeApi, RequestControlStore],
) -> None:
    api, store = synced
    rng = random.Random(3)
    load_objectives(store, [{"name": "shared", "priority": 5}], "objectives")
    yaml_rewrites = [_yaml_rewrite("canary", "llama", "llama-yaml"), _yaml_rewrite("y2", "m2", "m2-yaml")]
    load_rewrites(store, yaml_rewrites, "modelRewrites")
    assert store.priority("shared") == 5 and store.rewrite("llama", rng) == "llama-yaml"
    await api.create(OBJECTIVES_URL, objective("shared", 9))
    await api.create(REWRITES_URL, rewrite("canary", "llama", {"llama-crd": 1}))
    # a differently named object matching the YAML's model: objects come first (the YAML's is older)
    await api.create(REWRITES_URL, rewrite("other", "m2", {"m2-crd": 1}))
    await until(lambda: store.priority("shared") == 9 and store.rewrite("m2", rng) == "m2-crd")
    assert store.rewrite("llama", rng) == "llama-crd"
    assert store.priority("from-yaml") == 5  # YAML entries without an object of their name still apply
    # a deprecated-group object of the same name ranks below the current group, above the YAML
    await api.create(DEPRECATED_OBJECTIVES_URL, objective("shared", 7, group="inference.networking.x-k8s.io"))
    await api.create(DEPRECATED_OBJECTIVES_URL, objective("marker", 1, group="inference.networking.x-k8s.io"))
    await until(lambda: "marker" in store.objectives())
    assert store.priority("shared") == 9
    # objects gone: the shadowed entries apply again
    await api.delete(OBJECTIVES_URL, "shared")
    await until(lambda: store.priority("shared") == 7)
    await api.delete(DEPRECATED_OBJECTIVES_URL, "shared")
    await api.delete(REWRITES_URL, "canary")
    await api.delete(REWRITES_URL, "other")
    await until(lambda: store.rewrite("llama", rng) == "llama-yaml" and store.rewrite("m2", rng) == "m2-yaml")
    assert store.priority("shared") == 5


async def test_yaml_applies_while_the_crd_is_not_installed(tmp_path: Path) -> None:
    async with kube_api(tmp_path) as api:
        resources = api.handler.resources
        del resources["llm-d.ai/v1alpha2/inferenceobjectives"]
        store = RequestControlStore()
        load_objectives(store, [{"name": "shared", "priority": 5}], "objectives")
        sync = CrdSync(store, "pool", "default", load_kube_config(str(api.kubeconfig)))
        task = asyncio.create_task(sync.run())
        try:
            # the deprecated group's objectives are listed; the current group's answer 404
            await until(lambda: len(sync.objectives) == 2 and sync.objectives[1][1].synced.is_set())
            assert not sync.objectives[0][1].synced.is_set()
            assert store.priority("shared") == 5  # so the YAML's entry is the only one
            resources["llm-d.ai/v1alpha2/inferenceobjectives"] = {}  # the CRD gets installed
            await api.create(OBJECTIVES_URL, objective("shared", 9))
            await until(lambda: store.priority("shared") == 9, deadline=3.0)  # first retry after 0.5 + 1 s
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task


def _yaml_rewrite(name: str, model: str, target: str) -> dict[str, object]:
    return {"name": name, "rules": [{"matches": [{"model": {"type": "Exact", "value": model}}],
                                     "targets": [{"modelRewrite": target}]}]}  # fmt: skip
