"""``inferoute controller`` against the kmock Kubernetes API emulator, end to end over real sockets.

kopf watches kmock, lightkube writes status and ConfigMaps to it, the controller's file output feeds a real
gateway running ``--watch-config`` reloads, real ext_proc picker servers choose among real echo backends.
Mirrors the GIE conformance tests that apply without a cluster: InferencePoolAccepted,
HTTPRouteInvalidInferencePoolRef, InferencePoolInvalidEPPService, InferencePoolResolvedRefsCondition (route
deletion -> 404 and no parent status), GatewayFollowingEPPRouting (only the picker's choices, data-parallel
ports), GatewayWeightedAcrossTwoInferencePools (70/30) and EppUnAvailableFailOpen; an ``appProtocol:
kubernetes.io/h2c`` pool is accepted and served over HTTP/2 cleartext.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import kopf
import yaml
from lightkube import AsyncClient, KubeConfig
from prometheus_client import CollectorRegistry
from test_gw_grpc_picker import epp
from test_gw_h2c import h2_servers
from test_gw_support import Backend, ScriptedPicker, backends

from inferoute.controller.runtime import ConfigMapSink, FileSink, Reconciler, run_controller
from inferoute.controller.translate import Options
from inferoute.gateway.app import RunningGateway, start_gateway
from inferoute.gateway.config import load_config
from inferoute.gateway.reload import ConfigWatcher
from inferoute.picking import Destination
from k8s_objects import gateway, gateway_class, http_route, inference_pool, pod, pool_ref, service

CHAT = {"model": "m-1", "prompt": "hello"}
PATHS = {
    "GatewayClass": "/apis/gateway.networking.k8s.io/v1/gatewayclasses",
    "Gateway": "/apis/gateway.networking.k8s.io/v1/namespaces/default/gateways",
    "HTTPRoute": "/apis/gateway.networking.k8s.io/v1/namespaces/default/httproutes",
    "InferencePool": "/apis/inference.networking.k8s.io/v1/namespaces/default/inferencepools",
    "Service": "/api/v1/namespaces/default/services",
    "Pod": "/api/v1/namespaces/default/pods",
    "ConfigMap": "/api/v1/namespaces/default/configmaps",
}
RESOURCES = {
    "gateway.networking.k8s.io/v1/gatewayclasses": ("GatewayClass", False),
    "gateway.networking.k8s.io/v1/gateways": ("Gateway", True),
    "gateway.networking.k8s.io/v1/httproutes": ("HTTPRoute", True),
    "inference.networking.k8s.io/v1/inferencepools": ("InferencePool", True),
    "v1/services": ("Service", True),
    "v1/pods": ("Pod", True),
    "v1/configmaps": ("ConfigMap", True),
    "v1/namespaces": ("Namespace", False),
    "apiextensions.k8s.io/v1/customresourcedefinitions": ("CustomResourceDefinition", False),
}


async def eventually(check: Callable[[], Awaitable[Any]], within: float = 10.0) -> Any:
    """``check()``'s first truthy result, polled every 20 ms (AssertionError after ``within`` s)."""
    deadline = asyncio.get_running_loop().time() + within
    last: Any = None
    while asyncio.get_running_loop().time() < deadline:
        with contextlib.suppress(AssertionError, KeyError, IndexError, TypeError):
            last = await check()
            if last:
                return last
        await asyncio.sleep(0.02)
    raise AssertionError(f"condition not met within {within} s (last: {last!r})")


