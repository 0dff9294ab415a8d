"""InferencePool discovery against a Kubernetes API emulator (kmock) through the real client (lightkube).

Each change made through the API must reach the endpoint set within one second; a watch that expires (410)
or an API server restart must lose no update.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import kmock
import pytest

from inferoute.endpoints import Endpoint
from inferoute.epp.datalayer.kubernetes_watch import KubernetesSource, load_kube_config
from inferoute.errors import InferouteError
from kube_emulator import PODS_URL, POOLS_URL, KubeApi, kube_api, pod, pool, ready_patch

DEADLINE = 1.0


class Recorder:
    """The source's emissions, with a way to wait for one that satisfies a predicate."""

    def __init__(self) -> None:
        self.lists: list[list[Endpoint]] = []
        self._changed = asyncio.Event()

    def __call__(self, endpoints: list[Endpoint]) -> None:
        self.lists.append(endpoints)
        self._changed.set()

    @property
    def keys(self) -> list[str]:
        return [e.key for e in self.lists[-1]] if self.lists else []

    async def wait(self, predicate: Callable[[list[str]], bool], deadline: float = DEADLINE) -> float:
        """Seconds until ``predicate(keys)`` holds; fails after ``deadline``."""
        start = time.monotonic()
        async with asyncio.timeout(deadline):
            while not predicate(self.keys):
                self._changed.clear()
                await self._changed.wait()
        return time.monotonic() - start


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[KubeApi]:
    async with kube_api(tmp_path) as api:
        yield api


@pytest.fixture
async def running(api: KubeApi) -> AsyncIterator[tuple[KubernetesSource, Recorder]]:
    source = KubernetesSource("pool", "default", kubeconfig=str(api.kubeconfig))
    assert source.initial() == []
    rec = Recorder()
    task = asyncio.create_task(source.watch(rec))
    try:
        yield source, rec
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_pods_appearing_turning_unready_and_disappearing(api: KubeApi, running: tuple) -> None:
    _, rec = running
    await rec.wait(lambda keys: rec.lists != [])  # pool not found yet: no endpoints
    assert rec.keys == []
    await api.create(PODS_URL, pod("a", "10.0.0.1"))
    await api.create(POOLS_URL, pool(ports=(8000,)))
    await rec.wait(lambda keys: keys == ["10.0.0.1:8000"])
    await api.create(PODS_URL, pod("b", "10.0.0.2"))
    await api.create(PODS_URL, pod("other", "10.0.0.9", labels={"app": "other"}))
    await api.create(PODS_URL, pod("c", "10.0.0.3", ready=False))
    await rec.wait(lambda keys: keys == ["10.0.0.1:8000", "10.0.0.2:8000"])
    await api.patch(PODS_URL, "c", ready_patch(True))
    await rec.wait(lambda keys: "10.0.0.3:8000" in keys)
    await api.patch(PODS_URL, "a", ready_patch(False))
    await rec.wait(lambda keys: keys == ["10.0.0.2:8000", "10.0.0.3:8000"])
    await api.delete(PODS_URL, "b")
    await rec.wait(lambda keys: keys == ["10.0.0.3:8000"])
    # a pod being deleted (graceful termination) leaves at once
    await api.patch(PODS_URL, "c", {"metadata": {"deletionTimestamp": "2026-12-04T00:00:00Z"}})
    await rec.wait(lambda keys: keys == [])
    assert all("10.0.0.9" not in e.key for emitted in rec.lists for e in emitted)


