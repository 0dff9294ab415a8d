"""RemoteBBR (data-plane side) against the GIE-style BBR ext_proc server over real gRPC on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import AsyncIterator

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc
from prometheus_client import CollectorRegistry

from inferoute.epp.requestcontrol.parse import MAX_JSON_DEPTH
from inferoute.epp.serving.server import EppServer, ServerOptions
from inferoute.errors import InferouteError
from inferoute.extproc import messages as m
from inferoute.extproc.bbr_client import RemoteBBR
from inferoute.extproc.bbr_server import BbrServer, start_bbr_server
from inferoute.extproc.channel import ChannelOptions
from inferoute.extproc.testing import RecordingPicker
from inferoute.picking import PickerError

HEADERS = {":path": "/v1/chat/completions", "host": "gw", "content-type": "application/json"}


@pytest.fixture
async def bbr() -> AsyncIterator[BbrServer]:
    server = await start_bbr_server("127.0.0.1", 0)
    try:
        yield server
    finally:
        await server.aclose(0)


@pytest.fixture
async def client(bbr: BbrServer) -> AsyncIterator[RemoteBBR]:
    c = RemoteBBR(ChannelOptions(f"127.0.0.1:{bbr.port}", tls=False), chunk_size=1000, timeout_ms=5000)
    try:
        yield c
    finally:
        await c.aclose()


async def test_model_from_streamed_body(client: RemoteBBR) -> None:
    body = json.dumps({"messages": [{"role": "user", "content": "z" * 50_000}], "model": "llama-3"}).encode()
    assert await client.model_header(HEADERS, body) == "llama-3"  # 51 chunks of 1,000 bytes


@pytest.mark.parametrize(
    ("body", "expected"),
    [(b'{"prompt":"x"}', None), (b'{"model":""}', None), (b'{"model":7}', "7"), (b'{"model":null}', None)],
)
async def test_missing_empty_or_odd_model(client: RemoteBBR, body: bytes, expected: str | None) -> None:
    assert await client.model_header(HEADERS, body) == expected


async def test_invalid_json_is_400_and_bodyless_is_none(client: RemoteBBR) -> None:
    with pytest.raises(InferouteError) as info:
        await client.model_header(HEADERS, b"{not json")
    assert info.value.status == 400 and "parse" in info.value.message
    assert await client.model_header({":path": "/v1/models", ":method": "GET"}, b"") is None


async def test_nesting_deeper_than_the_limit_is_400(client: RemoteBBR) -> None:
    """The BBR server counts nesting before decoding (``MAX_JSON_DEPTH``): at the limit the model is found,
    one level more (and 1,000, which the decoder alone met with RecursionError) is GIE's 400."""

    def nested(depth: int) -> bytes:
        return b'{"model": "m", "x": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"

    assert await client.model_header(HEADERS, nested(MAX_JSON_DEPTH)) == "m"
    for depth in (MAX_JSON_DEPTH + 1, 1000):
        with pytest.raises(InferouteError) as info:
            await client.model_header(HEADERS, nested(depth))
        assert info.value.status == 400 and "parse" in info.value.message


async def test_concurrent_requests_share_the_channel(client: RemoteBBR) -> None:
    bodies = [json.dumps({"model": f"m{i}", "prompt": "p" * 3000}).encode() for i in range(40)]
    got = await asyncio.gather(*(client.model_header(HEADERS, b) for b in bodies))
    assert got == [f"m{i}" for i in range(40)]


async def test_server_streamed_mode_acknowledges_chunks(bbr: BbrServer) -> None:
    """A STREAMED-mode proxy: headers acked at once, chunks acked, the header mutation on the last reply."""
    msgs = [
        m.headers_request(
            [(":path", "/")], end_of_stream=False, config=m.protocol_config(m.STREAMED, m.NONE)
        ),
        m.body_chunk_request(b'{"model":', end_of_stream=False),
        m.body_chunk_request(b'"qwen"}', end_of_stream=True),
    ]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{bbr.port}") as ch:
        call = ext_grpc.ExternalProcessorStub(ch).Process(iter(msgs))
        replies = [r async for r in call]
    assert [r.WhichOneof("response") for r in replies] == ["request_headers", "request_body", "request_body"]
    sets = {
        o.header.key: o.header.raw_value for o in replies[2].request_body.response.header_mutation.set_headers
    }
    assert sets == {"X-Gateway-Model-Name": b"qwen"}


async def test_full_duplex_server_echoes_body_with_content_length(bbr: BbrServer) -> None:
    body = json.dumps({"model": "m", "prompt": "q" * 130_000}).encode()
    msgs = [
        m.headers_request([(":path", "/")], end_of_stream=False),
        m.body_chunk_request(body, end_of_stream=True),
    ]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{bbr.port}") as ch:
        replies = [r async for r in ext_grpc.ExternalProcessorStub(ch).Process(iter(msgs))]
    head = replies[0].request_headers.response
    assert head.clear_route_cache
    sets = {o.header.key: o.header.raw_value for o in head.header_mutation.set_headers}
    assert sets == {"X-Gateway-Model-Name": b"m", "content-length": str(len(body)).encode()}
    echoed = b"".join(r.request_body.response.body_mutation.streamed_response.body for r in replies[1:])
    assert echoed == body and len(replies) == 1 + 3  # 130 KB -> 3 chunks of <= 62,000


async def test_timeout_and_unavailable(refused_port) -> None:  # type: ignore[no-untyped-def]
    slow = await EppServer.start(
        RecordingPicker(["1.1.1.1:1"], delay=3.0),
        ServerOptions(host="127.0.0.1", grpc_port=0, health_port=None, insecure=True),
        CollectorRegistry(),
    )
    c = RemoteBBR(ChannelOptions(f"127.0.0.1:{slow.grpc_port}", tls=False), timeout_ms=300)
    down = RemoteBBR(ChannelOptions(f"127.0.0.1:{refused_port()}", tls=False), timeout_ms=3000)
    try:
        with pytest.raises(PickerError) as info:
            await c.model_header(HEADERS, b'{"model":"m"}')
        assert info.value.timeout
        with pytest.raises(PickerError) as info:
            await down.model_header(HEADERS, b'{"model":"m"}')
        assert info.value.cause == "unavailable" and str(info.value).startswith("BBR ")
    finally:
        await c.aclose()
        await down.aclose()
        await slow.aclose(0)


async def test_bbr_server_runs_as_a_process() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "inferoute.extproc.bbr_server",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    client = None
    try:
        assert proc.stderr is not None
        seen = b""
        while not (found := re.search(rb"listening on 127\.0\.0\.1:(\d+)", seen)):
            line = await asyncio.wait_for(proc.stderr.readline(), 60)
            assert line, seen  # exited before saying where it listens
            seen += line
        client = RemoteBBR(ChannelOptions(f"127.0.0.1:{int(found.group(1))}", tls=False), timeout_ms=2000)
        assert await client.model_header(HEADERS, b'{"model":"from-process"}') == "from-process"
    finally:
        if client is not None:
            await client.aclose()
        proc.terminate()
        await proc.wait()