class Cluster:
    """kmock + the controller + a gateway reloading the controller's file for Gateway default/gw."""

    def __init__(self, url: str, out: Path, session: aiohttp.ClientSession) -> None:
        self.url = url.rstrip("/")
        self.out = out
        self.http = session
        self.gw: RunningGateway | None = None
        self.watcher: ConfigWatcher | None = None

    async def create(self, obj: dict[str, Any]) -> None:
        async with self.http.post(self.url + PATHS[obj["kind"]], json=obj) as r:
            assert r.status == 200, await r.text()

    async def patch(self, kind: str, name: str, patch: dict[str, Any]) -> None:
        headers = {"Content-Type": "application/merge-patch+json"}
        async with self.http.patch(f"{self.url}{PATHS[kind]}/{name}", json=patch, headers=headers) as r:
            assert r.status == 200, await r.text()

    async def delete(self, kind: str, name: str) -> None:
        async with self.http.delete(f"{self.url}{PATHS[kind]}/{name}") as r:
            assert r.status == 200, await r.text()

    async def get(self, kind: str, name: str) -> dict[str, Any]:
        async with self.http.get(f"{self.url}{PATHS[kind]}/{name}") as r:
            assert r.status == 200, await r.text()
            doc: dict[str, Any] = await r.json()
            return doc

    async def conditions(self, kind: str, name: str) -> dict[str, tuple[str, str]]:
        """Our parent entry's conditions: {type: (status, reason)}."""
        obj = await self.get(kind, name)
        (entry,) = [
            p for p in obj["status"]["parents"] if p["controllerName"] == "inferoute.dev/gateway-controller"
        ]
        return {c["type"]: (c["status"], c["reason"]) for c in entry["conditions"]}

    @property
    def config_file(self) -> Path:
        return self.out / "default.gw.gateway.yaml"

    async def routes(self) -> list[str]:
        """The routes the running gateway serves now (after checking the file once)."""
        assert self.gw is not None and self.watcher is not None
        await self.watcher.check()
        return [d.route.path for d in self.gw.route_table.route_table]

    async def post(self, n: int = 1, concurrency: int = 1) -> list[tuple[int, str]]:
        assert self.gw is not None
        out: list[tuple[int, str]] = []
        todo = iter(range(n))

        async def worker() -> None:
            for _ in todo:
                async with self.http.post(self.gw.url + "/v1/completions", json=CHAT) as r:  # type: ignore[union-attr]
                    doc = await r.json(content_type=None)
                    out.append((r.status, doc.get("served_by", "?") if r.status == 200 else "?"))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return out


@contextlib.asynccontextmanager
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with kmock.KubernetesEmulator() as k8s, kmock.Server(k8s) as srv:
        for res, (kind, namespaced) in RESOURCES.items():
            k8s.resources[res] = kmock.ResourceInfo(
                kind=kind,
                namespaced=namespaced,
                verbs={"list", "watch", "get", "create", "patch", "delete"},
                subresources={"status"},
            )
        url = str(srv.url).rstrip("/")
        client = AsyncClient(config=kube_config(url))
        stop = asyncio.Event()
        ready: asyncio.Future[Reconciler] = asyncio.get_running_loop().create_future()
        async with aiohttp.ClientSession() as session:
            c = Cluster(url, tmp_path, session)
            await c.create(gateway_class())
            await c.create(gateway())
            controller = asyncio.create_task(
                run_controller(
                    Options(listen="127.0.0.1:0", picker_timeout_ms=3000),
                    client,
                    [FileSink(tmp_path), ConfigMapSink(client)],
                    login=lambda **_: kopf.ConnectionInfo(server=url),
                    stop=stop,
                    ready=ready.set_result,
                )
            )
            try:
                await asyncio.wait_for(asyncio.shield(ready), 20)
                await eventually(lambda: _exists(c.config_file))
                c.gw = await start_gateway(load_config(c.config_file), registry=CollectorRegistry())
                c.watcher = ConfigWatcher(c.config_file, c.gw.reload, c.gw.registry)
                c.watcher.prime()
                yield c
            finally:
                stop.set()
                if c.gw is not None:
                    await c.gw.aclose(grace=1.0)
                await asyncio.wait_for(controller, 20)
                await client.close()


def kube_config(url: str) -> KubeConfig:
    return KubeConfig.from_dict(
        {
            "clusters": [{"name": "kmock", "cluster": {"server": url}}],
            "users": [{"name": "test", "user": {"token": "test"}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "test"}}],
            "current-context": "kmock",
        }
    )


async def _exists(path: Path) -> bool:
    return await asyncio.to_thread(path.exists)


