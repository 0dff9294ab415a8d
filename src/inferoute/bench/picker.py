"""``inferoute bench picker``: what the ext_proc picker costs.

Three measurements, each with the picker server in its own process (``python -m inferoute.bench.picker
serve``), on each gRPC transport (``--transports h2,grpcio``: inferoute's HTTP/2 server and grpc.aio). With
``--pin`` (default) the picker runs alone on the first CPU and everything else (load generator, Envoy, wrk,
backends) on the others, so "per core" is literal.

1. **decisions/s** -- a load process drives full ext_proc lifecycles over one gRPC channel with many
   concurrent streams, as Envoy would (request headers, a 4 KB JSON body, the held decision + echoed body,
   response headers, response end). Reported per wall second and per CPU second of the picker process (read
   from ``/proc``), the latter being "decisions per second on one core" even when other work shares the CPUs.
2. **through Envoy** -- ``wrk`` → Envoy (1 worker) → picker → a trivial backend, 4 KB POSTs: end-to-end
   requests/s of the whole Envoy + Python picker stack.
3. **added latency** -- 200 KB prompts through Envoy with the picker vs Envoy routing directly to the same
   backends; p50/p99 from ``wrk --latency``: 1 connection, then 50 connections with backends answering at
   once (a saturation test: the closed loop runs as fast as the slowest stage) and after a mean delay
   (``--backend-delays``, each answer 0.5-1.5x the mean) standing in for a model server's prefill time.

Pickers: ``floor`` (the transport alone: prebuilt replies, no picker -- the cost no ext_proc server on that
transport can go below), ``trivial`` (round robin, :class:`~inferoute.extproc.testing.RecordingPicker`) and
``embedded`` (the real :class:`~inferoute.epp.assembly.EmbeddedPicker`, GIE default profile: queue + KV +
prefix scorers, scraping the backends' /metrics).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from inferoute.cliparams import choice_list, int_list, out_file
from inferoute.epp.serving.h2server import frame_header, literal_header

DELAY_HEADER = "x-bench-delay-ms"
"""The trivial backend answers after this many milliseconds (set by the open-loop client)."""

VLLM_ZERO_METRICS = (
    '# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{model_name="m"} 0\n'
    '# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name="m"} 0\n'
    '# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{model_name="m"} 0.0\n'
)


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _body(size: int) -> bytes:
    head = b'{"model":"m","max_tokens":8,"prompt":"'
    tail = b'"}'
    return head + b"a" * max(0, size - len(head) - len(tail)) + tail


# ----------------------------------------------------------------------------------------- child processes


async def _ready_until_sigterm(port: int) -> None:
    """Child processes: tell the parent we are up and on which port (they bind port 0), then serve until
    SIGTERM."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print(f"READY {port}", flush=True)
    await stop.wait()


async def _serve_picker(port: int, picker_kind: str, endpoints: list[str], transport: str = "h2") -> None:
    """Child: the ext_proc server with the chosen picker and transport, plain text, until SIGTERM."""
    from prometheus_client import CollectorRegistry

    from inferoute.endpoints import Endpoint
    from inferoute.epp.serving.server import EppServer, ServerOptions
    from inferoute.extproc.testing import RecordingPicker

    if picker_kind == "floor":
        await _serve_floor(port, endpoints[0], transport)
        return
    picker: Any
    if picker_kind == "trivial":
        picker = RecordingPicker(endpoints, record=False)
    else:
        from inferoute.epp.assembly import EppOptions, start_picker

        eps = [Endpoint(e, e.split(":")[0], int(e.split(":")[1])) for e in endpoints]
        picker = await start_picker(EppOptions(endpoints=eps, seed=1))
        for _ in range(200):
            if picker.ready():
                break
            await asyncio.sleep(0.05)
        if not picker.ready():
            await picker.aclose()
            raise SystemExit("the embedded picker did not become ready within 10 s (backends not scraped)")
    server = await EppServer.start(
        picker,
        ServerOptions(host="127.0.0.1", grpc_port=port, health_port=None, insecure=True, transport=transport),
        CollectorRegistry(),
    )
    from inferoute.malloc import freeze_startup_objects

    freeze_startup_objects()  # as `inferoute epp` does
    await _ready_until_sigterm(server.grpc_port)
    await server.aclose(0)
    await picker.aclose()


