"""The load generators of ``inferoute bench picker`` against real servers: the pipelined HTTP/2 client
completes whole ext_proc lifecycles on the picker's server, and the open-loop client measures the time
beyond the backend's delay."""

from __future__ import annotations

import os
import statistics

from prometheus_client import CollectorRegistry

from inferoute.bench import picker as bench
from inferoute.epp.serving.server import EppServer, ServerOptions
from inferoute.extproc.testing import RecordingPicker


async def test_pipelined_client_completes_lifecycles_on_the_h2_server() -> None:
    picker = RecordingPicker(["10.0.0.1:8000"])
    opts = ServerOptions(host="127.0.0.1", grpc_port=0, health_port=None, insecure=True)
    server = await EppServer.start(picker, opts, CollectorRegistry())
    try:
        res = await bench._pipelined_load(server.grpc_port, os.getpid(), "trivial", 8, 0.5, 4096)
        assert res.decisions > 0 and res.errors == 0
        # every picked request got its response phase: the sessions finished, none aborted
        done = [s for s in picker.sessions if s.ended.is_set()]
        assert done and all(s.finished and s.aborted is None for s in done)
        assert {s.served for s in done} == {"127.0.0.1:1"}
    finally:
        await server.aclose(0)


async def test_open_loop_reports_time_beyond_the_backend_delay() -> None:
    async with bench._child("backend", "--port", "0") as backend:
        url = f"http://127.0.0.1:{backend.port}/v1/completions"
        over, errors, elapsed = await bench._open_loop(url, 4096, 40.0, 1.0, 100)
    assert errors == 0 and 20 <= len(over) <= 80  # Poisson at 40/s for 1 s
    # the 100 ms delay is taken out, not in: values sit near 0 (libuv timers may fire up to ~1 ms early, and a
    # busy machine can delay a few answers)
    assert min(over) > -2 and statistics.median(over) < 50
    assert elapsed >= 1.0
