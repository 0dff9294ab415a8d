"""Cross-check of :mod:`inferoute.bench.loadgen` against an external load generator (GuideLLM).

The same point is measured twice, each time on a fresh simulator pool behind a fresh router: once by
``guidellm run`` (Poisson profile, the plan's prompts as a JSON-lines dataset with ``output_tokens_count`` so
GuideLLM sends ``max_tokens`` with ``ignore_eos``), then by our load generator replaying exactly the requests
GuideLLM sent (its arrival times and prompts, read back from its report). The two must agree within a
tolerance on median and p90 TTFT, mean inter-token latency and output throughput; :func:`compare` is the
pure judgement.

GuideLLM needs a tokenizer directory. None is downloaded: :data:`TOKENIZER_SCRIPT` builds a word-level
Hugging Face tokenizer for the workloads' synthetic vocabulary (every three-letter lowercase word is one
token, exactly as the simulator counts them) with the ``tokenizers``/``transformers`` packages GuideLLM
itself depends on, inside GuideLLM's environment.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from inferoute.bench import scrape
from inferoute.bench.loadgen import run_plan
from inferoute.bench.peers import Contender, ManagedProcess, select_contenders, start_router, start_sim_pool
from inferoute.bench.stats import PointSummary, summarize
from inferoute.bench.workloads import WORKLOADS, PlannedRequest, Workload, get_workload
from inferoute.cliparams import out_dir as out_dir_check

TOKENIZER_SCRIPT = """
import itertools, string, sys
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
words = ["".join(t) for t in itertools.product(string.ascii_lowercase, repeat=3)]
vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[UNK]")
fast.save_pretrained(sys.argv[1])
"""


@dataclass(frozen=True, slots=True)
class Agreement:
    metric: str
    ours: float
    theirs: float
    tolerance: float

    @property
    def relative_difference(self) -> float:
        if self.theirs == 0:
            return math.inf if self.ours else 0.0
        return abs(self.ours - self.theirs) / abs(self.theirs)

    @property
    def agrees(self) -> bool:
        return self.relative_difference <= self.tolerance


def compare(
    ours: Mapping[str, float], theirs: Mapping[str, float], tolerance: float = 0.10
) -> list[Agreement]:
    """Per-metric agreement of two measurements of the same point (pure)."""
    return [Agreement(k, ours[k], theirs[k], tolerance) for k in ours if k in theirs]


def our_metrics(s: PointSummary, itl_mean: float) -> dict[str, float]:
    return {
        "ttft_median_s": s.ttft_p50,
        "ttft_p90_s": s.ttft_p90,
        "itl_mean_ms": itl_mean * 1000,
        "output_tokens_per_s": s.output_tps,
        "requests_per_s": s.request_tps,
    }


def guidellm_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """The comparable figures of the first benchmark in a GuideLLM ``benchmarks.json`` (pure)."""
    bench = report["benchmarks"][0]
    m = bench["metrics"]

    def dist(name: str) -> Mapping[str, Any]:
        d: Mapping[str, Any] = m[name]
        inner: Mapping[str, Any] = d.get("successful", d)
        return inner

    ttft, itl = dist("time_to_first_token_ms"), dist("inter_token_latency_ms")
    return {
        "ttft_median_s": float(ttft["median"]) / 1000,
        "ttft_p90_s": float(ttft["percentiles"]["p90"]) / 1000,
        "itl_mean_ms": float(itl["mean"]),
        "output_tokens_per_s": float(dist("output_tokens_per_second")["mean"]),
        "requests_per_s": float(dist("requests_per_second")["mean"]),
    }


def guidellm_schedule(report: Mapping[str, Any]) -> list[tuple[float, str]]:
    """(arrival offset, prompt) of every request GuideLLM sent, in arrival order (pure)."""
    requests = report["benchmarks"][0]["requests"]
    sent: list[tuple[float, str]] = []
    for kind in ("successful", "incomplete", "errored"):
        for r in requests.get(kind) or []:
            body = json.loads(r["request_args"])["body"]
            sent.append((float(r["info"]["timings"]["targeted_start"]), str(body["prompt"])))
    sent.sort()
    start = sent[0][0] if sent else 0.0
    return [(t - start, prompt) for t, prompt in sent]


def replay_plan(
    schedule: Sequence[tuple[float, str]], plan: Sequence[PlannedRequest]
) -> list[PlannedRequest]:
    """Our requests with GuideLLM's arrival times and prompts (bodies taken from ``plan``) (pure)."""
    by_prompt = {json.loads(p.body)["prompt"]: p for p in plan}
    out: list[PlannedRequest] = []
    for i, (at, prompt) in enumerate(schedule):
        p = by_prompt[prompt]
        out.append(PlannedRequest(i, at, p.path, p.body, p.model, p.max_tokens, p.group, p.prompt_tokens))
    return out


