"""A Kubernetes API for tests: the ``kmock`` emulator on a real socket, a kubeconfig pointing at it, object
builders, and the CRDs' OpenAPI schemas (every InferencePool a test uses is validated against its CRD).

The emulator is kmock's in-memory API server; the picker reaches it through lightkube, the real client. Two
test controls are added on top: ``expire_next_watch_event`` turns the next watch event into the API server's
``410 Gone`` ERROR event (the event itself is lost, as with a real expired watch), and
:meth:`KubeApi.restart` stops the HTTP server and starts it again on the same port with the same objects.
Leases get resourceVersions and ``409 Conflict`` on a stale write (see :class:`Emulator`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import kmock
import yaml
from kmock._internal.k8s import KubernetesObjectConflictError

CRDS = Path(__file__).resolve().parent.parent / "deploy" / "crds"
POOLS = "inference.networking.k8s.io/v1/inferencepools"
POOLS_URL = "/apis/inference.networking.k8s.io/v1/namespaces/{ns}/inferencepools"
PODS_URL = "/api/v1/namespaces/{ns}/pods"
LEASES_URL = "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases"
OBJECTIVES_URL = "/apis/llm-d.ai/v1alpha2/namespaces/{ns}/inferenceobjectives"
REWRITES_URL = "/apis/llm-d.ai/v1alpha2/namespaces/{ns}/inferencemodelrewrites"


@functools.cache
def crd_schema(filename: str, version: str) -> dict[str, Any]:
    crd = yaml.safe_load((CRDS / filename).read_text())
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return dict(v["schema"]["openAPIV3Schema"])
    raise AssertionError(f"{filename}: no version {version}")


def validate(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    """Validate against the CRD's OpenAPI schema (raises ``jsonschema.ValidationError``); returns ``obj``."""
    version = obj["apiVersion"].rpartition("/")[2]
    filename = {
        "InferencePool": "inference.networking.k8s.io_inferencepools.yaml",
        "InferenceObjective": "llm-d.ai_inferenceobjectives.yaml",
        "InferenceModelRewrite": "llm-d.ai_inferencemodelrewrites.yaml",
    }[obj["kind"]]
    jsonschema.validate(obj, crd_schema(filename, version))
    return obj


def pool(
    name: str = "pool", ns: str = "default", *, ports: tuple[int, ...] = (8000,), **labels: str
) -> dict[str, Any]:
    obj = {
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "selector": {"matchLabels": labels or {"app": "vllm"}},
            "targetPorts": [{"number": p} for p in ports],
            "endpointPickerRef": {"name": f"{name}-epp", "port": {"number": 9002}},
        },
    }
    validate(obj)
    return obj


def objective(
    name: str, priority: int | None, pool_name: str = "pool", group: str = "llm-d.ai"
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": f"{group}/v1alpha2",
        "kind": "InferenceObjective",
        "metadata": {"name": name, "namespace": "default", "creationTimestamp": "2026-12-01T00:00:00Z"},
        "spec": {"poolRef": {"group": "inference.networking.k8s.io", "name": pool_name}},
    }
    if priority is not None:
        obj["spec"]["priority"] = priority
    if group == "llm-d.ai":
        validate(obj)
    return obj


def rewrite(
    name: str, model: str, targets: dict[str, int], created: str = "2026-12-01T00:00:00Z"
) -> dict[str, Any]:
    obj = {
        "apiVersion": "llm-d.ai/v1alpha2",
        "kind": "InferenceModelRewrite",
        "metadata": {"name": name, "namespace": "default", "creationTimestamp": created},
        "spec": {
            "poolRef": {"name": "pool"},
            "rules": [
                {
                    "matches": [{"model": {"type": "Exact", "value": model}}],
                    "targets": [{"modelRewrite": m, "weight": w} for m, w in targets.items()],
                }
            ],
        },
    }
    validate(obj)
    return obj