async def _serve_floor(port: int, endpoint: str, transport: str) -> None:
    """Child: the gRPC floor -- a minimal servicer answering the same messages with prebuilt replies (no
    picker, no metrics, no parsing): what the gRPC transport itself costs for one ext_proc lifecycle."""
    from inferoute.extproc import messages as m

    decision = m.headers_response(destination=(endpoint,), content_length=0)
    resp_headers = m.headers_response("response_headers")
    resp_body = m.body_response("response_body")

    def replies(req: Any) -> tuple[Any, ...]:
        phase = req.WhichOneof("request")
        if phase == "request_body" and req.request_body.end_of_stream:
            return (decision, next(m.body_chunks(req.request_body.body)))
        if phase == "response_headers":
            return (resp_headers,)
        if phase == "response_body":
            return (resp_body,)
        return ()

    if transport == "h2":
        await _serve_h2_floor(port, replies)
    else:
        await _serve_grpcio_floor(port, replies)


async def _serve_grpcio_floor(port: int, replies: Callable[[Any], tuple[Any, ...]]) -> None:
    import grpc
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc

    class Floor(ext_grpc.ExternalProcessorServicer):  # type: ignore[misc]
        async def Process(self, it: Any, context: Any) -> AsyncIterator[Any]:
            async for req in it:
                for reply in replies(req):
                    yield reply

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    ext_grpc.add_ExternalProcessorServicer_to_server(Floor(), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await _ready_until_sigterm(bound)
    await server.stop(0)


async def _serve_h2_floor(port: int, replies: Callable[[Any], tuple[Any, ...]]) -> None:
    from inferoute.epp.serving import h2server as h2s
    from inferoute.extproc import messages as m

    class Floor:
        def __init__(self, _writer: Any) -> None:
            self.feed = replies

        async def resume(self) -> Any:
            return ()

        def end_of_input(self) -> Any:
            return ()

        def close(self, cancelled: bool) -> None:
            return None

    server = h2s.GrpcServer({EXT_PROC_PATH.decode(): h2s.Method(m.ProcessingRequest, Floor)})
    await _ready_until_sigterm(await server.start("127.0.0.1", port))
    await server.stop(0)


async def _serve_backend(port: int) -> None:
    """Child: a trivial model server (small JSON answer, zero-load vLLM metrics) until SIGTERM."""
    from aiohttp import web

    answer = json.dumps({"id": "cmpl-1", "object": "text_completion", "choices": [{"text": "ok"}]}).encode()

    async def completion(request: web.Request) -> web.Response:
        with contextlib.suppress(ConnectionResetError):  # wrk drops its connections when it stops
            await request.read()
        delay = request.headers.get(DELAY_HEADER)
        if delay:  # a model server's time to answer (the prefill of a long prompt)
            await asyncio.sleep(float(delay) / 1000)
        return web.Response(body=answer, content_type="application/json")

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=VLLM_ZERO_METRICS)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_get("/metrics", metrics)
    app.router.add_route("*", "/{tail:.*}", completion)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await _ready_until_sigterm(runner.addresses[0][1])
    await runner.cleanup()


@dataclass(frozen=True, slots=True)
class Child:
    """A child server process and the port it bound."""

    proc: asyncio.subprocess.Process
    port: int

    @property
    def pid(self) -> int:
        return self.proc.pid


@contextlib.asynccontextmanager
async def _child(*args: str) -> AsyncIterator[Child]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "inferoute.bench.picker", *args, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        if not line.startswith(b"READY "):
            raise RuntimeError(f"child {args} failed to start")
        yield Child(proc, int(line.split()[1]))
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def _serve_child(
    picker: str, endpoints: str, transport: str, cpu: int | None
) -> contextlib.AbstractAsyncContextManager[Child]:
    args = [
        "serve",
        "--port",
        "0",
        "--picker",
        picker,
        "--endpoints",
        endpoints,
        "--transport",
        transport,
    ]
    return _child(*args, *(["--cpu", str(cpu)] if cpu is not None else []))


# ----------------------------------------------------------------------------------------------- 1. gRPC load


@dataclass
class DecisionsResult:
    picker: str
    concurrency: int
    seconds: float
    decisions: int
    errors: int
    server_cpu_seconds: float

    @property
    def per_wall_second(self) -> float:
        return self.decisions / self.seconds

    @property
    def per_cpu_second(self) -> float:
        return self.decisions / self.server_cpu_seconds if self.server_cpu_seconds else 0.0


