"""GuideLLM cross-check: report parsing, replay and the agreement judgement (pure)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from inferoute.bench.crosscheck import (
    compare,
    guidellm_argv,
    guidellm_metrics,
    guidellm_schedule,
    markdown,
    replay_plan,
    write_dataset,
)
from inferoute.bench.workloads import SharedPrefix


def dist(median: float, p90: float, mean: float) -> dict[str, object]:
    return {"successful": {"median": median, "mean": mean, "percentiles": {"p90": p90}}}


def request(start: float, prompt: str) -> dict[str, object]:
    body = {"model": "m", "prompt": prompt, "max_tokens": 4}
    return {"request_args": json.dumps({"body": body}), "info": {"timings": {"targeted_start": start}}}


def report(plan_prompts: list[str]) -> dict[str, object]:
    return {"benchmarks": [{
        "metrics": {
            "time_to_first_token_ms": dist(80.0, 300.0, 100.0),
            "inter_token_latency_ms": dist(10.0, 12.0, 11.0),
            "output_tokens_per_second": dist(0, 0, 250.0),
            "requests_per_second": dist(0, 0, 8.0),
        },
        "requests": {
            "successful": [request(1000.5, plan_prompts[1]), request(1000.0, plan_prompts[0])],
            "incomplete": [request(1002.0, plan_prompts[0])],
            "errored": [],
        },
    }]}  # fmt: skip


def test_guidellm_metrics_and_schedule_are_read_from_its_report() -> None:
    r = report(["a", "b"])
    assert guidellm_metrics(r) == {
        "ttft_median_s": 0.08, "ttft_p90_s": 0.3, "itl_mean_ms": 11.0, "output_tokens_per_s": 250.0,
        "requests_per_s": 8.0,
    }  # fmt: skip
    assert guidellm_schedule(r) == [(0.0, "a"), (0.5, "b"), (2.0, "a")]


def test_replay_uses_guidellm_times_and_our_bodies(tmp_path: Path) -> None:
    plan = SharedPrefix(groups=2, users_per_group=1, system_prompt_len=20, question_len=2).plan(20, 1, seed=1)
    prompts = [json.loads(p.body)["prompt"] for p in plan]
    replay = replay_plan(guidellm_schedule(report(prompts)), plan)
    assert [(p.index, p.at) for p in replay] == [(0, 0.0), (1, 0.5), (2, 2.0)]
    assert replay[0].body == plan[0].body and replay[1].body == plan[1].body

    write_dataset(plan[:2], tmp_path / "d.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert rows == [{"prompt": prompts[0], "output_tokens_count": plan[0].max_tokens},
                    {"prompt": prompts[1], "output_tokens_count": plan[1].max_tokens}]  # fmt: skip


def test_agreement_within_tolerance() -> None:
    got = compare({"a": 1.05, "b": 2.0, "c": 0.0, "only-ours": 1.0}, {"a": 1.0, "b": 1.5, "c": 0.0})
    assert [(a.metric, a.agrees) for a in got] == [("a", True), ("b", False), ("c", True)]
    assert math.isclose(got[1].relative_difference, 1 / 3)
    text = markdown(got)
    assert "| a | 1.050 | 1.000 | 5.0% | yes |" in text and "| NO |" in text


def test_guidellm_command_line(tmp_path: Path) -> None:
    argv = guidellm_argv("guidellm", "http://127.0.0.1:1", "m", 6.0, 30.0, tmp_path / "d", tmp_path / "t",
                         tmp_path / "o.json")  # fmt: skip
    assert argv[:2] == ["guidellm", "run"]
    assert "kind=poisson,rate=6.0" in argv and "kind=max_duration,seconds=30.0" in argv
    backend = argv[argv.index("--backend") + 1]
    assert "target=http://127.0.0.1:1" in backend and "request_format=/v1/completions" in backend
