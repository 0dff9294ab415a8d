"""``inferoute controller``: run the Gateway API controller (see :mod:`inferoute.controller`)."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
from pathlib import Path

import click

from inferoute.cliparams import pem_certificates, writable_dir
from inferoute.controller.model import CONTROLLER_NAME


def _cidr(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    for v in values:
        try:
            ipaddress.ip_network(v, strict=False)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from exc
    return values


@click.command("controller", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--controller-name",
    default=CONTROLLER_NAME,
    show_default=True,
    callback=lambda _c, _p, v: _controller_name(v),
    help="GatewayClass spec.controllerName this controller serves (and writes into status).",
)
@click.option(
    "--gateway-listen",
    default="0.0.0.0:8080",
    show_default=True,
    callback=lambda _c, _p, v: _listen(v),
    help="listen address written into each gateway configuration (the gateway pods' port).",
)
@click.option(
    "--output-dir",
    type=click.Path(path_type=Path),
    default=None,
    callback=lambda _c, _p, v: writable_dir(v, "--output-dir"),
    help="Also write NAMESPACE.GATEWAY.gateway.yaml files here (created when missing; e.g. a volume shared "
    "with a gateway).",
)
@click.option(
    "--no-configmaps",
    is_flag=True,
    help="Do not write the inferoute-gateway-<name> ConfigMaps (use with --output-dir).",
)
@click.option("--no-status", is_flag=True, help="Do not write status (a second, read-only controller).")
@click.option("--picker-tls", is_flag=True, help="Reach the pools' pickers over TLS (https://).")
@click.option(
    "--picker-ca-file",
    default=None,
    callback=lambda _c, _p, v: pem_certificates(v, "--picker-ca-file"),
    help="CA (PEM) that signed the pickers' certificates (with --picker-tls).",
)
@click.option(
    "--picker-timeout-ms",
    type=click.IntRange(min=1),
    default=2000,
    show_default=True,
    help="Per-request picker timeout written into the gateway configuration.",
)
@click.option(
    "--allowed-cidr",
    "allowed_cidrs",
    multiple=True,
    callback=_cidr,
    help="Destinations any picker may return besides its pool's Ready pods (e.g. the pod CIDR); repeatable.",
)
def command(
    controller_name: str,
    gateway_listen: str,
    output_dir: Path | None,
    no_configmaps: bool,
    no_status: bool,
    picker_tls: bool,
    picker_ca_file: str | None,
    picker_timeout_ms: int,
    allowed_cidrs: tuple[str, ...],
) -> None:
    """Watch Gateways, HTTPRoutes, InferencePools, Services and Pods; write gateway configurations and
    status. Reaches the API server with the pod's service account, else KUBECONFIG / ~/.kube/config."""
    from inferoute.controller.translate import Options

    if no_configmaps and output_dir is None:
        raise click.UsageError("--no-configmaps needs --output-dir (else nothing would be written)")
    if picker_ca_file and not picker_tls:
        raise click.UsageError("--picker-ca-file needs --picker-tls")
    opts = Options(
        controller_name=controller_name,
        listen=gateway_listen,
        picker_tls=picker_tls,
        picker_ca_file=picker_ca_file,
        picker_timeout_ms=picker_timeout_ms,
        allowed_cidrs=allowed_cidrs,
    )
    asyncio.run(_main(opts, output_dir, not no_configmaps, not no_status))


CONTROLLER_NAME_RE = re.compile(
    r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/[A-Za-z0-9/\-._~%!$&'()*+,;=:]+"
)
"""What the Gateway API allows in a GatewayClass's ``spec.controllerName`` (a domain, a slash, a path)."""


def _controller_name(value: str) -> str:
    if len(value) > 253 or not CONTROLLER_NAME_RE.fullmatch(value):
        raise click.BadParameter(
            f"expected DOMAIN/PATH such as {CONTROLLER_NAME} (a GatewayClass's controllerName), got {value!r}"
        )
    return value


def _listen(value: str) -> str:
    from inferoute.errors import ConfigError
    from inferoute.gateway.config import parse_listen

    try:
        parse_listen(value)
    except ConfigError as exc:
        raise click.BadParameter(exc.message) from exc
    return value


async def _main(opts: object, output_dir: Path | None, configmaps: bool, status: bool) -> None:
    import yaml
    from lightkube import AsyncClient, ConfigError

    from inferoute.controller.runtime import ConfigMapSink, ConfigSink, FileSink, run_controller
    from inferoute.controller.translate import Options

    assert isinstance(opts, Options)
    try:
        client = AsyncClient()
    except ConfigError as exc:
        raise click.ClickException(f"no Kubernetes API to talk to: {exc}") from exc
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, OSError, yaml.YAMLError) as exc:
        # a kubeconfig lightkube cannot read: name the file
        where = os.environ.get("KUBECONFIG") or "~/.kube/config"
        if isinstance(exc, UnicodeDecodeError):
            reason = "not UTF-8 text"
        elif isinstance(exc, KeyError | TypeError):
            reason = f"not a kubeconfig (missing or malformed {exc})"
        else:
            reason = str(exc).splitlines()[0]
        raise click.ClickException(f"kubeconfig {where}: cannot be read: {reason}") from exc
    sinks: list[ConfigSink] = []
    if output_dir is not None:
        sinks.append(FileSink(output_dir))
    if configmaps:
        sinks.append(ConfigMapSink(client))
    try:
        await run_controller(opts, client, sinks, write_status=status)
    finally:
        await client.close()