def _lifecycle(size: int) -> list[Any]:
    """What a proxy sends on one ext_proc stream for a ``size``-byte JSON POST: request headers, body, then
    response headers (served endpoint included) and body."""
    from inferoute.extproc import messages as m

    body = _body(size)
    pairs = [(":method", "POST"), (":path", "/v1/completions"), (":authority", "bench")]
    pairs += [("content-type", "application/json"), ("content-length", str(len(body)))]
    status = [(":status", "200"), ("content-type", "application/json")]
    return [
        m.headers_request(pairs, end_of_stream=False),
        m.body_chunk_request(body, end_of_stream=True),
        m.headers_request(status, end_of_stream=False, phase="response_headers", served="127.0.0.1:1"),
        m.body_chunk_request(b'{"choices":[]}', end_of_stream=True, phase="response_body"),
    ]


class _PipelinedLoad(asyncio.Protocol):
    """A lean HTTP/2 gRPC client for decisions/s: ``streams`` ext_proc calls in flight on one connection,
    each sending the whole lifecycle at once (request headers, body, then -- as a proxy would after the
    decision -- response headers and body, then end of stream), built from precomputed bytes. The server
    still answers message by message (later messages of a call wait for its decision), so the work per
    call is Envoy's; the client itself costs a fraction of what ``grpc.aio`` does, so one picker core can be
    saturated from one other core."""

    def __init__(self, messages: list[bytes], streams: int) -> None:
        block = b"\x83\x86" + b"".join(  # :method POST, :scheme http (static table), then literals
            literal_header(name, value)
            for name, value in (
                (b":path", EXT_PROC_PATH),
                (b":authority", b"bench"),
                (b"content-type", b"application/grpc"),
                (b"te", b"trailers"),
            )
        )
        payload = b"".join(b"\x00" + len(msg).to_bytes(4, "big") + msg for msg in messages)
        self._headers, self._payload = block, payload
        self._streams = streams
        self._next_sid = 1
        self._buf = b""
        self.done = 0
        self.measuring = False
        self.transport: asyncio.Transport | None = None

    @staticmethod
    def _frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
        return frame_header(len(payload), ftype, flags, sid) + payload

    def _start(self, n: int) -> None:
        out = []
        for _ in range(n):
            sid = self._next_sid
            self._next_sid += 2
            out.append(self._frame(1, 0x4, sid, self._headers))  # HEADERS, END_HEADERS
            out.append(self._frame(0, 0x1, sid, self._payload))  # DATA, END_STREAM
        assert self.transport is not None
        self.transport.write(b"".join(out))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        settings = (4).to_bytes(2, "big") + (1 << 30).to_bytes(4, "big")  # INITIAL_WINDOW_SIZE 1 GiB
        preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + self._frame(4, 0, 0, settings)
        preface += self._frame(8, 0, 0, ((1 << 31) - 1 - 65535).to_bytes(4, "big"))  # connection window
        transport.write(preface)  # type: ignore[attr-defined]
        self._start(self._streams)

    def data_received(self, data: bytes) -> None:
        data = self._buf + data if self._buf else data
        pos, end, finished, received = 0, len(data), 0, 0
        replies = []
        while end - pos >= 9:
            length = int.from_bytes(data[pos : pos + 3], "big")
            if end - pos - 9 < length:
                break
            ftype, flags = data[pos + 3], data[pos + 4]
            if ftype == 1 and flags & 0x1:  # HEADERS with END_STREAM: the call's trailers
                finished += 1
            elif ftype == 0:
                received += length
            elif ftype == 4 and not flags & 0x1:
                replies.append(self._frame(4, 0x1, 0, b""))  # SETTINGS ACK
            elif ftype == 6 and not flags & 0x1:
                replies.append(self._frame(6, 0x1, 0, data[pos + 9 : pos + 17]))  # PING ACK
            pos += 9 + length
        self._buf = data[pos:]
        if received:  # keep the connection window open (stream windows are 1 GiB)
            replies.append(self._frame(8, 0, 0, received.to_bytes(4, "big")))
        if replies and self.transport is not None:
            self.transport.write(b"".join(replies))
        if finished:
            if self.measuring:
                self.done += finished
            if self._next_sid < (1 << 31) - 2 * finished:
                self._start(finished)


EXT_PROC_PATH = b"/envoy.service.ext_proc.v3.ExternalProcessor/Process"


async def _pipelined_load(
    port: int, pid: int, picker: str, streams: int, seconds: float, size: int, *, response_phase: bool = True
) -> DecisionsResult:
    msgs = _lifecycle(size)
    if not response_phase:
        msgs = msgs[:2]
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_connection(
        lambda: _PipelinedLoad([x.SerializeToString() for x in msgs], streams), "127.0.0.1", port
    )
    try:
        await asyncio.sleep(1.5)  # warm-up
        proto.measuring = True
        cpu0, t0 = _cpu_seconds(pid), time.perf_counter()
        await asyncio.sleep(seconds)
        elapsed, cpu = time.perf_counter() - t0, _cpu_seconds(pid) - cpu0
        done = proto.done
    finally:
        transport.close()
    label = f"{picker}, pipelined client" + ("" if response_phase else ", request phase only")
    return DecisionsResult(label, streams, elapsed, done, 0, cpu)