def pod(
    name: str, ip: str, *, ready: bool = True, ns: str = "default", labels: Mapping[str, str] | None = None
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": dict(labels or {"app": "vllm"})},
        "spec": {"containers": [{"name": "server", "image": "vllm"}]},
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def ready_patch(ready: bool) -> dict[str, Any]:
    return {"status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


class Emulator(kmock.KubernetesEmulator):
    """kmock's emulator with a switch that makes the next watch event a ``410 Gone`` ERROR event, and
    optimistic concurrency for Leases as the API server does it (kmock has no resourceVersions): every
    write gives the Lease a new ``metadata.resourceVersion``, and a write that names another one than the
    current, or a create of an existing Lease, is answered ``409 Conflict``."""

    expire_next_watch_event: bool = False
    expired_watches: int = 0
    watch_tasks: set[asyncio.Task[Any]] | None = None
    lease_versions: dict[tuple[str, str], int] | None = None
    lease_conflicts: int = 0

    async def _handle(self, request: Any) -> Any:
        res = request.resource
        writes = (kmock.action.CREATE, kmock.action.UPDATE)
        if res is not None and res.plural == "leases" and request.action in writes:
            self._lease_version(request)  # synchronous: check and bump cannot interleave with another write
        return await super()._handle(request)

    def _lease_version(self, request: Any) -> None:
        versions = self.lease_versions = self.lease_versions if self.lease_versions is not None else {}
        meta = request.data.setdefault("metadata", {})
        key = (str(request.namespace or meta.get("namespace")), str(request.name or meta.get("name")))
        current = versions.get(key)
        wanted = meta.get("resourceVersion")
        if (request.action == kmock.action.CREATE and current is not None) or (
            request.action == kmock.action.UPDATE and wanted is not None and wanted != str(current)
        ):
            self.lease_conflicts += 1
            raise KubernetesObjectConflictError()
        versions[key] = (current or 0) + 1
        meta["resourceVersion"] = str(versions[key])

    def cut_watches(self) -> None:
        """Abort every open watch stream (as a crashing API server would)."""
        for task in self.watch_tasks or ():
            task.cancel()

    async def _serve_watch(self, request: Any) -> AsyncIterator[Any]:  # type: ignore[override]
        if self.watch_tasks is None:
            self.watch_tasks = set()
        task = asyncio.current_task()
        assert task is not None
        self.watch_tasks.add(task)
        try:
            async for event in self._expiring(request):
                yield event
        finally:
            self.watch_tasks.discard(task)

    async def _expiring(self, request: Any) -> AsyncIterator[Any]:
        async for event in super()._serve_watch(request):
            if event != b"" and self.expire_next_watch_event:
                self.expire_next_watch_event = False
                self.expired_watches += 1
                yield {
                    "type": "ERROR",
                    "object": {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "status": "Failure",
                        "message": "too old resource version",
                        "reason": "Expired",
                        "code": 410,
                    },
                }
                return
            yield event


class KubeApi:
    """The emulator behind a real port, plus a kubeconfig file pointing at it."""

    def __init__(self, handler: Emulator, server: kmock.Server, kubeconfig: Path) -> None:
        self.handler, self.server, self.kubeconfig = handler, server, kubeconfig
        self.port = server.port
        self.running = True

    @property
    def client(self) -> Any:
        return self.server.client

    async def create(self, url: str, obj: Mapping[str, Any], ns: str = "default") -> None:
        async with self.client.post(url.format(ns=ns), json=obj) as resp:
            assert resp.status < 300, await resp.text()

    async def patch(self, url: str, name: str, patch: Mapping[str, Any], ns: str = "default") -> None:
        async with self.client.patch(url.format(ns=ns) + "/" + name, json=patch) as resp:
            assert resp.status < 300, await resp.text()

    async def delete(self, url: str, name: str, ns: str = "default") -> None:
        async with self.client.delete(url.format(ns=ns) + "/" + name) as resp:
            assert resp.status < 300, await resp.text()

    async def stop(self) -> None:
        """Stop serving (open watches are cut); the objects stay in ``handler``."""
        self.running = False
        self.handler.cut_watches()
        await self.server.__aexit__(None, None, None)

    async def start(self) -> None:
        """Serve again on the same port."""
        self.server = kmock.Server(self.handler, port=self.port)
        await self.server.__aenter__()
        self.running = True


def write_kubeconfig(path: Path, url: str, namespace: str = "default") -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "emulator", "cluster": {"server": url}}],
                "users": [{"name": "test", "user": {"token": "test-token"}}],
                "contexts": [
                    {
                        "name": "test",
                        "context": {"cluster": "emulator", "user": "test", "namespace": namespace},
                    }
                ],
                "current-context": "test",
            }
        )
    )
    return path


@contextlib.asynccontextmanager
async def kube_api(tmp_path: Path) -> AsyncIterator[KubeApi]:
    """A running emulator that knows pods, leases, InferencePools and the llm-d objective/rewrite CRDs."""
    async with Emulator() as handler:
        for resource in (
            "v1/pods",
            "coordination.k8s.io/v1/leases",
            POOLS,
            "llm-d.ai/v1alpha2/inferenceobjectives",
            "llm-d.ai/v1alpha2/inferencemodelrewrites",
            "inference.networking.x-k8s.io/v1alpha2/inferenceobjectives",
            "inference.networking.x-k8s.io/v1alpha2/inferencemodelrewrites",
        ):
            handler.resources[resource] = {}
        server = kmock.Server(handler)
        await server.__aenter__()
        api = KubeApi(handler, server, write_kubeconfig(tmp_path / "kubeconfig", str(server.url)))
        try:
            yield api
        finally:
            if api.running:
                await api.stop()