def write_dataset(plan: Sequence[PlannedRequest], path: Path) -> None:
    """The plan's prompts as GuideLLM JSON lines (``prompt``, ``output_tokens_count``)."""
    with path.open("w") as f:
        for p in plan:
            body = json.loads(p.body)
            f.write(json.dumps({"prompt": body["prompt"], "output_tokens_count": p.max_tokens}) + "\n")


def guidellm_argv(
    guidellm: str,
    target: str,
    model: str,
    rate: float,
    duration: float,
    data: Path,
    tokenizer: Path,
    out: Path,
) -> list[str]:
    return [
        guidellm, "run",
        "--backend", f"kind=openai_http,target={target},model={model},request_format=/v1/completions,"
                     "http2=false,timeout=600",
        "--profile", f"kind=poisson,rate={rate}",
        "--constraint", f"kind=max_duration,seconds={duration}",
        "--data", f"kind=json_file,path={data}",
        "--tokenizer", f"kind=huggingface_auto,model={tokenizer}",
        "--seed", "kind=static,value=42",
        "--output", f"kind=json,path={out}",
        "--disable-console-interactive",
    ]  # fmt: skip


async def _with_stack(
    workload: Workload,
    contender: Contender,
    replicas: int,
    time_scale: float,
    seed: int,
    workdir: Path,
    tag: str,
) -> tuple[ManagedProcess, ManagedProcess, str, list[str]]:
    sizing = workload.sizing(replicas)
    sim, pool = await start_sim_pool(
        f"sim[{tag}]", sizing, time_scale, seed, workdir / "logs" / f"{tag}-sim.log"
    )
    try:
        router, url = await start_router(
            contender, f"router[{tag}]", pool.urls, workdir, workdir / "logs" / f"{tag}-router.log"
        )
    except BaseException:
        await sim.stop()
        raise
    return sim, router, url, pool.urls


def prepare(
    guidellm_python: str, workload: Workload, rate: float, duration: float, seed: int, workdir: Path
) -> tuple[list[PlannedRequest], Path, Path]:
    """Write the dataset and build the tokenizer directory; returns (plan, dataset, tokenizer dir)."""
    workdir.mkdir(parents=True, exist_ok=True)
    plan = workload.plan(rate, duration * 3, seed)  # more prompts than GuideLLM will use
    data, tokenizer = workdir / "prompts.jsonl", workdir / "tokenizer"
    write_dataset(plan, data)
    subprocess.run([guidellm_python, "-c", TOKENIZER_SCRIPT, str(tokenizer)], check=True, timeout=300)
    return plan, data, tokenizer


async def run_crosscheck(
    guidellm: str,
    prepared: tuple[list[PlannedRequest], Path, Path],
    workload: Workload,
    contender: Contender,
    rate: float,
    duration: float,
    replicas: int,
    time_scale: float,
    seed: int,
    workdir: Path,
) -> tuple[dict[str, float], dict[str, float]]:
    """Measure one point with GuideLLM, then with our load generator; returns (ours, theirs)."""
    plan, data, tokenizer = prepared
    out = workdir / "guidellm.json"
    sim, router, url, pool = await _with_stack(
        workload, contender, replicas, time_scale, seed, workdir, "guidellm"
    )
    try:
        with (workdir / "guidellm.log").open("wb") as log_file:
            proc = await asyncio.create_subprocess_exec(
                *guidellm_argv(guidellm, url, plan[0].model, rate, duration, data, tokenizer, out),
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
            )
            if await proc.wait() != 0:
                raise click.ClickException(f"guidellm failed ({proc.returncode}); see {workdir}/guidellm.log")
        their_server = await scrape.pool_counters(pool)
    finally:
        await router.stop()
        await sim.stop()
    report = json.loads(out.read_text())
    theirs = guidellm_metrics(report)
    # Same arrivals, same prompts: any difference is the measurement, not the traffic.
    mine = replay_plan(guidellm_schedule(report), plan)
    sim, router, url, pool = await _with_stack(
        workload, contender, replicas, time_scale, seed, workdir, "ours"
    )
    try:
        results = await run_plan(url, mine)
        our_server = await scrape.pool_counters(pool)
    finally:
        await router.stop()
        await sim.stop()
    summary = summarize(contender.name, workload.name, rate, results, 0.0, duration)
    itls = [gap for r in results if r.ok for gap in r.itls]
    ours = our_metrics(summary, sum(itls) / len(itls) if itls else math.nan)
    # The simulator's own mean TTFT in each run tells server-side time from client-side overhead.
    ours["server_ttft_mean_s"] = _server_ttft(our_server)
    theirs["server_ttft_mean_s"] = _server_ttft(their_server)
    return ours, theirs