async def _grpc_load(
    port: int,
    pid: int,
    picker: str,
    concurrency: int,
    seconds: float,
    size: int,
    *,
    response_phase: bool = True,
) -> DecisionsResult:
    import grpc
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc

    req_headers, req_body, resp_headers, resp_body = _lifecycle(size)
    counts = {"ok": 0, "err": 0}
    measuring = False

    async def worker(stub: Any, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        while loop.time() < deadline:
            call = stub.Process()
            try:
                await call.write(req_headers)
                await call.write(req_body)
                first = await call.read()
                if first.WhichOneof("response") != "request_headers":
                    raise RuntimeError(f"unexpected {first}")
                await call.read()  # the echoed body (one chunk for 4 KB)
                if response_phase:
                    await call.write(resp_headers)
                    await call.read()
                    await call.write(resp_body)
                    await call.read()
                await call.done_writing()
                await call.read()
                if measuring:
                    counts["ok"] += 1
            except Exception:
                if measuring:
                    counts["err"] += 1
                call.cancel()

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = ext_grpc.ExternalProcessorStub(ch)
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(worker(stub, loop.time() + 1.5) for _ in range(concurrency)))  # warm up
        measuring = True
        cpu0, t0 = _cpu_seconds(pid), time.perf_counter()
        await asyncio.gather(*(worker(stub, loop.time() + seconds) for _ in range(concurrency)))
        elapsed, cpu = time.perf_counter() - t0, _cpu_seconds(pid) - cpu0
    label = picker if response_phase else f"{picker} (request phase only)"
    return DecisionsResult(label, concurrency, elapsed, counts["ok"], counts["err"], cpu)


# ------------------------------------------------------------------------------------------- 2./3. via Envoy


@dataclass
class WrkResult:
    label: str
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    envoy_cpu_seconds: float = 0.0
    picker_cpu_seconds: float = 0.0
    connections: int = 0
    delay_ms: int = 0

    @property
    def picker_cpu_ms_per_request(self) -> float:
        return 1000.0 * self.picker_cpu_seconds / self.requests if self.requests else 0.0


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def parse_wrk(label: str, text: str) -> WrkResult:
    """Read requests/s, latency p50/p99 (``--latency``), requests and non-2xx counts from wrk's output."""

    def latency(q: str) -> float:
        hit = re.search(rf"^\s*{q}%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)
        return float(hit.group(1)) * _UNITS[hit.group(2)] if hit else float("nan")

    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    total = re.search(r"(\d+) requests in", text)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    return WrkResult(
        label,
        float(rps.group(1)) if rps else 0.0,
        latency("50.000") if "50.000%" in text else latency("50"),
        latency("99.000") if "99.000%" in text else latency("99"),
        int(total.group(1)) if total else 0,
        int(non2xx.group(1)) if non2xx else 0,
    )


async def _wrk(
    url: str, body_size: int, connections: int, seconds: int, label: str, workdir: str
) -> WrkResult:
    script = Path(workdir) / f"post-{body_size}.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        + 'wrk.body = \'{"model":"m","max_tokens":8,"prompt":"\' .. '
        f'string.rep("a", {max(0, body_size - 50)}) .. \'"}}\'\n'
    )
    proc = await asyncio.create_subprocess_exec(
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--latency",
        "-s",
        str(script),
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return parse_wrk(label, out.decode(errors="replace"))


def _direct_bootstrap(listen: int, admin: int, backend: int) -> dict[str, Any]:
    from inferoute.integrations.envoy import bootstrap

    cfg = bootstrap("127.0.0.1:1", listen, admin_port=admin, listen_address="127.0.0.1", insecure=True)
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.router"]
    hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]["cluster"] = "backend"
    cfg["static_resources"]["clusters"] = [
        {
            "name": "backend",
            "type": "STATIC",
            "connect_timeout": "2s",
            "load_assignment": {
                "cluster_name": "backend",
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": {
                                        "socket_address": {"address": "127.0.0.1", "port_value": backend}
                                    }
                                }
                            }
                        ]
                    }
                ],
            },
        }
    ]
    return cfg


