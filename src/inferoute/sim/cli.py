"""``inferoute sim``: run N simulated vLLM replicas in this process until Ctrl-C or SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import click

from inferoute.errors import describe_os_error
from inferoute.kvevents.config import KVEventsConfig, parse_kv_events_config
from inferoute.sim.config import DEFAULT_MODEL, SimConfig
from inferoute.sim.server import SimPool

log = logging.getLogger(__name__)


def _adapters(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[str, ...]:
    """``a,b`` -> (a, b); an empty name (``,``, ``a,,b``, a trailing comma) or a repeated one is a mistake."""
    if not value.strip():
        return ()
    names = tuple(a.strip() for a in value.split(","))
    if "" in names:
        raise click.BadParameter(f"an empty adapter name in {value!r}; give names such as sql-lora,chat-lora")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise click.BadParameter(f"{', '.join(repeated)} named twice")
    return names


HASH_SEED_MAX = 4294967295
"""The largest ``PYTHONHASHSEED`` Python accepts."""


def _hash_seed(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    """What Python accepts as ``PYTHONHASHSEED`` (vLLM reads it as the root of its block hashes): ``random``
    or an integer 0..4294967295."""
    if value == "random" or (value.isdigit() and int(value) <= HASH_SEED_MAX):
        return value
    raise click.BadParameter(f"{value!r}: 'random' or an integer 0..{HASH_SEED_MAX} (as PYTHONHASHSEED)")


def _check_combinations(model: str, lora_adapters: tuple[str, ...], seqs: int, batched_tokens: int) -> None:
    """The SimConfig rules that involve two flags, each naming its flag."""
    if not model.strip():
        raise click.BadParameter("must not be empty", param_hint="'--model'")
    if model in lora_adapters:
        raise click.BadParameter(
            f"{model!r} is the base model (--model), not an adapter", param_hint="'--lora-adapters'"
        )
    if batched_tokens < seqs:
        raise click.BadParameter(
            f"{batched_tokens} is below --max-num-seqs {seqs} (vLLM needs at least one token per sequence)",
            param_hint="'--max-num-batched-tokens'",
        )


async def _serve(config: SimConfig, replicas: int, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with await SimPool.start(config, replicas=replicas, host=host, base_port=port) as pool:
            for ep, replica in zip(pool.endpoints, pool.replicas, strict=True):
                log.info("replica %s serving %s on http://%s", ep.name, config.model, ep.key)
                pub = replica.kv_events
                if pub is not None:
                    log.info(
                        "replica %s publishes KV events on %s (replay %s, topic %s)",
                        ep.name,
                        pub.endpoint,
                        pub.replay_endpoint,
                        pub.topic.decode(),
                    )
            # One line on stdout per replica so scripts can find the ports (base port 0 picks free ones).
            click.echo(" ".join(f"{ep.name}={ep.key}" for ep in pool.endpoints), nl=True)
            await stop.wait()
            log.info("shutting down %d replica(s)", replicas)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--replicas", default=1, show_default=True, type=click.IntRange(min=1), help="Number of replicas."
)
@click.option(
    "--port",
    default=8000,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Base port: replicas listen on PORT..PORT+N-1 (0 = free ports, printed on stdout).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Served base model name.")
@click.option(
    "--lora-adapters",
    default="",
    callback=_adapters,
    help="Comma-separated LoRA adapter names, e.g. sql-lora,chat-lora.",
)
@click.option(
    "--max-loras", default=1, show_default=True, type=click.IntRange(min=1), help="Adapters active at once."
)
@click.option(
    "--max-num-seqs",
    default=256,
    show_default=True,
    type=click.IntRange(min=1),
    help="Sequences running at once.",
)
@click.option(
    "--max-num-batched-tokens",
    default=8192,
    show_default=True,
    type=click.IntRange(min=1),
    help="Token budget of one engine step (chunked prefill).",
)
@click.option(
    "--max-waiting",
    default=1000,
    show_default=True,
    type=click.IntRange(min=0),
    help="Waiting-queue length; beyond it requests get 429.",
)
@click.option(
    "--max-model-len",
    default=32768,
    show_default=True,
    type=click.IntRange(min=1),
    help="Context length (prompt + max_tokens).",
)
@click.option(
    "--kv-cache-blocks",
    default=27000,
    show_default=True,
    type=click.IntRange(min=1),
    help="KV-cache blocks (num_gpu_blocks).",
)
@click.option(
    "--block-size", default=16, show_default=True, type=click.IntRange(min=1), help="Tokens per KV block."
)
@click.option(
    "--time-scale",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Multiply every simulated duration (0.1 = ten times faster).",
)
@click.option(
    "--seed", default=0, show_default=True, type=int, help="Seeds output lengths, text and failures."
)
@click.option(
    "--failure-rate",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Probability that a completion request fails with 500 or 503.",
)
@click.option(
    "--mean-output-tokens",
    default=128,
    show_default=True,
    type=click.IntRange(min=1),
    help="Mean output length without ignore_eos.",
)
@click.option("--allow-forced-errors", is_flag=True, help="Honour the x-sim-force-status request header.")
@click.option("--emit-schedule", is_flag=True, help="Add sim_scheduled_at to streamed chunks (benchmarks).")
@click.option(
    "--kv-events-config",
    default=None,
    help="vLLM's KVEventsConfig as JSON, e.g. "
    '\'{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:5557",'
    '"replay_endpoint":"tcp://*:5558"}\'. Replica i publishes on the ports + i (data-parallel rank i).',
)
@click.option(
    "--legacy-kv-events", is_flag=True, help="Encode KV events as vLLM <= 0.23 did (tagged arrays, not maps)."
)
@click.option(
    "--hash-seed",
    envvar="PYTHONHASHSEED",
    default="0",
    show_default=True,
    callback=_hash_seed,
    help="vLLM's PYTHONHASHSEED: the root of the sha256_cbor block-hash chain (KV events).",
)
@click.option(
    "--uvloop/--no-uvloop", default=True, show_default=True, help="Event loop: uvloop or asyncio's."
)
def command(
    replicas: int,
    port: int,
    host: str,
    model: str,
    lora_adapters: tuple[str, ...],
    max_loras: int,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    max_waiting: int,
    max_model_len: int,
    kv_cache_blocks: int,
    block_size: int,
    time_scale: float,
    seed: int,
    failure_rate: float,
    mean_output_tokens: int,
    allow_forced_errors: bool,
    emit_schedule: bool,
    kv_events_config: str | None,
    legacy_kv_events: bool,
    hash_seed: str,
    uvloop: bool,
) -> None:
    """Run REPLICAS simulated vLLM servers (OpenAI API, SSE, /metrics) until Ctrl-C or SIGTERM."""
    _check_combinations(model, lora_adapters, max_num_seqs, max_num_batched_tokens)
    kv_events = KVEventsConfig()
    if kv_events_config is not None:
        try:
            kv_events = parse_kv_events_config(kv_events_config)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--kv-events-config") from exc
    try:
        config = SimConfig(
            model=model,
            lora_adapters=lora_adapters,
            max_loras=max_loras,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_waiting=max_waiting,
            max_model_len=max_model_len,
            kv_cache_blocks=kv_cache_blocks,
            block_size=block_size,
            time_scale=time_scale,
            seed=seed,
            failure_rate=failure_rate,
            mean_output_tokens=mean_output_tokens,
            allow_forced_errors=allow_forced_errors,
            emit_schedule=emit_schedule,
            kv_events=kv_events,
            legacy_kv_events=legacy_kv_events,
            hash_seed=hash_seed,
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    if port and port + replicas - 1 > 65535:
        raise click.BadParameter(f"ports {port}..{port + replicas - 1} exceed 65535", param_hint="--port")
    runner: asyncio.Runner
    if uvloop:
        import uvloop as _uvloop

        runner = asyncio.Runner(loop_factory=_uvloop.new_event_loop)
    else:
        runner = asyncio.Runner()
    with runner, contextlib.suppress(KeyboardInterrupt):
        try:
            runner.run(_serve(config, replicas, host, port))
        except OSError as exc:
            ports = f"{port}..{port + replicas - 1}" if replicas > 1 else str(port)
            raise click.ClickException(
                f"cannot listen on {host} port {ports} (--host/--port): {describe_os_error(exc)}"
            ) from exc
