"""The ``inferoute`` command.

Each subcommand lives next to the code it runs (``inferoute/<area>/cli.py`` exposing ``command``) and is
imported only when invoked, so ``inferoute sim`` does not pay for gRPC imports and vice versa.
"""

from __future__ import annotations

import importlib
import logging
import os

import click

# subcommand -> "module:attribute" of a click.Command
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "up": ("inferoute.gateway.cli:up_command", "Run the demo: simulator pool + picker + gateway."),
    "gateway": ("inferoute.gateway.cli:gateway_command", "Run the gateway (data plane)."),
    "epp": ("inferoute.epp.cli:command", "Run the endpoint picker (ext_proc gRPC server)."),
    "sim": ("inferoute.sim.cli:command", "Run vLLM-compatible simulated model servers."),
    "bench": ("inferoute.bench.cli:command", "Benchmarks (sim fidelity, picker, gateway, routing)."),
    "envoy-config": (
        "inferoute.integrations.envoy:command",
        "Print an Envoy bootstrap that uses the picker.",
    ),
    "nginx-config": (
        "inferoute.integrations.nginx:config_command",
        "Print an NGINX config driven by inferoute.",
    ),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = SUBCOMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, _, attr = target[0].partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                raise click.ClickException(f"'{cmd_name}' is not available in this build") from exc
            raise
        command = getattr(module, attr)
        assert isinstance(command, click.Command)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_text) for name, (_, help_text) in sorted(SUBCOMMANDS.items())]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--log-level",
    default=lambda: os.environ.get("INFEROUTE_LOG_LEVEL", "INFO"),
    show_default="INFO",
    help="DEBUG, INFO, WARNING or ERROR.",
)
@click.version_option(package_name="inferoute")
def main(log_level: str) -> None:
    """inferoute: send each LLM request to the model-server replica that will answer it fastest."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