async def _through_envoy(
    picker: str | None,
    backends: list[int],
    body_size: int,
    connections: int,
    seconds: int,
    workdir: str,
    *,
    request_body: str = "full_duplex",
    response_phase: str = "full",
    transport: str = "h2",
    open_loop: tuple[float, int] | None = None,
    cpu: int | None = None,
) -> WrkResult:
    """One path under wrk (``connections``, closed loop) or, with ``open_loop`` = (rate, backend delay ms),
    under Poisson arrivals (then p50/p99 are the time beyond the backend's delay)."""
    from inferoute.integrations.envoy import EnvoyProcess, bootstrap

    label = (
        f"envoy + {picker} picker ({transport}), {request_body.replace('_', '-')}"
        if picker
        else "envoy direct"
    )
    if picker and response_phase != "full":
        label += f", response {response_phase}"
    sub = Path(tempfile.mkdtemp(dir=workdir))
    if picker is None:
        envoy = await EnvoyProcess.start(_direct_bootstrap(0, 0, backends[0]), str(sub))
        try:
            await envoy.wait_ready(30, epp_healthy=False)
            url = f"http://127.0.0.1:{await envoy.listener_port()}/v1/completions"
            await _measure(url, body_size, connections, 2, label, str(sub), open_loop)  # warm-up
            cpu0 = _cpu_seconds(envoy.proc.pid)
            res = await _measure(url, body_size, connections, seconds, label, str(sub), open_loop)
            res.envoy_cpu_seconds = _cpu_seconds(envoy.proc.pid) - cpu0
            return res
        finally:
            await envoy.aclose()
    eps = ",".join(f"127.0.0.1:{p}" for p in backends)
    async with _serve_child(picker, eps, transport, cpu) as server:
        cfg = bootstrap(
            f"127.0.0.1:{server.port}",
            0,
            admin_port=0,
            listen_address="127.0.0.1",
            insecure=True,
            health_check_interval=0.5,
            request_body=request_body,
            response_phase=response_phase,
        )
        envoy = await EnvoyProcess.start(cfg, str(sub))
        try:
            await envoy.wait_ready(30)
            url = f"http://127.0.0.1:{await envoy.listener_port()}/v1/completions"
            await _measure(url, body_size, connections, 2, label, str(sub), open_loop)  # warm-up
            cpu_e, cpu_p = _cpu_seconds(envoy.proc.pid), _cpu_seconds(server.pid)
            res = await _measure(url, body_size, connections, seconds, label, str(sub), open_loop)
            res.envoy_cpu_seconds = _cpu_seconds(envoy.proc.pid) - cpu_e
            res.picker_cpu_seconds = _cpu_seconds(server.pid) - cpu_p
            return res
        finally:
            await envoy.aclose()


async def _measure(
    url: str,
    body_size: int,
    connections: int,
    seconds: int,
    label: str,
    workdir: str,
    open_loop: tuple[float, int] | None,
) -> WrkResult:
    """One run: wrk with ``connections`` (closed loop), or Poisson arrivals with ``open_loop``. The CPU per
    request reported is that of the run (open loop: requests still in flight at its end are waited for)."""
    if open_loop is None:
        return await _wrk(url, body_size, connections, seconds, label, workdir)
    rate, delay_ms = open_loop
    over, errors, elapsed = await _open_loop(url, body_size, rate, seconds, delay_ms)
    from inferoute.bench.stats import percentile

    res = WrkResult(label, len(over) / elapsed, percentile(over, 50), percentile(over, 99), len(over), errors)
    res.delay_ms = delay_ms
    return res


async def _open_loop(
    url: str, body_size: int, rate: float, seconds: float, delay_ms: int, seed: int = 1
) -> tuple[list[float], int, float]:
    """Poisson arrivals at ``rate`` per second for ``seconds``, each a fresh POST on a pooled keep-alive
    connection; returns each request's time beyond ``delay_ms`` (ms), the error count and the elapsed time."""
    import aiohttp

    rng = random.Random(seed)
    body = _body(body_size)
    headers = {"content-type": "application/json", DELAY_HEADER: str(delay_ms)}
    over: list[float] = []
    errors = 0

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        t0 = time.perf_counter()
        try:
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                if resp.status != 200:
                    errors += 1
                    return
        except (aiohttp.ClientError, OSError):
            errors += 1
            return
        over.append((time.perf_counter() - t0) * 1000 - delay_ms)

    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks: list[asyncio.Task[None]] = []
        start = loop.time()
        due = start
        while due < start + seconds:
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            tasks.append(loop.create_task(one(session)))
            due += rng.expovariate(rate)
        await asyncio.gather(*tasks)
        elapsed = loop.time() - start
    return over, errors, elapsed


