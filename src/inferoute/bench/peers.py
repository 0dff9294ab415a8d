"""The processes of a routing benchmark: the simulator pool and each contender router.

Every process is started by us in its own session (process group) with its output in a log file,
waited for until it answers HTTP, and stopped by its own id (SIGTERM to its group, then SIGKILL) —
nothing is left running.

Contenders:

* ``inferoute/<profile>`` — ``inferoute gateway --config FILE`` with the embedded picker running the
  EndpointPickerConfig profile ``<profile>`` (round-robin, random, gie-default, predicted-ttft).
* ``vllm-router/<policy>`` — the ``vllm-router`` Rust router (PyPI), ``--policy <policy>``.
* ``sglang-router/<policy>`` — ``python -m sglang_router.launch_router`` (PyPI), ``--policy <policy>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import yaml

from inferoute.bench.workloads import BLOCK_SIZE, SimSizing
from inferoute.errors import InferouteError
from inferoute.gateway.config import PickerConfig
from inferoute.kvevents.config import KV_EVENTS_LABEL, KV_REPLAY_LABEL

log = logging.getLogger(__name__)

PROFILE_DIRS = (
    Path(__file__).resolve().parent.parent / "epp" / "profiles",
    Path(__file__).resolve().parent / "profiles",
)
"""Where the picker's shipped EndpointPickerConfig profiles live (then the benchmark's own ones)."""


def candidate_ports(n: int, *, consecutive: bool = False, attempts: int = 500) -> list[int]:
    """``n`` ports free on 127.0.0.1 right now, for a program that must be told its ports on the command line
    (NGINX and the Rust routers cannot bind port 0 and say which one they got). Only a candidate: another
    process may take one before the program binds it, which is why :func:`start_on_ports` checks who
    listens and starts again on new ports. ``consecutive``: a block ``base .. base+n-1`` (a simulator pool
    is told its base port), drawn below the kernel's ephemeral range (32768+), where outgoing connections
    of busy neighbours do not interleave with the block."""
    rng = random.SystemRandom()
    for _ in range(attempts):
        held: list[socket.socket] = []
        try:
            if consecutive:
                base = rng.randrange(15000, 32000 - n)
                for port in range(base, base + n):
                    held.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    held[-1].bind(("127.0.0.1", port))
            else:
                for _ in range(n):  # all held at once: n different ports
                    held.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    held[-1].bind(("127.0.0.1", 0))
            return [int(s.getsockname()[1]) for s in held]
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError(f"no {n} free ports")


def listening_ports(pid: int) -> set[int]:
    """TCP ports process ``pid`` listens on (Linux /proc): how a program that was told its port, or told to
    bind port 0 without printing it, is seen to hold it."""
    inodes: set[str] = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    except OSError:
        return set()
    ports: set[int] = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/net/{table}") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (NGINX workers, gateway workers), from /proc."""
    tree, stack = [], [pid]
    while stack:
        current = stack.pop()
        tree.append(current)
        with contextlib.suppress(OSError, ValueError):
            for task in Path(f"/proc/{current}/task").iterdir():
                stack.extend(int(c) for c in (task / "children").read_text().split())
    return tree


def owns_ports(pid: int, ports: Sequence[int]) -> bool:
    """Whether ``pid`` or one of its descendants listens on every one of ``ports``."""
    held: set[int] = set()
    for p in process_tree(pid):
        held |= listening_ports(p)
    return set(ports) <= held


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it if the benchmark process dies (even by SIGKILL),
    so a killed run leaves no simulator or router behind. A no-op elsewhere."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_PR_SET_PDEATHSIG = 1