async def pool_with_picker(
    c: Cluster,
    name: str,
    pods: list[Backend],
    picker: ScriptedPicker,
    stack: contextlib.AsyncExitStack,
    **kw: Any,
) -> None:
    """An InferencePool over ``pods`` (one pod object at 127.0.0.1, a target port per backend: data-parallel
    ranks) with its picker Service pointing at a real ext_proc server running ``picker``."""
    target = await stack.enter_async_context(epp(picker))
    port = int(target.rsplit(":", 1)[1])
    await c.create(service(f"{name}-epp", port))
    await c.create(inference_pool(name, [p.port for p in pods], picker=f"{name}-epp", picker_port=port, **kw))
    await c.create(pod(f"{name}-0", name))


async def test_accepted_pool_routes_only_to_the_pickers_choices(tmp_path: Path) -> None:
    async with (
        backends("a1", "a2", "a3") as pods,
        cluster(tmp_path) as c,
        contextlib.AsyncExitStack() as stack,
    ):
        chosen = [pods[0].key, pods[2].key]  # the picker never names a2
        await pool_with_picker(c, "pool-a", pods, ScriptedPicker(chosen), stack)
        assert await c.routes() == []
        assert (await c.post())[0][0] == 404  # no route yet
        await c.create(http_route("route-a", [pool_ref("pool-a", port=3000)]))  # backendRef port is ignored
        await eventually(lambda: c.routes())
        assert await eventually(lambda: c.conditions("InferencePool", "pool-a")) == {
            "Accepted": ("True", "Accepted"),
            "ResolvedRefs": ("True", "ResolvedRefs"),
        }
        assert await c.conditions("HTTPRoute", "route-a") == {
            "Accepted": ("True", "Accepted"),
            "ResolvedRefs": ("True", "ResolvedRefs"),
        }
        gw_status = (await c.get("Gateway", "gw"))["status"]
        assert {x["type"]: x["status"] for x in gw_status["conditions"]} == {
            "Accepted": "True",
            "Programmed": "True",
        }
        got = await c.post(100, 10)
        assert all(status == 200 for status, _ in got)
        assert {name for _, name in got} == {"a1", "a3"}
        cm = await c.get("ConfigMap", "inferoute-gateway-gw")
        assert yaml.safe_load(cm["data"]["gateway.yaml"]) == yaml.safe_load(c.config_file.read_text())
        # deleting the route: 404 again and no parent status on the pool (InferencePoolResolvedRefsCondition)
        await c.delete("HTTPRoute", "route-a")
        await eventually(lambda: _no_routes(c))
        assert (await c.post())[0][0] == 404
        assert await eventually(lambda: _parents_empty(c, "pool-a"))


async def _no_routes(c: Cluster) -> bool:
    return await c.routes() == []


async def _parents_empty(c: Cluster, pool: str) -> bool:
    return (await c.get("InferencePool", pool))["status"]["parents"] == []


async def test_weighted_split_and_fail_open_when_the_picker_is_gone(tmp_path: Path) -> None:
    async with (
        backends("a1", "a2", "b1", "b2") as pods,
        cluster(tmp_path) as c,
        contextlib.AsyncExitStack() as stack,
    ):
        a, b = pods[:2], pods[2:]
        await pool_with_picker(c, "primary", a, ScriptedPicker([p.key for p in a]), stack)
        picker_b = ScriptedPicker([p.key for p in b])
        b_stack = contextlib.AsyncExitStack()
        await pool_with_picker(c, "secondary", b, picker_b, b_stack, failure_mode="FailOpen")
        await c.create(
            http_route("split", [pool_ref("primary", weight=70), pool_ref("secondary", weight=30)])
        )
        await eventually(lambda: c.routes())
        got = await c.post(200, 5)
        assert all(status == 200 for status, _ in got)
        served = Counter(name for _, name in got)
        primary = (served["a1"] + served["a2"]) / 200
        assert abs(primary - 0.7) <= max(0.10, 4.5 * math.sqrt(0.7 * 0.3 / 200))
        assert set(served) <= {"a1", "a2", "b1", "b2"} and len(picker_b.requests) == 60
        # EppUnAvailableFailOpen: the secondary's picker goes away, its requests still reach its pods
        await b_stack.aclose()
        await c.patch("HTTPRoute", "split", {"spec": {"rules": [{"backendRefs": [pool_ref("secondary")]}]}})
        await eventually(lambda: _only_backend(c, "default/secondary"))
        got = await c.post(10, 2)
        assert got and all(status == 200 and name in ("b1", "b2") for status, name in got)