# ------------------------------------------------------------------------------------------------- report


def render_markdown(
    decisions: list[DecisionsResult],
    throughput: list[WrkResult],
    latency: list[WrkResult],
    *,
    command: str,
    conditions: str,
) -> str:
    lines = ["## Picker (ext_proc)", "", f"Command: `{command}`", "", f"Conditions: {conditions}", ""]
    if decisions:
        lines += [
            "### ext_proc decisions per second (4 KB prompts; load over one gRPC channel)",
            "",
            "Full lifecycle = request headers, body, decision + echoed body, response headers, response end "
            "(what Envoy sends with the generated config). Request phase only = Envoy with response "
            "processing off.",
            "",
            "| picker | concurrent streams | decisions/s (wall) | decisions per picker CPU-second | errors |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {d.picker} | {d.concurrency} | {d.per_wall_second:,.0f} | {d.per_cpu_second:,.0f} "
            f"| {d.errors} |"
            for d in decisions
        ]
        lines.append("")
    if throughput:
        lines += [
            "### Through Envoy (1 worker), 4 KB POSTs, wrk 1 thread",
            "",
            "| path | requests/s | p50 ms | p99 ms | picker CPU ms/request | non-2xx |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {w.label} | {w.requests_per_second:,.0f} | {w.p50_ms:.2f} | {w.p99_ms:.2f} | "
            f"{w.picker_cpu_ms_per_request:.2f} | {w.non_2xx} |"
            for w in throughput
        ]
        lines.append("")
    for connections, delay in sorted({(w.connections, w.delay_ms) for w in latency}):
        rows = [w for w in latency if w.connections == connections and w.delay_ms == delay]
        base = next((w for w in rows if w.label == "envoy direct"), None)
        if delay:
            title = (
                f"### Added latency, 200 KB prompts, open loop: Poisson arrivals, backends answer after "
                f"{delay} ms (~{connections} requests in flight; p50/p99 = time beyond the {delay} ms)"
            )
        else:
            title = f"### Added latency, 200 KB prompts, {connections} concurrent request(s) (closed loop)"
        lines += [
            title,
            "",
            "| path | requests/s | p50 ms | p99 ms | added p50 ms | added p99 ms | picker CPU ms/request "
            "| non-2xx |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for w in rows:
            add50 = w.p50_ms - base.p50_ms if base else float("nan")
            add99 = w.p99_ms - base.p99_ms if base else float("nan")
            lines.append(
                f"| {w.label} | {w.requests_per_second:,.0f} | {w.p50_ms:.2f} | {w.p99_ms:.2f} | "
                f"{add50:+.2f} | {add99:+.2f} | {w.picker_cpu_ms_per_request:.2f} | {w.non_2xx} |"
            )
        lines.append("")
    return "\n".join(lines)


def _pin(pin: bool) -> int | None:
    """With ``pin`` on 2+ CPUs: the picker gets the first CPU; this process and everything it starts (load
    generator, Envoy, wrk, backends) the others, so "per core" is literal and the load never steals the
    picker's CPU. Returns the picker's CPU (None: unpinned)."""
    if not (pin and len(os.sched_getaffinity(0)) >= 2):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, set(cpus[1:]))
    return cpus[0]


async def _decisions_section(
    pickers: list[str], transports: list[str], eps: str, cpu: int | None, opts: Any
) -> list[DecisionsResult]:
    """1. decisions/s of each picker on each transport: pipelined then grpc.aio client, each with and
    without the response phase."""
    out: list[DecisionsResult] = []
    for picker in pickers:
        for transport in transports:
            async with _serve_child(picker, eps, transport, cpu) as server:
                label = f"{picker} ({transport})"
                for phase in (True, False):
                    out.append(
                        await _pipelined_load(
                            server.port,
                            server.pid,
                            label,
                            256,
                            opts.seconds,
                            opts.prompt_bytes,
                            response_phase=phase,
                        )
                    )
                    click.echo(f"decisions/s: {out[-1]}", err=True)
                for phase in (True, False):
                    out.append(
                        await _grpc_load(
                            server.port,
                            server.pid,
                            label,
                            opts.concurrency,
                            opts.seconds,
                            opts.prompt_bytes,
                            response_phase=phase,
                        )
                    )
                    click.echo(f"decisions/s: {out[-1]}", err=True)
    return out


@dataclass(frozen=True, slots=True)
class _EnvoyRig:
    """What the Envoy measurements share."""

    pickers: list[str]
    transports: list[str]
    backend_ports: list[int]
    workdir: str
    cpu: int | None
    opts: Any