class ManagedProcess:
    """A child process we own: started in its own process group, logged to a file, always stopped."""

    def __init__(
        self, name: str, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **(self.env or {})},
                preexec_fn=_die_with_parent,
            )
        log.debug("started %s pid %d: %s", self.name, self.proc.pid, " ".join(self.argv))

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def wait_http(self, urls: Sequence[str], within: float = 30.0) -> None:
        """Wait until every URL answers 2xx; fail (with the log tail) if the process dies or time runs out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        pending = list(urls)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while pending:
                if self.proc is not None and self.proc.returncode is not None:
                    raise InferouteError(
                        500,
                        f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}",
                        cause="bench-process",
                    )
                if loop.time() > deadline:
                    raise InferouteError(
                        504,
                        f"{self.name} not ready after {within}s ({pending[0]}):\n{self.log_tail()}",
                        cause="bench-process",
                    )
                url = pending[0]
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(url) as resp:
                        if 200 <= resp.status < 300:
                            pending.pop(0)
                            continue
                await asyncio.sleep(0.1)

    async def stop(self, grace: float = 5.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)  # the group we created for this child (start_new_session)
            try:
                await asyncio.wait_for(proc.wait(), wait)
                return
            except TimeoutError:
                continue


class RedisProcess(ManagedProcess):
    """A ``redis-server`` of our own on a unix socket (no port to pick, no persistence): the store our
    router replicas share their in-flight load and placements through. Its log goes to ``where``; the
    socket to a short directory of its own (a unix socket path has at most 107 bytes)."""

    def __init__(self, name: str, where: Path) -> None:
        where.mkdir(parents=True, exist_ok=True)
        self.socket_dir = Path(tempfile.mkdtemp(prefix="inferoute-redis-"))
        self.socket = self.socket_dir / "redis.sock"
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        argv = [exe, "--port", "0", "--unixsocket", str(self.socket), "--save", "", "--appendonly", "no"]
        super().__init__(name, [*argv, "--dir", str(self.socket_dir)], where / "redis.log")

    async def stop(self, grace: float = 5.0) -> None:
        await super().stop(grace)
        shutil.rmtree(self.socket_dir, ignore_errors=True)

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    async def wait_ready(self, within: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_unix_connection(str(self.socket))
                writer.close()
                return
            if (self.proc is not None and self.proc.returncode is not None) or loop.time() > deadline:
                raise InferouteError(
                    500,
                    f"{self.name} did not start (redis-server from Debian's redis-server package):\n"
                    + self.log_tail(),
                )
            await asyncio.sleep(0.02)


async def start_redis(name: str, where: Path) -> RedisProcess:
    """Start :class:`RedisProcess` in ``where`` and wait until it accepts connections."""
    proc = RedisProcess(name, where)
    await proc.start()
    try:
        await proc.wait_ready()
    except BaseException:
        await proc.stop()
        raise
    return proc


async def start_on_ports(
    make: Callable[[list[int]], ManagedProcess],
    ready_urls: Callable[[list[int]], Sequence[str]],
    *,
    ports: int = 1,
    consecutive: bool = False,
    owned: int | None = None,
    within: float = 60.0,
    attempts: int = 4,
) -> tuple[ManagedProcess, list[int]]:
    """Start a program told its ports on the command line (``make(ports)``); wait for ``ready_urls(ports)``.

    The ports are :func:`candidate_ports`; the start counts only when the program itself then listens on
    the first ``owned`` of them (default: all), so an answer from a process that took a port in between is
    never taken for ours. When the program exits before it is ready, or another process holds a port, it
    is stopped and started again on new ports (``attempts`` times).
    """
    last = ""
    for _ in range(attempts):
        chosen = candidate_ports(ports, consecutive=consecutive)
        proc = make(chosen)
        await proc.start()
        try:
            await proc.wait_http(ready_urls(chosen), within=within)
        except InferouteError as exc:
            exited = proc.proc is not None and proc.proc.returncode is not None
            await proc.stop()
            if not exited:
                raise
            last = exc.message
            continue
        assert proc.proc is not None
        if owns_ports(proc.proc.pid, chosen[: ports if owned is None else owned]):
            return proc, chosen
        last = f"another process holds one of the ports {chosen}"
        await proc.stop()
    raise InferouteError(
        500,
        f"{proc.name} did not start on its own ports in {attempts} attempts: {last}",
        cause="bench-process",
    )


def inferoute_argv(*args: str) -> list[str]:
    """Run the ``inferoute`` CLI of this very installation."""
    return [sys.executable, "-m", "inferoute", *args]


@dataclass(frozen=True, slots=True)
class SimPool:
    """Where a started simulator pool listens."""

    base_port: int
    replicas: int
    kv_base: int | None = None
    """With KV events: replica ``i`` publishes on ``kv_base + i``, replays on ``kv_base + replicas + i``."""

    def labels(self) -> list[dict[str, str]]:
        """Per replica, the endpoint labels that point a picker at its KV events (empty without)."""
        if self.kv_base is None:
            return [{} for _ in range(self.replicas)]
        pub, replay = self.kv_base, self.kv_base + self.replicas
        return [
            {KV_EVENTS_LABEL: f"tcp://127.0.0.1:{pub + i}", KV_REPLAY_LABEL: f"tcp://127.0.0.1:{replay + i}"}
            for i in range(self.replicas)
        ]

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{self.base_port + i}" for i in range(self.replicas)]


def sim_argv(
    sizing: SimSizing, base_port: int, time_scale: float, seed: int, kv_base: int | None = None
) -> list[str]:
    argv = inferoute_argv(
        "--log-level",
        "WARNING",
        "sim",
        "--replicas",
        str(sizing.replicas),
        "--port",
        str(base_port),
        "--model",
        sizing.model,
        "--max-num-seqs",
        str(sizing.max_num_seqs),
        "--kv-cache-blocks",
        str(sizing.kv_cache_blocks),
        "--time-scale",
        str(time_scale),
        "--seed",
        str(seed),
        "--max-model-len",
        str(sizing.max_model_len),
    )
    if sizing.lora_adapters:
        argv += ["--lora-adapters", ",".join(sizing.lora_adapters), "--max-loras", str(sizing.max_loras)]
    if kv_base is not None:
        events = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": f"tcp://*:{kv_base}",
            "replay_endpoint": f"tcp://*:{kv_base + sizing.replicas}",
        }
        argv += ["--kv-events-config", json.dumps(events)]
    return argv


async def start_sim_pool(
    name: str,
    sizing: SimSizing,
    time_scale: float,
    seed: int,
    log_path: Path,
    *,
    kv_events: bool = False,
) -> tuple[ManagedProcess, SimPool]:
    """``inferoute sim`` with ``sizing.replicas`` replicas on a block of ports it is seen to hold (HTTP, then
    with ``kv_events`` each replica's KV-event publish and replay ports)."""
    n = sizing.replicas

    def pool(ports: list[int]) -> SimPool:
        return SimPool(ports[0], n, ports[n] if kv_events else None)

    proc, ports = await start_on_ports(
        lambda ports: ManagedProcess(
            name, sim_argv(sizing, ports[0], time_scale, seed, pool(ports).kv_base), log_path
        ),
        lambda ports: [f"{u}/health" for u in pool(ports).urls],
        ports=3 * n if kv_events else n,
        consecutive=True,
    )
    return proc, pool(ports)


async def start_router(
    contender: Contender,
    name: str,
    workers: Sequence[str],
    workdir: Path,
    log_path: Path,
    labels: Sequence[Mapping[str, str]] = (),
    time_scale: float = 1.0,
    instance: int = 0,
    sync_redis: str | None = None,
) -> tuple[ManagedProcess, str]:
    """A contender's router in front of ``workers`` on a port it is seen to hold; returns it and its URL.
    ``time_scale``: the pool's (our picker's metric scrapes slow down with the simulated engines);
    ``instance``: which of several replicas of the router this is (its own configuration file)."""
    proc, ports = await start_on_ports(
        lambda ports: ManagedProcess(
            name,
            contender.argv(
                ports[0],
                workers,
                workdir,
                labels,
                metrics_port=ports[1],
                time_scale=time_scale,
                instance=instance,
                sync_redis=sync_redis,
            ),
            log_path,
        ),
        lambda ports: contender.ready_urls(ports[0]),
        ports=2,  # the Rust routers' Prometheus port as well
        owned=1,
    )
    return proc, f"http://127.0.0.1:{ports[0]}"


@dataclass(frozen=True, slots=True)
class Contender:
    """One router configuration under test."""

    name: str
    kind: str
    """``inferoute``, ``vllm-router`` or ``sglang-router``."""
    policy: str
    """The inferoute picker profile or the peer's ``--policy``."""

    @property
    def is_ours(self) -> bool:
        return self.kind == "inferoute"

    def argv(
        self,
        port: int,
        workers: Sequence[str],
        workdir: Path,
        labels: Sequence[Mapping[str, str]] = (),
        metrics_port: int = 0,
        time_scale: float = 1.0,
        instance: int = 0,
        sync_redis: str | None = None,
    ) -> list[str]:
        """The router on ``port`` in front of ``workers``; the Rust routers also serve Prometheus metrics
        on ``metrics_port`` (they need one). ``time_scale``: see :func:`gateway_config`; ``instance``: the
        replica number when several run side by side (our gateway's configuration file is per replica);
        ``sync_redis``: our replicas share in-flight load and placements through this Redis."""
        if self.kind == "inferoute":
            suffix = f"-{instance}" if instance else ""
            config = workdir / f"gateway-{self.policy}{suffix}.yaml"
            gw = gateway_config(port, workers, profile_path(self.policy), labels, time_scale, sync_redis)
            config.write_text(yaml.safe_dump(gw))
            return inferoute_argv("--log-level", "WARNING", "gateway", "--config", str(config))
        if self.kind == "vllm-router":
            exe = shutil.which("vllm-router", path=str(Path(sys.executable).parent)) or "vllm-router"
            return [
                exe,
                *_rust_router_args(port, workers, self.policy, metrics_port),
                "--log-level",
                "warning",
            ]
        if self.kind == "sglang-router":
            return [
                sys.executable,
                "-m",
                "sglang_router.launch_router",
                *_rust_router_args(port, workers, self.policy, metrics_port),
                "--log-level",
                "warn",
            ]
        raise ValueError(f"unknown contender kind {self.kind!r}")

    def ready_urls(self, port: int) -> list[str]:
        return (
            [f"http://127.0.0.1:{port}/health"] if not self.is_ours else [f"http://127.0.0.1:{port}/readyz"]
        )


def _rust_router_args(port: int, workers: Sequence[str], policy: str, metrics_port: int) -> list[str]:
    return [
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--worker-urls",
        *workers,
        "--policy",
        policy,
        "--prometheus-host",
        "127.0.0.1",
        "--prometheus-port",
        str(metrics_port),
        "--worker-startup-timeout-secs",
        "30",
        "--request-timeout-secs",
        "600",
        # Measure routing, not resilience: no retries that would resend a request to another worker.
        "--disable-retries",
    ]


def profile_path(profile: str) -> Path:
    """The shipped EndpointPickerConfig file of an inferoute picker profile (fails loudly if missing)."""
    for base in PROFILE_DIRS:
        for suffix in (".yaml", ".yml"):
            candidate = base / f"{profile}{suffix}"
            if candidate.is_file():
                return candidate
    raise InferouteError(
        500,
        f"picker profile {profile!r} not found under {', '.join(str(d) for d in PROFILE_DIRS)}",
        cause="bench-config",
    )


def gateway_config(
    port: int,
    workers: Sequence[str],
    profile_file: Path,
    labels: Sequence[Mapping[str, str]] = (),
    time_scale: float = 1.0,
    sync_redis: str | None = None,
) -> dict[str, object]:
    """The ``inferoute gateway`` YAML for one contender: embedded picker, BBR on, no access log; ``labels``
    (per worker) e.g. point the picker at the workers' KV events. With simulated engines ``time_scale``
    times slower, the picker scrapes their metrics ``time_scale`` times less often (and stale metrics
    take as much longer), so a scrape is as fresh, in engine steps, as the default 50 ms at H100 speed:
    a slower pool must not hand the metric-driven scorers a fresher view than a real one would. With
    ``sync_redis`` the picker shares in-flight load and placements through it, exchanging ``time_scale``
    times less often than the default 200 ms for the same reason."""
    endpoints = []
    for i, url in enumerate(workers):
        hostport = url.split("://", 1)[-1].rstrip("/")
        host, _, p = hostport.rpartition(":")
        ep: dict[str, object] = {"name": f"sim-{i}", "address": host, "port": int(p)}
        if i < len(labels) and labels[i]:
            ep["labels"] = dict(labels[i])
        endpoints.append(ep)
    picker: dict[str, object] = {
        "config_file": str(profile_file),
        "refresh_interval": PickerConfig().refresh_interval * time_scale,
        "staleness_threshold": PickerConfig().staleness_threshold * time_scale,
    }
    if sync_redis is not None:
        picker["sync_redis"] = sync_redis
        picker["sync_interval"] = PickerConfig().sync_interval * time_scale
    return {
        "listen": f"127.0.0.1:{port}",
        "access_log": False,
        "pool": {"endpoints": endpoints},
        "picker": picker,
        "routes": [{"path": "/", "epp": {"endpoint": "embedded"}}],
    }


INFEROUTE_PROFILES = ("round-robin", "random", "gie-default", "predicted-ttft", "precise")
PEER_POLICIES = ("round_robin", "power_of_two", "cache_aware")


EXTRA_PROFILES = ("flow-control", "objectives", "precise-local")
"""Benchmark-only inferoute profiles (the overload workload's); chosen only when named."""


def extra_contenders() -> list[Contender]:
    return [Contender(f"inferoute/{p}", "inferoute", p) for p in EXTRA_PROFILES]


def all_contenders() -> list[Contender]:
    out = [Contender(f"inferoute/{p}", "inferoute", p) for p in INFEROUTE_PROFILES]
    for kind in ("vllm-router", "sglang-router"):
        out += [Contender(f"{kind}/{p}", kind, p) for p in PEER_POLICIES]
    return out


def select_contenders(spec: str | None) -> list[Contender]:
    """Contenders by comma-separated names or prefixes (``inferoute``, ``vllm-router/cache_aware``);
    everyone if ``spec`` is empty."""
    everyone = all_contenders()
    if not spec:
        return everyone
    chosen: list[Contender] = []
    for token in (t.strip() for t in spec.split(",") if t.strip()):
        matches = [c for c in everyone if c.name == token or c.name.startswith(token + "/")]
        matches = matches or [c for c in extra_contenders() if c.name == token]
        if not matches:
            raise InferouteError(
                400,
                f"unknown contender {token!r}; known: {', '.join(c.name for c in everyone)}",
                cause="bench-config",
            )
        chosen += [c for c in matches if c not in chosen]
    return chosen


BASELINE = "inferoute/round-robin"
"""The Kubernetes-Service-like baseline (round-robin) that targets are measured against."""

__all__ = [
    "BASELINE",
    "BLOCK_SIZE",
    "Contender",
    "ManagedProcess",
    "SimPool",
    "all_contenders",
    "candidate_ports",
    "gateway_config",
    "listening_ports",
    "owns_ports",
    "select_contenders",
    "sim_argv",
    "start_on_ports",
    "start_router",
    "start_sim_pool",
]