def _server_ttft(counters: Mapping[str, float]) -> float:
    count = counters.get("server_ttft_count", 0.0)
    return counters.get("server_ttft_sum_s", 0.0) / count if count else math.nan


def markdown(agreements: Sequence[Agreement]) -> str:
    lines = [
        "| metric | inferoute loadgen | GuideLLM | difference | within tolerance |",
        "|---|---|---|---|---|",
    ]
    for a in agreements:
        lines.append(
            f"| {a.metric} | {a.ours:.3f} | {a.theirs:.3f} | {a.relative_difference:.1%} | "
            f"{'yes' if a.agrees else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def _guidellm(value: str) -> str:
    """An executable file with a ``python`` beside it (the tokenizer is built with that interpreter)."""
    path = Path(value)
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise click.BadParameter(f"{value}: not an executable file (the guidellm command of its virtualenv)")
    if not (path.with_name("python").is_file()):
        raise click.BadParameter(f"{value}: no python beside it (give the guidellm in a virtualenv's bin/)")
    return value


@click.command("routing-crosscheck")
@click.option(
    "--guidellm",
    "guidellm",
    required=True,
    callback=lambda _c, _p, v: _guidellm(v),
    help="Path of the guidellm executable in its virtualenv's bin/ (that python builds the tokenizer).",
)
@click.option(
    "--workload",
    default="shared-prefix",
    show_default=True,
    type=click.Choice(sorted(WORKLOADS)),
    help="Workload of the point.",
)
@click.option(
    "--contender",
    default="inferoute/gie-default",
    show_default=True,
    help="Router behind both load generators.",
)
@click.option(
    "--rate",
    type=click.FloatRange(0, min_open=True),
    default=6.0,
    show_default=True,
    help="Offered requests per second.",
)
@click.option(
    "--duration",
    type=click.FloatRange(0, min_open=True),
    default=30.0,
    show_default=True,
    help="Measured seconds per tool.",
)
@click.option(
    "--replicas", type=click.IntRange(min=1), default=4, show_default=True, help="Simulator replicas."
)
@click.option(
    "--time-scale",
    type=click.FloatRange(0, min_open=True),
    default=1.0,
    show_default=True,
    help="Simulator speed (0.1 = ten times faster).",
)
@click.option("--seed", type=int, default=42, show_default=True, help="Seeds the workload and the simulator.")
@click.option(
    "--tolerance",
    type=click.FloatRange(min=0),
    default=0.10,
    show_default=True,
    help="Largest relative difference accepted.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    callback=out_dir_check,
    default=Path("bench-results/crosscheck"),
    show_default=True,
    help="Directory for both tools' results and the comparison.",
)
def command(
    guidellm: str, workload: str, contender: str, rate: float, duration: float, replicas: int,
    time_scale: float, seed: int, tolerance: float, out_dir: Path,
) -> None:  # fmt: skip
    """Measure one routing point with GuideLLM and with inferoute's load generator; compare."""
    [chosen] = select_contenders(contender)[:1]
    python = str(Path(guidellm).with_name("python"))
    wl = get_workload(workload)
    prepared = prepare(python, wl, rate, duration, seed, out_dir)
    ours, theirs = asyncio.run(
        run_crosscheck(guidellm, prepared, wl, chosen, rate, duration, replicas, time_scale, seed, out_dir)
    )
    agreements = compare(ours, theirs, tolerance)
    text = markdown(agreements)
    (out_dir / "crosscheck.md").write_text(text)
    (out_dir / "crosscheck.json").write_text(json.dumps({"ours": ours, "guidellm": theirs}, indent=2) + "\n")
    click.echo(text)