async def _throughput_section(rig: _EnvoyRig) -> list[WrkResult]:
    """2. wrk through Envoy: direct, then each picker on each transport and body/response mode."""
    envoy_pickers, transports, opts = rig.pickers, rig.transports, rig.opts
    main_t = transports[0]
    # (picker, transport, request body mode, response phase); None = Envoy direct to one backend
    tput: list[tuple[str | None, str, str, str]] = [(None, main_t, "full_duplex", "full")]
    for p in envoy_pickers:
        tput += [(p, t, "full_duplex", "full") for t in transports]
        tput += [(p, main_t, "buffered", "full"), (p, main_t, "full_duplex", "headers")]
    tput += [(envoy_pickers[0], main_t, "full_duplex", "none")] if envoy_pickers else []
    out = []
    for picker, transport, body_mode, resp_phase in tput:
        out.append(
            await _through_envoy(
                picker,
                rig.backend_ports,
                opts.prompt_bytes,
                16,
                int(opts.seconds),
                rig.workdir,
                request_body=body_mode,
                response_phase=resp_phase,
                transport=transport,
                cpu=rig.cpu,
            )
        )
        click.echo(f"throughput: {out[-1]}", err=True)
    return out


async def _latency_section(rig: _EnvoyRig) -> list[WrkResult]:
    """3. added latency of 200 KB prompts: 1 and 50 connections closed loop, then the open loop."""
    envoy_pickers, transports, opts = rig.pickers, rig.transports, rig.opts
    main_t = transports[0]
    lat: list[tuple[str | None, str, str]] = [(None, main_t, "full_duplex")]
    lat += [(p, t, "full_duplex") for p in envoy_pickers for t in transports]
    lat += [(p, main_t, "buffered") for p in envoy_pickers]
    rate, delay = opts.open_loop
    points: list[tuple[int, tuple[float, int] | None]] = [
        (1, None),
        (50, None),
        (round(rate * delay / 1000), opts.open_loop),
    ]
    out = []
    for connections, open_loop in points:
        for picker, transport, body_mode in lat:
            res = await _through_envoy(
                picker,
                rig.backend_ports,
                200 * 1024,
                connections,
                int(opts.seconds),
                rig.workdir,
                request_body=body_mode,
                transport=transport,
                open_loop=open_loop,
                cpu=rig.cpu,
            )
            res.connections = connections
            out.append(res)
            click.echo(f"latency: {res}", err=True)
    return out


async def _run(opts: argparse.Namespace | Any) -> str:
    workdir = tempfile.mkdtemp(prefix="bench-picker-")
    throughput: list[WrkResult] = []
    latency: list[WrkResult] = []
    pickers = [p for p in opts.pickers.split(",") if p]
    transports = [t for t in opts.transports.split(",") if t]
    envoy_pickers = [p for p in pickers if p != "floor"]  # the floor only answers the load generator
    affinity = os.sched_getaffinity(0)
    cpu = _pin(opts.pin)
    workers_md = ""
    async with contextlib.AsyncExitStack() as stack:
        backend_ports = [
            (await stack.enter_async_context(_child("backend", "--port", "0"))).port for _ in range(3)
        ]
        eps = ",".join(f"127.0.0.1:{p}" for p in backend_ports)
        decisions = await _decisions_section(pickers, transports, eps, cpu, opts)
        if opts.envoy and shutil.which("wrk"):
            rig = _EnvoyRig(envoy_pickers, transports, backend_ports, workdir, cpu, opts)
            throughput = await _throughput_section(rig)
            latency = await _latency_section(rig)
        elif opts.envoy:
            click.echo("wrk not found: skipping the Envoy measurements", err=True)
        if opts.workers:
            from inferoute.bench.picker_workers import run_workers_section

            os.sched_setaffinity(0, affinity)  # the workers get every CPU (they inherit this affinity)
            workers_md = await run_workers_section(
                opts.workers,
                backend_ports,
                Path(workdir),
                opts.seconds,
                opts.prompt_bytes,
                rounds=opts.rounds,
            )
    shutil.rmtree(workdir, ignore_errors=True)
    placement = (
        f"the picker pinned to CPU {cpu}, everything else (load generator, Envoy, wrk, backends) on the other"
        if cpu is not None
        else "picker, load generator, Envoy, wrk and backends sharing the CPUs"
    )
    conditions = (
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end; {placement}; "
        f"Envoy 1 worker, 3 trivial backends, loopback; {opts.seconds:g} s per point after a warm-up."
    )
    text = render_markdown(decisions, throughput, latency, command=opts.command_line, conditions=conditions)
    return text + ("\n" + workers_md if workers_md else "")


