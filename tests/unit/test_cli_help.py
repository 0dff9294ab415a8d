"""Every option of every `inferoute` command explains itself, and the top-level help names every benchmark."""

from __future__ import annotations

import click
from click.testing import CliRunner

from inferoute.bench.cli import BENCHMARKS
from inferoute.cli import SUBCOMMANDS, main


def _commands(group: click.Group, ctx: click.Context, path: str) -> list[tuple[str, click.Command]]:
    out: list[tuple[str, click.Command]] = []
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        assert cmd is not None, name
        if isinstance(cmd, click.Group):
            out += _commands(cmd, ctx, f"{path} {name}")
        else:
            out.append((f"{path} {name}", cmd))
    return out


def test_every_option_has_a_help_text() -> None:
    ctx = click.Context(main)
    missing = [
        f"{path} {'/'.join(p.opts)}"
        for path, cmd in _commands(main, ctx, "inferoute")
        for p in cmd.params
        if isinstance(p, click.Option) and not p.hidden and not p.help
    ]
    assert not missing, missing


def test_top_level_help_lists_every_benchmark() -> None:
    text = CliRunner().invoke(main, ["--help"]).output
    commands = text.split("Commands:", 1)[1]
    names = sorted(SUBCOMMANDS)
    after = names[names.index("bench") + 1]  # the command listed after bench
    bench = " ".join(commands.split(f"\n  {after}", 1)[0].split())  # the bench entry, unwrapped
    for name in BENCHMARKS:
        assert f" {name}," in bench or bench.endswith(f" {name}."), (name, bench)


def test_a_group_without_a_command_prints_its_help() -> None:
    """`inferoute` and `inferoute bench` alone show their help (exit 0), not a one-line error."""
    for args, listed in (([], "gateway"), (["bench"], "scheduler")):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        assert (
            "Usage:" in result.output
            and listed in result.output.split("Commands:" if not args else "Benchmarks:")[1]
        )