async def _only_backend(c: Cluster, name: str) -> bool:
    await c.routes()
    assert c.gw is not None
    (decider,) = c.gw.route_table.route_table
    return [b.route.epp.enabled for b in decider.backends] == [True] and decider.route.backends[
        0
    ].name == name  # type: ignore[attr-defined]


async def test_missing_pool_and_missing_picker_service(tmp_path: Path) -> None:
    async with backends("a1") as pods, cluster(tmp_path) as c:
        await c.create(http_route("to-nowhere", [pool_ref("nope")], path="/v1/"))
        assert await eventually(lambda: c.conditions("HTTPRoute", "to-nowhere")) == {
            "Accepted": ("True", "Accepted"),
            "ResolvedRefs": ("False", "BackendNotFound"),
        }
        await c.create(inference_pool("no-epp", [pods[0].port], picker="missing-svc"))
        await c.create(pod("no-epp-0", "no-epp"))
        await c.create(http_route("to-no-epp", [pool_ref("no-epp")], path="/v1/completions"))
        conds = await eventually(lambda: c.conditions("InferencePool", "no-epp"))
        assert conds == {"Accepted": ("True", "Accepted"), "ResolvedRefs": ("False", "InvalidExtensionRef")}
        assert (await c.conditions("HTTPRoute", "to-no-epp"))["Accepted"] == ("True", "Accepted")
        await eventually(lambda: _route_count(c, 2))
        ((status, _),) = await c.post()
        assert 500 <= status <= 504  # FailClose with no picker: a 5xx, never an unpicked pod
        assert pods[0].requests == []
        # the Service appears: the reference resolves and the status follows
        async with epp(ScriptedPicker([], script=lambda req: Destination((pods[0].key,)))) as target:
            await c.create(service("missing-svc", int(target.rsplit(":", 1)[1])))
            await c.patch(
                "InferencePool",
                "no-epp",
                {"spec": {"endpointPickerRef": {"port": {"number": int(target.rsplit(":", 1)[1])}}}},
            )
            assert await eventually(lambda: _resolved(c, "no-epp"))
            await eventually(lambda: _serves(c))


async def _route_count(c: Cluster, n: int) -> bool:
    return len(await c.routes()) == n


async def _resolved(c: Cluster, pool: str) -> bool:
    return (await c.conditions("InferencePool", pool))["ResolvedRefs"] == ("True", "ResolvedRefs")


async def _serves(c: Cluster) -> bool:
    await c.routes()
    return (await c.post())[0] == (200, "a1")


async def test_h2c_pool_is_accepted_and_served_over_http2(tmp_path: Path) -> None:
    async with (
        h2_servers(("s1", 200), ("s2", 200)) as servers,
        cluster(tmp_path) as c,
        contextlib.AsyncExitStack() as stack,
    ):
        keys = [srv.key for srv in servers]
        await pool_with_picker(
            c, "fast", servers, ScriptedPicker(keys), stack, app_protocol="kubernetes.io/h2c"
        )  # type: ignore[arg-type]
        await c.create(http_route("route-h2c", [pool_ref("fast")]))
        await eventually(lambda: c.routes())
        assert await eventually(lambda: c.conditions("InferencePool", "fast")) == {
            "Accepted": ("True", "Accepted"),
            "ResolvedRefs": ("True", "ResolvedRefs"),
        }
        assert yaml.safe_load(c.config_file.read_text())["routes"][0]["backends"][0]["app_protocol"] == "h2c"
        got = await c.post(20, 4)
        assert all(status == 200 for status, _ in got)
        assert {name for _, name in got} == {"s1", "s2"}
    assert [srv.connections for srv in servers] == [
        1,
        1,
    ]  # HTTP/2 (the h2 servers speak nothing else), reused