def _open_loop_flag(value: str) -> tuple[float, int]:
    """``RATE:DELAY_MS`` -> (rate, delay), both > 0."""
    rate, _, delay = value.partition(":")
    try:
        parsed = (float(rate), int(delay))
    except ValueError:
        parsed = (0.0, 0)
    if not (parsed[0] > 0 and parsed[1] > 0):
        raise click.BadParameter(f"expected RATE:DELAY_MS such as 50:1000 (both > 0), got {value!r}")
    return parsed


@click.command(name="picker")
@click.option(
    "--pickers",
    default="floor,trivial,embedded",
    show_default=True,
    callback=choice_list("floor", "trivial", "embedded"),
    help="Comma list: floor (the transport alone; decisions/s only), trivial, embedded ('' for none).",
)
@click.option(
    "--seconds",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Measured seconds per point.",
)
@click.option(
    "--concurrency",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="Concurrent ext_proc streams.",
)
@click.option(
    "--prompt-bytes",
    default=4096,
    show_default=True,
    type=click.IntRange(min=1),
    help="Request body size for 1 and 2.",
)
@click.option(
    "--transports",
    default="h2,grpcio",
    show_default=True,
    callback=choice_list("h2", "grpcio"),
    help="Comma list of the picker server's gRPC transports: h2 (inferoute's, the default), grpcio.",
)
@click.option(
    "--open-loop",
    default="50:1000",
    show_default=True,
    callback=lambda _c, _p, v: _open_loop_flag(v),
    help="RATE:DELAY_MS of the open-loop 200 KB run: Poisson arrivals at RATE/s, backends answering after "
    "DELAY_MS (a 200 KB prompt, ~50k tokens, takes a second or more to prefill), ~RATE*DELAY in flight.",
)
@click.option(
    "--pin/--no-pin",
    default=True,
    show_default=True,
    help="Pin the picker to one CPU and everything else to the others.",
)
@click.option(
    "--envoy/--no-envoy",
    default=True,
    show_default=True,
    help="Measure through Envoy (throughput and added latency; needs wrk).",
)
@click.option(
    "--workers",
    default="",
    callback=int_list(1, "1,2"),
    help="Comma list of worker counts (e.g. 1,2): 'inferoute epp --workers N' decisions/s and routing "
    "quality with each, in one run.",
)
@click.option(
    "--rounds",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Repeats of the --workers quality points.",
)
@click.option(
    "--out", type=click.Path(dir_okay=False), callback=out_file, help="Write the Markdown section here."
)
def command(
    pickers: str,
    seconds: float,
    concurrency: int,
    prompt_bytes: int,
    transports: str,
    open_loop: tuple[float, int],
    pin: bool,
    envoy: bool,
    workers: list[int],
    rounds: int,
    out: Path | None,
) -> None:
    """ext_proc decisions/s, Envoy + picker throughput, and added latency for 200 KB prompts."""
    import uvloop

    opts = argparse.Namespace(
        transports=transports,
        open_loop=open_loop,
        pin=pin,
        pickers=pickers,
        seconds=seconds,
        concurrency=concurrency,
        prompt_bytes=prompt_bytes,
        envoy=envoy,
        workers=workers,
        rounds=rounds,
        command_line="inferoute bench picker " + " ".join(sys.argv[3:]),
    )
    text = uvloop.run(_run(opts))
    click.echo(text)
    if out:
        Path(out).write_text(text)


def _main(argv: list[str] | None = None) -> None:
    """Child-process entry points: ``serve`` (the picker) and ``backend``."""
    import uvloop

    parser = argparse.ArgumentParser(prog="python -m inferoute.bench.picker")
    sub = parser.add_subparsers(dest="what", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--picker", choices=["floor", "trivial", "embedded"], default="trivial")
    serve.add_argument("--endpoints", required=True, help="comma list of ip:port")
    serve.add_argument("--transport", choices=["h2", "grpcio"], default="h2")
    serve.add_argument("--cpu", type=int, help="pin the picker to this CPU")
    backend = sub.add_parser("backend")
    backend.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    if args.what == "serve":
        if args.cpu is not None:
            os.sched_setaffinity(0, {args.cpu})
        from inferoute.malloc import keep_large_buffers

        keep_large_buffers()  # as `inferoute epp` does
        uvloop.run(_serve_picker(args.port, args.picker, args.endpoints.split(","), args.transport))
    else:
        uvloop.run(_serve_backend(args.port))


if __name__ == "__main__":
    _main()