async def test_data_parallel_ports_and_engine_label(api: KubeApi, running: tuple) -> None:
    _, rec = running
    await api.create(POOLS_URL, pool(ports=(8000, 8001, 8002)))
    labels = {"app": "vllm", "inference.networking.k8s.io/engine-type": "sglang"}
    await api.create(PODS_URL, pod("dp", "10.0.0.5", labels=labels))
    await rec.wait(lambda keys: keys == ["10.0.0.5:8000", "10.0.0.5:8001", "10.0.0.5:8002"])
    names = [e.name for e in rec.lists[-1]]
    assert names == ["dp-rank-0", "dp-rank-1", "dp-rank-2"]
    assert all(e.labels["inference.networking.k8s.io/engine-type"] == "sglang" for e in rec.lists[-1])
    # the pool's ports and selector change: the endpoints follow without a new pod watch
    await api.patch(POOLS_URL, "pool", {"spec": {"targetPorts": [{"number": 9000}]}})
    await rec.wait(lambda keys: keys == ["10.0.0.5:9000"])
    await api.delete(POOLS_URL, "pool")
    await rec.wait(lambda keys: keys == [])


async def test_expired_watch_lists_again_and_loses_nothing(api: KubeApi, running: tuple) -> None:
    source, rec = running
    await api.create(POOLS_URL, pool())
    await api.create(PODS_URL, pod("a", "10.0.0.1"))
    await api.create(PODS_URL, pod("b", "10.0.0.2"))
    await rec.wait(lambda keys: keys == ["10.0.0.1:8000", "10.0.0.2:8000"])
    lists_before = source.pods.lists
    api.handler.expire_next_watch_event = True
    await api.delete(PODS_URL, "a")  # this DELETED event is replaced by 410 Gone: only a new list shows it
    took = await rec.wait(lambda keys: keys == ["10.0.0.2:8000"])
    assert api.handler.expired_watches == 1
    assert source.pods.lists == lists_before + 1
    assert took < DEADLINE


async def test_api_server_restart_mid_watch_loses_nothing(api: KubeApi, running: tuple) -> None:
    _, rec = running
    await api.create(POOLS_URL, pool())
    await api.create(PODS_URL, pod("a", "10.0.0.1"))
    await api.create(PODS_URL, pod("b", "10.0.0.2"))
    await rec.wait(lambda keys: keys == ["10.0.0.1:8000", "10.0.0.2:8000"])
    await api.stop()
    # while the API server is down: one pod goes away and another comes (no watch can see these events)
    api.handler.objects[kmock.resource("v1/pods"), "default", "a"].delete()
    api.handler.objects[kmock.resource("v1/pods"), "default", "c"] = pod("c", "10.0.0.3")
    await asyncio.sleep(0.3)  # the client retries against the closed port meanwhile
    assert rec.keys == ["10.0.0.1:8000", "10.0.0.2:8000"]
    await api.start()
    await rec.wait(lambda keys: keys == ["10.0.0.2:8000", "10.0.0.3:8000"], deadline=3.0)
    # and the new watch carries later changes
    await api.delete(PODS_URL, "c")
    await rec.wait(lambda keys: keys == ["10.0.0.2:8000"])


async def test_forbidden_is_reported_and_retried(
    api: KubeApi, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (
        api.handler["get", "/api/v1/namespaces/default/pods"]
        << 403
        << (
            {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "reason": "Forbidden",
                "code": 403,
                "message": (
                    'pods is forbidden: User "system:serviceaccount:default:epp" cannot list resource "pods"'
                ),
            },
        )
    )
    source = KubernetesSource("pool", "default", kubeconfig=str(api.kubeconfig))
    source.initial()
    rec = Recorder()
    caplog.set_level(logging.ERROR)
    task = asyncio.create_task(source.watch(rec))
    try:
        async with asyncio.timeout(2):
            while not any("forbidden to list/watch pods" in r.getMessage() for r in caplog.records):  # noqa: ASYNC110
                await asyncio.sleep(0.01)  # log records have no event to wait on
        assert source.pods is not None and not source.pods.synced.is_set()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    line = next(r.getMessage() for r in caplog.records if "forbidden" in r.getMessage())
    assert "RBAC" in line and "\n" not in line


def test_no_cluster_configuration_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(InferouteError) as err:
        load_kube_config()
    assert "no Kubernetes cluster configuration" in err.value.message
    assert "\n" not in err.value.message
