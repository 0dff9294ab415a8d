"""``inferoute bench``: one lazily imported subcommand per benchmark.

Each entry names the ``module:attribute`` of a click.Command.
"""

from __future__ import annotations

import importlib

import click

BENCHMARKS: dict[str, tuple[str, str]] = {
    "sim": ("inferoute.bench.sim_fidelity:command", "Simulator fidelity: token timing delay vs streams."),
    "picker": (
        "inferoute.bench.picker:command",
        "Picker: scheduling latency, ext_proc decisions/s, big prompts.",
    ),
    "scheduler": ("inferoute.bench.scheduler:command", "Scheduling latency at 10/100/1000 endpoints."),
    "sim-metrics": (
        "inferoute.bench.sim_metrics:command",
        "Simulator /metrics: CPU per scrape, cached vs full.",
    ),
    "gateway": ("inferoute.bench.gateway:command", "Gateway overhead vs direct, NGINX, vllm-router."),
    "nginx": ("inferoute.bench.nginx:command", "NGINX + decider vs NGINX proxy_pass vs gateway."),
    "routing": (
        "inferoute.bench.routing:command",
        "Routing quality: TTFT/throughput per contender and rate.",
    ),
    "routing-crosscheck": ("inferoute.bench.crosscheck:command", "Routing point: loadgen vs GuideLLM."),
}


class BenchGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(BENCHMARKS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = BENCHMARKS.get(cmd_name)
        if target is None:
            return None
        module_name, _, attr = target[0].partition(":")
        command = getattr(importlib.import_module(module_name), attr)
        assert isinstance(command, click.Command)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Benchmarks"):
            formatter.write_dl([(n, h) for n, (_, h) in sorted(BENCHMARKS.items())])


@click.group(cls=BenchGroup)
def command() -> None:
    """Benchmarks; results go to --out and summaries to docs/benchmarks.md."""
