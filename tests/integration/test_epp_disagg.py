"""Encode/prefill/decode disaggregation in a real ``inferoute epp`` process: the stage headers on the
decision and ``llm_d_epp_disagg_decision_total`` (and its deprecated twin) on its /metrics."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from test_epp_cli import _announced_ports
from test_sched_handlers import EPD, IMAGE, chat

from inferoute.extproc.client import ChannelOptions, GrpcPicker
from inferoute.picking import Destination, PickRequest
from inferoute.sim import SimConfig, SimPool

ROLES = ("encode", "prefill", "decode")
LONG = "a long document that the decode pod has not seen. " * 20  # ~250 tokens: prefilled apart


async def test_disagg_decisions_and_their_metric_from_a_real_epp_process(tmp_path: Path) -> None:
    pool = await SimPool.start(SimConfig(time_scale=0.05), replicas=3, host="127.0.0.1", base_port=0)
    eps = [
        {"name": e.name, "address": e.address, "port": e.port, "labels": {"llm-d.ai/role": role}}
        for e, role in zip(pool.endpoints, ROLES, strict=True)
    ]
    key = {role: e.key for e, role in zip(pool.endpoints, ROLES, strict=True)}
    (tmp_path / "endpoints.yaml").write_text(json.dumps({"endpoints": eps}))
    (tmp_path / "picker.yaml").write_text(EPD)
    log_path = tmp_path / "epp.log"
    log_file = log_path.open("wb")
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "inferoute", "epp", "--insecure-serving", "--host", "127.0.0.1"],
        *["--endpoints", str(tmp_path / "endpoints.yaml"), "--config", str(tmp_path / "picker.yaml")],
        *["--grpc-port", "0", "--health-port", "0", "--metrics-port", "0"],
        stdout=asyncio.subprocess.DEVNULL,
        stderr=log_file,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    client = None
    try:
        grpc_port, _, metrics_port = await _announced_ports(proc, log_path)
        client = GrpcPicker(ChannelOptions(f"127.0.0.1:{grpc_port}", tls=False), timeout_ms=5000)
        model = SimConfig().model
        cases = [  # (body, encoder expected, prefill expected)
            (chat("hi", model=model), False, False),
            (chat("what is this?", IMAGE, model=model), True, False),
            (chat(LONG, model=model), False, True),
            (chat(LONG, IMAGE, model=model), True, True),
        ]
        for body, encoded, prefilled in cases:
            headers = {"host": "x", "x-encoder-hosts-ports": "169.254.169.254:80"}  # a client's is cleared
            for _ in range(100):  # until the picker has scraped the pool
                decision, session = await client.pick(
                    PickRequest("POST", "/v1/chat/completions", headers, body)
                )
                if isinstance(decision, Destination):
                    break
                await asyncio.sleep(0.05)
            assert isinstance(decision, Destination), decision
            assert decision.endpoints[0] == key["decode"]
            sent = decision.set_headers
            assert sent["x-encoder-hosts-ports"] == (key["encode"] if encoded else ""), sent
            assert sent.get("x-prefiller-host-port", "") == (key["prefill"] if prefilled else ""), sent
            session.response_started(decision.endpoints[0], 200, {})
            session.response_finished()
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{metrics_port}/metrics") as r:
            text = await r.text()
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
        }
        handler = {"plugin_name": "disagg-profile-handler", "plugin_type": "disagg-profile-handler"}
        for kind in ("decode-only", "encode-decode", "prefill-decode", "encode-prefill-decode"):
            labels = {"model_name": model, "decision_type": kind}
            ours = ("llm_d_epp_disagg_decision_total", tuple(sorted({**handler, **labels}.items())))
            twin = ("llm_d_inference_scheduler_disagg_decision_total", tuple(sorted(labels.items())))
            assert samples.get(ours) == 1 and samples.get(twin) == 1, (kind, text)
    finally:
        if client is not None:
            await client.aclose()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await pool.aclose()
        log_file.close()
