"""``inferoute up``: the whole system on one machine, in one process.

With no config: a simulator pool (4 vLLM-compatible replicas serving a base model and 2 LoRA adapters), the
embedded picker over it, and the gateway on 127.0.0.1:8080, then a banner with an example ``curl``, the
metrics URL and how to stop. With ``--config`` the gateway runs that file instead (no simulator). Ctrl-C
(SIGINT) or SIGTERM stops everything in order: gateway (drains connections), picker, simulator.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import shlex
from collections.abc import Callable
from dataclasses import dataclass

from inferoute.errors import InferouteError, describe_os_error
from inferoute.gateway.app import RunningGateway, start_gateway
from inferoute.gateway.config import DEFAULT_LISTEN, GatewayConfig, default_config, load_config, with_listen
from inferoute.gateway.serve import stop_gracefully, wait_for_signal
from inferoute.malloc import freeze_startup_objects

log = logging.getLogger(__name__)

DEMO_ADAPTERS = ("sql-lora", "chat-lora")
DEMO_REPLICAS = 4
DEMO_SIM_BASE_PORT = 8100
UP_GRACE = 2.0
"""Seconds the demo gives requests in flight when stopping."""


@dataclass(slots=True)
class UpOptions:
    config: str | None = None
    listen: str | None = None
    sim_base_port: int = DEMO_SIM_BASE_PORT
    """First simulator port (replicas use base..base+3); 0 = free ports."""
    replicas: int = DEMO_REPLICAS
    time_scale: float = 1.0
    """Simulator speed (0.1 = ten times faster than the modelled GPU)."""


def banner(gw: RunningGateway, cfg: GatewayConfig, models: list[str], replicas: list[str]) -> str:
    """The ready message: where to send requests, an example, metrics, how to stop."""
    body = {"model": models[0] if models else "MODEL", "messages": [{"role": "user", "content": "Hello!"}]}
    data = json.dumps(body, separators=(",", ":"))
    curl = f"curl -s {gw.url}/v1/chat/completions -H 'Content-Type: application/json' -d {shlex.quote(data)}"
    adapter = models[1] if len(models) > 1 else body["model"]
    stream_body = {**body, "model": adapter, "stream": True}
    stream_data = json.dumps(stream_body, separators=(",", ":"))
    curl_stream = (
        f"curl -sN {gw.url}/v1/chat/completions -H 'Content-Type: application/json' "
        f"-d {shlex.quote(stream_data)}"
    )
    routes = ", ".join(f"{r.path} -> {r.epp.endpoint if r.epp.enabled else 'static'}" for r in cfg.routes)
    lines = [
        "",
        f"inferoute is up: gateway on {gw.url}",
        f"  routes    {routes or '(none)'}",
    ]
    if replicas:
        lines.append(f"  replicas  {' '.join(replicas)}")
    if models:
        lines.append(f"  models    {', '.join(models)}")
    lines += [
        f"  metrics   {gw.url}{cfg.metrics_path}   health {gw.url}/healthz   ready {gw.url}/readyz",
        "  try it:",
        f"    {curl}",
        "  streaming, token by token"
        + (f", through the LoRA adapter {adapter}:" if adapter != body["model"] else ":"),
        f"    {curl_stream}",
        "  stop: Ctrl-C",
        "",
    ]
    return "\n".join(lines)


async def run_up(opts: UpOptions, echo: Callable[[str], None] = print) -> int:
    """Start, announce, wait for a signal, stop. Returns the exit status; a start-up failure raises
    :class:`InferouteError` (the command prints it as one line)."""
    pool = None
    gw: RunningGateway | None = None
    models: list[str] = []
    replicas: list[str] = []
    try:
        if opts.config:
            cfg = with_listen(load_config(opts.config), opts.listen)
        else:
            from inferoute.sim import DEFAULT_MODEL, SimConfig, SimPool

            sim = SimConfig(
                lora_adapters=DEMO_ADAPTERS, max_loras=len(DEMO_ADAPTERS), time_scale=opts.time_scale
            )
            try:
                pool = await SimPool.start(
                    sim, replicas=opts.replicas, host="127.0.0.1", base_port=opts.sim_base_port
                )
            except OSError as exc:
                raise _bind_error(
                    "the simulator pool", f"127.0.0.1:{opts.sim_base_port}+", exc, "--sim-base-port 0"
                ) from exc
            models = [DEFAULT_MODEL, *DEMO_ADAPTERS]
            replicas = [f"{e.name}={e.key}" for e in pool.endpoints]
            cfg = default_config(pool.endpoints, opts.listen or DEFAULT_LISTEN)
        try:
            gw = await start_gateway(cfg)
        except OSError as exc:
            raise _bind_error("the gateway", cfg.listen, exc, "--listen 127.0.0.1:0") from exc
        await _wait_ready(gw)
        freeze_startup_objects()
        echo(banner(gw, cfg, models, replicas))
        name = await wait_for_signal()
        echo(f"{name}: stopping the gateway, then the picker and the simulators")
        stopping, gw = gw, None
        await stop_gracefully(stopping, UP_GRACE)
        return 0
    finally:
        if gw is not None:
            await gw.aclose(grace=UP_GRACE)
        if pool is not None:
            await pool.aclose()


def _bind_error(what: str, where: str, exc: OSError, hint: str) -> InferouteError:
    reason = "address already in use" if exc.errno == errno.EADDRINUSE else describe_os_error(exc)
    return InferouteError(500, f"cannot start {what} on {where}: {reason} (try {hint})", cause="bind")


async def _wait_ready(gw: RunningGateway, limit_s: float = 10.0) -> None:
    """Poll (bounded) until the embedded picker has scraped the pool once; serve anyway after ``limit_s``."""
    step = 0.05
    for _ in range(int(limit_s / step)):
        if await gw.route_table.ready():
            return
        await asyncio.sleep(step)
    log.warning("the picker is not ready after %.0fs; serving anyway (see /readyz)", limit_s)
