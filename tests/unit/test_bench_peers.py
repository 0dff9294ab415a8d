"""Contender selection and the command lines/configs we launch (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from inferoute.bench.peers import Contender, gateway_config, select_contenders, sim_argv
from inferoute.bench.workloads import MultiLora
from inferoute.errors import InferouteError


def test_select_by_name_or_prefix_keeps_order_and_rejects_unknown() -> None:
    assert [c.name for c in select_contenders("vllm-router/cache_aware,sglang-router")] == [
        "vllm-router/cache_aware",
        "sglang-router/round_robin",
        "sglang-router/power_of_two",
        "sglang-router/cache_aware",
    ]
    assert len(select_contenders(None)) == 11
    assert all(c.is_ours for c in select_contenders("inferoute"))
    with pytest.raises(InferouteError, match="unknown contender"):
        select_contenders("nginx")


def test_peer_command_lines_name_workers_and_policy(tmp_path: Path) -> None:
    workers = ["http://127.0.0.1:9001", "http://127.0.0.1:9002"]
    argv = Contender("sglang-router/cache_aware", "sglang-router", "cache_aware").argv(
        9000, workers, tmp_path
    )
    assert argv[1:3] == ["-m", "sglang_router.launch_router"]
    i = argv.index("--worker-urls")
    assert argv[i + 1 : i + 3] == workers
    assert argv[argv.index("--policy") + 1] == "cache_aware"
    assert argv[argv.index("--port") + 1] == "9000"
    assert "--disable-retries" in argv
    vr = Contender("vllm-router/round_robin", "vllm-router", "round_robin").argv(9000, workers, tmp_path)
    assert vr[0].endswith("vllm-router") and "--prometheus-port" in vr


def test_sim_argv_passes_lora_sizing() -> None:
    sizing = MultiLora(adapters=3, max_loras=1).sizing(2)
    argv = sim_argv(sizing, 7000, 0.5, 9)
    assert argv[argv.index("--lora-adapters") + 1] == "lora-0,lora-1,lora-2"
    assert argv[argv.index("--max-loras") + 1] == "1"
    assert argv[argv.index("--time-scale") + 1] == "0.5"
    assert argv[argv.index("--replicas") + 1] == "2"


def test_gateway_config_lists_the_pool(tmp_path: Path) -> None:
    profile = tmp_path / "p.yaml"
    profile.write_text("kind: EndpointPickerConfig\n")
    cfg = gateway_config(8080, ["http://127.0.0.1:9001", "http://127.0.0.1:9002"], profile)
    assert cfg["listen"] == "127.0.0.1:8080"
    assert cfg["pool"] == {
        "endpoints": [
            {"name": "sim-0", "address": "127.0.0.1", "port": 9001},
            {"name": "sim-1", "address": "127.0.0.1", "port": 9002},
        ]
    }
    assert yaml.safe_load(yaml.safe_dump(cfg))["picker"]["config_file"] == str(profile)
