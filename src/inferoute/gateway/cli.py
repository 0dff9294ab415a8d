"""``inferoute gateway`` and ``inferoute up`` (see :mod:`inferoute.gateway.serve` and :mod:`.up`)."""

from __future__ import annotations

import click

from inferoute.errors import InferouteError, describe_os_error
from inferoute.gateway.config import (
    GatewayConfig,
    check_nginx_mode,
    load_config,
    max_workers,
    parse_listen,
    with_listen,
)


def _listen(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        parse_listen(value)
    except InferouteError as exc:
        raise click.BadParameter(exc.message) from exc
    return value


def _load(path: str, listen: str | None) -> GatewayConfig:
    try:
        return with_listen(load_config(path), listen)
    except InferouteError as exc:
        raise click.ClickException(exc.message) from exc


@click.command("gateway", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="Gateway YAML file (docs/configuration.md).",
)
@click.option("--listen", callback=_listen, help="HOST:PORT, overrides the file's listen.")
@click.option(
    "--workers",
    type=click.IntRange(1, max_workers()),
    default=None,
    help="Worker processes sharing the port (SO_REUSEPORT), at most 4 per CPU; overrides the file's workers.",
)
@click.option(
    "--mode",
    type=click.Choice(["gateway", "nginx"]),
    default="gateway",
    show_default=True,
    help="gateway: proxy requests itself; nginx: decide for stock NGINX (X-Accel-Redirect).",
)
@click.option(
    "--watch-config",
    is_flag=True,
    help="Reload the file's routes, pools and pickers when it changes, without dropping requests in flight "
    "(gateway mode; used with 'inferoute controller').",
)
def gateway_command(
    config_path: str, listen: str | None, workers: int | None, mode: str, watch_config: bool
) -> None:
    """Run the gateway (data plane) from a config file until Ctrl-C / SIGTERM."""
    cfg = _load(config_path, listen)
    if mode == "nginx" and watch_config:
        raise click.UsageError("--watch-config works with --mode gateway only")
    if mode == "nginx":
        try:
            check_nginx_mode(cfg)
        except InferouteError as exc:
            raise click.ClickException(exc.message) from exc
    try:
        if mode == "nginx":
            from inferoute.gateway.nginx_decider.server import run_decider

            status = run_decider(cfg, listen)
        else:
            from inferoute.gateway.serve import run_gateway

            status = run_gateway(cfg, workers, config_path if watch_config else None)
    except OSError as exc:
        where = "--listen" if listen else f"listen in {config_path}"
        raise click.ClickException(
            f"cannot listen on {cfg.listen} ({where}): {describe_os_error(exc)}"
        ) from exc
    raise SystemExit(status)


@click.command("up", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Run this gateway config instead of the embedded demo (no simulator).",
)
@click.option(
    "--listen", callback=_listen, default=None, help="HOST:PORT of the gateway [default: 127.0.0.1:8080]."
)
@click.option(
    "--sim-base-port",
    type=click.IntRange(0, 65535),
    default=8100,
    show_default=True,
    help="First simulator port (replicas on PORT..PORT+3); 0 = free ports.",
)
@click.option(
    "--replicas", type=click.IntRange(min=1), default=4, show_default=True, help="Simulator replicas."
)
@click.option(
    "--time-scale",
    type=click.FloatRange(min=0.0, min_open=True),
    default=1.0,
    show_default=True,
    help="Simulator speed: 0.1 = ten times faster than the modelled GPU.",
)
def up_command(
    config_path: str | None, listen: str | None, sim_base_port: int, replicas: int, time_scale: float
) -> None:
    """Run the demo: simulator pool + embedded picker + gateway, until Ctrl-C."""
    if sim_base_port and sim_base_port + replicas - 1 > 65535:
        raise click.BadParameter(
            f"replicas need ports {sim_base_port}..{sim_base_port + replicas - 1}, past 65535; "
            f"use at most {65536 - replicas} (or 0 for free ports)",
            param_hint="'--sim-base-port'",
        )
    from inferoute.gateway.serve import run_async
    from inferoute.gateway.up import UpOptions, run_up

    opts = UpOptions(
        config=config_path,
        listen=listen,
        sim_base_port=sim_base_port,
        replicas=replicas,
        time_scale=time_scale,
    )

    def echo(text: str) -> None:
        click.echo(text)

    raise SystemExit(run_async(lambda: run_up(opts, echo)))
