"""The ``inferoute`` command.

Each subcommand lives next to the code it runs (``inferoute/<area>/cli.py`` exposing ``command``) and is
imported only when invoked, so ``inferoute sim`` does not pay for gRPC imports and vice versa.

One error path for every subcommand (:meth:`LazyGroup.main`): a user mistake -- a bad flag value, a bad or
missing file, a port out of range or already in use -- ends the command with exit status 1 (2 for usage errors
and :class:`~inferoute.errors.ConfigError`) and ONE line on stderr, ``inferoute SUBCOMMAND: error: ...``,
naming the flag, key or file and what is valid. Subcommands raise :class:`click.ClickException` (or
:class:`~inferoute.errors.InferouteError`, whose HTTP status is never shown here); an unexpected exception
prints its type and message on one line, and its traceback only with ``--log-level DEBUG``.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

import click

from inferoute.errors import ConfigError, InferouteError, describe_os_error

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

# subcommand -> "module:attribute" of a click.Command
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "up": ("inferoute.gateway.cli:up_command", "Run the demo: simulator pool + picker + gateway."),
    "gateway": ("inferoute.gateway.cli:gateway_command", "Run the gateway (data plane)."),
    "epp": ("inferoute.epp.cli:command", "Run the endpoint picker (ext_proc gRPC server)."),
    "controller": (
        "inferoute.controller.cli:command",
        "Run the Gateway API controller (Kubernetes): gateway configurations and status.",
    ),
    "sim": ("inferoute.sim.cli:command", "Run vLLM-compatible simulated model servers."),
    "bench": (
        "inferoute.bench.cli:command",
        "Benchmarks (inferoute bench --help).",
    ),
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
    def main(  # type: ignore[override]
        self, args: Sequence[str] | None = None, prog_name: str | None = None, **extra: Any
    ) -> NoReturn:
        """Run the command; every failure ends in one line on stderr (see the module docstring)."""
        argv = list(sys.argv[1:] if args is None else args)
        name = prog_name or "inferoute"
        try:
            super().main(args=argv, prog_name=name, standalone_mode=False, **extra)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except (click.exceptions.Abort, KeyboardInterrupt):
            sys.exit(130)
        except (
            click.exceptions.NoArgsIsHelpError
        ) as exc:  # `inferoute` (or `inferoute bench`) alone: the help
            click.echo(exc.ctx.get_help() if exc.ctx else exc.format_message())
            sys.exit(0)
        except click.UsageError as exc:
            _fail(exc.ctx.command_path if exc.ctx else name, exc.format_message(), exc.exit_code, hint=True)
        except click.ClickException as exc:
            _fail(_command_path(name, argv), exc.format_message(), exc.exit_code)
        except ConfigError as exc:  # a start-up mistake in a file or option: like a bad flag
            _fail(_command_path(name, argv), exc.message, 2)
        except InferouteError as exc:
            _fail(_command_path(name, argv), exc.message, 1)
        except OSError as exc:
            _fail(_command_path(name, argv), describe_os_error(exc), 1)
        except Exception as exc:  # a bug, not a user mistake: one line unless DEBUG
            _fail(_command_path(name, argv), f"unexpected {type(exc).__name__}: {exc}", 1, bug=True)
        sys.exit(0)

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
        from inferoute.bench.cli import BENCHMARKS  # a dict of names: no benchmark module is imported

        help_texts = {
            **{n: h for n, (_, h) in SUBCOMMANDS.items()},
            "bench": f"Benchmarks: {', '.join(BENCHMARKS)}.",
        }
        rows = sorted(help_texts.items())
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _command_path(prog: str, argv: list[str]) -> str:
    """``inferoute SUBCOMMAND`` for messages (the first argument naming a subcommand)."""
    sub = next((a for a in argv if a in SUBCOMMANDS), None)
    return f"{prog} {sub}" if sub else prog


def _fail(where: str, message: str, status: int, *, hint: bool = False, bug: bool = False) -> NoReturn:
    line = " ".join(message.split())  # one line, whatever the message held
    if hint:
        line += f" (see '{where} --help')"
    if bug:
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            traceback.print_exc()
        else:
            line += " (run with --log-level DEBUG for the traceback)"
    click.echo(f"{where}: error: {line}", err=True)
    sys.exit(status)


def _log_level(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    level = value.upper()
    if level not in LOG_LEVELS:
        raise click.BadParameter(
            f"{value!r} is not a log level; valid: {', '.join(LOG_LEVELS)}",
            param_hint="'--log-level' (or INFEROUTE_LOG_LEVEL)",
        )
    return level


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--log-level",
    default=lambda: os.environ.get("INFEROUTE_LOG_LEVEL", "INFO"),
    show_default="INFO",
    callback=_log_level,
    help="DEBUG, INFO, WARNING or ERROR (also INFEROUTE_LOG_LEVEL). DEBUG shows tracebacks.",
)
@click.version_option(package_name="inferoute")
def main(log_level: str) -> None:
    """inferoute: send each LLM request to the model-server replica that will answer it fastest."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
