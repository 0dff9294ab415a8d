"""The EPP's ext_proc server over real gRPC on 127.0.0.1, driven the way Envoy drives it.

Mirrors GIE conformance (reference section 7) without Kubernetes: picks only from the allowed set, ip:port
data-parallel ranks, subset hints, empty subset -> 503, fallback order, served-endpoint round trip, a 20 MB
body echoed intact in full duplex, bodyless requests, BUFFERED mode, health services.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from inferoute.epp.serving.server import EppServer, ServerOptions
from inferoute.errors import InferouteError
from inferoute.extproc import messages as m
from inferoute.extproc.testing import FAIL_HEADER, REJECT_HEADER, SELECTION_HEADER, RecordingPicker
from inferoute.picking import DESTINATION_HEADER, LB_NAMESPACE

PODS = ["10.0.0.1:3000", "10.0.0.2:3000", "10.0.0.3:3000"]
DP_PODS = ["10.0.0.1:3000", "10.0.0.1:3002", "10.0.0.1:3004"]


@pytest.fixture(params=["h2", "grpcio"])
async def epp(
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[EppServer, RecordingPicker, CollectorRegistry]]:
    """The server on each transport: inferoute's h2 server (the default) and grpc.aio."""
    picker = RecordingPicker(PODS + DP_PODS[1:])
    registry = CollectorRegistry()
    opts = ServerOptions(host="127.0.0.1", grpc_port=0, health_port=0, insecure=True, transport=request.param)
    server = await EppServer.start(picker, opts, registry)
    try:
        yield server, picker, registry
    finally:
        await server.aclose(0)


@pytest.fixture
async def stub(
    epp: tuple[EppServer, RecordingPicker, CollectorRegistry],
) -> AsyncIterator[ext_grpc.ExternalProcessorStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{epp[0].grpc_port}") as ch:
        yield ext_grpc.ExternalProcessorStub(ch)


def _req_headers(
    extra: Sequence[tuple[str, str]] = (),
    *,
    eos: bool,
    subset: Sequence[str] | None = None,
    mode: int | None = None,
) -> pb.ProcessingRequest:
    pairs = [
        (":method", "POST" if not eos else "GET"),
        (":path", "/v1/completions"),
        (":authority", "gw"),
        ("x-request-id", "rid-1"),
        *extra,
    ]
    cfg = m.protocol_config(mode, m.FULL_DUPLEX_STREAMED) if mode is not None else None
    return m.headers_request(pairs, end_of_stream=eos, subset=subset, config=cfg)


def _body(n: int = 64) -> bytes:
    prompt = "x" * max(0, n - 60)
    return json.dumps({"model": "m", "prompt": prompt}).encode()


async def _exchange(
    stub: ext_grpc.ExternalProcessorStub, msgs: list[pb.ProcessingRequest], expect: int
) -> list[pb.ProcessingResponse]:
    """Send ``msgs``, read ``expect`` replies, then half-close and read to the end."""
    queue: asyncio.Queue[pb.ProcessingRequest | None] = asyncio.Queue()
    for msg in msgs:
        queue.put_nowait(msg)

    async def it() -> AsyncIterator[pb.ProcessingRequest]:
        while (msg := await queue.get()) is not None:
            yield msg

    call = stub.Process(it())
    out = []
    for _ in range(expect):
        out.append(await asyncio.wait_for(call.read(), 10))
    queue.put_nowait(None)
    assert await asyncio.wait_for(call.read(), 10) is grpc.aio.EOF
    return out


def _destination(resp: pb.ProcessingResponse) -> tuple[str, ...]:
    meta, header, _ = m.destination_from_response(resp)
    assert meta == header, "header and envoy.lb metadata must be identical"
    assert meta is not None
    return meta


async def test_full_duplex_picks_from_pool_and_echoes_body(stub, epp) -> None:  # type: ignore[no-untyped-def]
    body = _body(1000)
    (hdr, echoed) = await _exchange(
        stub, [_req_headers(eos=False), m.body_chunk_request(body, end_of_stream=True)], 2
    )
    common = hdr.request_headers.response
    assert common.clear_route_cache
    dest = _destination(hdr)
    assert len(dest) == 1 and dest[0] in epp[1].endpoints
    sets = {o.header.key: o.header.raw_value.decode() for o in common.header_mutation.set_headers}
    assert sets["content-length"] == str(len(body))
    sr = echoed.request_body.response.body_mutation.streamed_response
    assert sr.body == body and sr.end_of_stream
    rec = epp[1].sessions[-1].request
    assert rec.method == "POST" and rec.path == "/v1/completions" and rec.request_id == "rid-1"
    assert rec.headers["host"] == "gw" and rec.body == body


@pytest.mark.parametrize(
    "allowed", [["10.0.0.2"], ["10.0.0.1", "10.0.0.3"], ["10.0.0.3", "10.0.0.2", "10.0.0.1"]]
)
async def test_routes_only_within_selected_pods(stub, epp, allowed) -> None:  # type: ignore[no-untyped-def]
    hits = set()
    for _ in range(12):
        msgs = [
            _req_headers([(SELECTION_HEADER, ",".join(allowed))], eos=False),
            m.body_chunk_request(_body(), end_of_stream=True),
        ]
        hdr, _ = await _exchange(stub, msgs, 2)
        dest = _destination(hdr)
        ips = [d.split(":")[0] for d in dest]
        assert set(ips) == set(allowed)  # every allowed pod is in the list, nothing else
        order = [allowed.index(ip) for ip in ips]
        assert order == sorted(order)  # fallbacks in the order the picker chose them
        hits.add(dest[0])
    assert {h.split(":")[0] for h in hits} <= set(allowed)


@pytest.mark.parametrize("tokens", [["10.0.0.1:3002"], ["10.0.0.1:3004", "10.0.0.1:3000"]])
async def test_data_parallel_ranks_by_ip_port(stub, tokens) -> None:  # type: ignore[no-untyped-def]
    msgs = [
        _req_headers([(SELECTION_HEADER, ",".join(tokens))], eos=False),
        m.body_chunk_request(_body(), end_of_stream=True),
    ]
    hdr, _ = await _exchange(stub, msgs, 2)
    assert _destination(hdr) == tuple(tokens)  # fallback order is the picker's order, comma-joined


async def test_subset_hint_by_ip_and_ip_port(stub) -> None:  # type: ignore[no-untyped-def]
    for _ in range(6):
        hdr, _ = await _exchange(
            stub,
            [_req_headers(eos=False, subset=["10.0.0.3"]), m.body_chunk_request(_body(), end_of_stream=True)],
            2,
        )
        assert _destination(hdr) == ("10.0.0.3:3000",)
        hdr, _ = await _exchange(
            stub,
            [
                _req_headers(eos=False, subset=["10.0.0.1:3004"]),
                m.body_chunk_request(_body(), end_of_stream=True),
            ],
            2,
        )
        assert _destination(hdr) == ("10.0.0.1:3004",)


@pytest.mark.parametrize("subset", [[], ["192.168.9.9:1"]])
async def test_empty_or_ineligible_subset_is_503(stub, epp, subset) -> None:  # type: ignore[no-untyped-def]
    (resp,) = await _exchange(
        stub, [_req_headers(eos=False, subset=subset), m.body_chunk_request(_body(), end_of_stream=True)], 1
    )
    ir = resp.immediate_response
    assert ir.status.code == 503
    assert json.loads(ir.body)["error"]["type"] == "service_unavailable_error"
    assert epp[1].sessions[-1].aborted == "rejected"


async def test_reject_429_is_immediate_response(stub, epp) -> None:  # type: ignore[no-untyped-def]
    (resp,) = await _exchange(
        stub,
        [
            _req_headers([(REJECT_HEADER, "429")], eos=False),
            m.body_chunk_request(_body(), end_of_stream=True),
        ],
        1,
    )
    assert resp.immediate_response.status.code == 429
    assert json.loads(resp.immediate_response.body)["error"]["code"] == 429
    assert epp[2].get_sample_value("inferoute_extproc_decisions_total", {"outcome": "reject"}) == 1


async def test_picker_exception_is_grpc_error(stub, epp) -> None:  # type: ignore[no-untyped-def]
    call = stub.Process(iter([_req_headers([(FAIL_HEADER, "1")], eos=True)]))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await asyncio.wait_for(call.read(), 10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "test picker asked to fail" in (info.value.details() or "")
    assert epp[2].get_sample_value("inferoute_extproc_errors_total", {"cause": "test-failure"}) == 1


async def test_empty_header_name_is_ignored_not_a_crash(stub, epp, caplog) -> None:  # type: ignore[no-untyped-def]
    """A header with an empty name (hostile or broken proxy) used to raise IndexError (INTERNAL)."""
    (hdr,) = await _exchange(stub, [_req_headers([("", "v"), ("x-ok", "1")], eos=True)], 1)
    assert hdr.WhichOneof("response") == "request_headers"
    assert _destination(hdr)[0] in epp[1].endpoints
    assert epp[1].sessions[-1].request.headers["x-ok"] == "1"
    assert not [r for r in caplog.records if r.exc_info]


async def test_bodyless_request_decided_on_headers(stub, epp) -> None:  # type: ignore[no-untyped-def]
    (hdr,) = await _exchange(stub, [_req_headers(eos=True)], 1)
    assert _destination(hdr)[0] in epp[1].endpoints
    keys = {o.header.key for o in hdr.request_headers.response.header_mutation.set_headers}
    assert "content-length" not in keys
    assert epp[1].sessions[-1].request.method == "GET"


async def test_twenty_megabytes_full_duplex_echoed_intact(stub) -> None:  # type: ignore[no-untyped-def]
    body = bytes(range(256)) * (20 * 1024 * 1024 // 256)
    msgs = [_req_headers(eos=False)]
    step = 1 << 20  # Envoy-sized pieces; the server re-chunks at 62,000
    msgs += [
        m.body_chunk_request(body[i : i + step], end_of_stream=i + step >= len(body))
        for i in range(0, len(body), step)
    ]
    n_chunks = -(-len(body) // m.BODY_CHUNK_SIZE)
    replies = await _exchange(stub, msgs, 1 + n_chunks)
    assert replies[0].WhichOneof("response") == "request_headers"
    pieces = [r.request_body.response.body_mutation.streamed_response for r in replies[1:]]
    assert max(len(p.body) for p in pieces) == m.BODY_CHUNK_SIZE
    assert [p.end_of_stream for p in pieces].count(True) == 1 and pieces[-1].end_of_stream
    assert b"".join(p.body for p in pieces) == body


async def test_buffered_mode_decision_on_body_reply(stub, epp) -> None:  # type: ignore[no-untyped-def]
    body = _body(5 * 1024 * 1024)  # over grpc's 4 MiB default: the server raised its limit
    msgs = [_req_headers(eos=False, mode=m.BUFFERED), m.body_chunk_request(body, end_of_stream=True)]
    hdr, body_reply = await _exchange(stub, msgs, 2)
    assert hdr.WhichOneof("response") == "request_headers"
    assert not hdr.request_headers.response.header_mutation.set_headers
    assert body_reply.WhichOneof("response") == "request_body"
    assert _destination(body_reply)[0] in epp[1].endpoints
    assert body_reply.request_body.response.clear_route_cache
    assert body_reply.request_body.response.body_mutation.WhichOneof("mutation") is None  # body unchanged
    assert epp[1].sessions[-1].request.body == body


async def test_served_endpoint_and_response_phase_reach_session(stub, epp) -> None:  # type: ignore[no-untyped-def]
    msgs = [
        _req_headers(eos=False),
        m.body_chunk_request(_body(), end_of_stream=True),
        m.headers_request(
            [(":status", "200"), ("content-type", "text/event-stream")],
            end_of_stream=False,
            phase="response_headers",
            served="10.0.0.2:3000",
        ),
        m.body_chunk_request(b"data: 1\n\n", end_of_stream=False, phase="response_body"),
        m.body_chunk_request(b"data: [DONE]\n\n", end_of_stream=True, phase="response_body"),
    ]
    replies = await _exchange(stub, msgs, 5)
    assert [r.WhichOneof("response") for r in replies] == [
        "request_headers",
        "request_body",
        "response_headers",
        "response_body",
        "response_body",
    ]
    echoed = [r.response_body.response.body_mutation.streamed_response for r in replies[3:]]
    assert [e.body for e in echoed] == [b"data: 1\n\n", b"data: [DONE]\n\n"] and echoed[1].end_of_stream
    log = epp[1].sessions[-1]
    assert log.served == "10.0.0.2:3000" and log.status == 200
    assert log.chunks == [b"data: 1\n\n", b"data: [DONE]\n\n"] and log.finished and log.aborted is None


async def test_cancelled_stream_aborts_session(stub, epp) -> None:  # type: ignore[no-untyped-def]
    queue: asyncio.Queue[pb.ProcessingRequest] = asyncio.Queue()
    queue.put_nowait(_req_headers(eos=False))
    queue.put_nowait(m.body_chunk_request(_body(), end_of_stream=True))

    async def it() -> AsyncIterator[pb.ProcessingRequest]:
        while True:
            yield await queue.get()

    call = stub.Process(it())
    await asyncio.wait_for(call.read(), 10)
    log = epp[1].sessions[-1]
    call.cancel()
    await asyncio.wait_for(log.ended.wait(), 10)
    # h2 sees the RST_STREAM. grpc.aio reports a cancellation only when it reaches the handler before the
    # request iterator ends; otherwise it looks like a half-close (random order, seed 1001: the former).
    # Either way the session is aborted, never finished.
    cancelled = (
        {"stream-cancelled"} if epp[0].transport == "h2" else {"stream-cancelled", "stream-ended-early"}
    )
    assert log.aborted in cancelled and not log.finished


async def test_metadata_namespace_is_envoy_lb(stub) -> None:  # type: ignore[no-untyped-def]
    (hdr,) = await _exchange(stub, [_req_headers(eos=True)], 1)
    assert list(hdr.dynamic_metadata.fields) == [LB_NAMESPACE]
    assert list(hdr.dynamic_metadata.fields[LB_NAMESPACE].struct_value.fields) == [DESTINATION_HEADER]


async def test_health_services_on_both_ports(epp) -> None:  # type: ignore[no-untyped-def]
    server, picker, _ = epp
    for port in (server.grpc_port, server.health_port):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            h = health_pb2_grpc.HealthStub(ch)

            async def status(name: str, h: health_pb2_grpc.HealthStub = h) -> int:
                return (await h.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)).status

            picker.is_ready = True
            for name in ("", "liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor"):
                assert await status(name) == health_pb2.HealthCheckResponse.SERVING, name
            picker.is_ready = False
            assert await status("liveness") == health_pb2.HealthCheckResponse.SERVING
            for name in ("", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor"):
                assert await status(name) == health_pb2.HealthCheckResponse.NOT_SERVING, name
            with pytest.raises(grpc.aio.AioRpcError) as info:  # the gRPC health protocol: NOT_FOUND
                await status("nope")
            assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_port_in_use_is_a_clear_bind_error(epp) -> None:  # type: ignore[no-untyped-def]
    taken = epp[0].grpc_port
    with pytest.raises(InferouteError) as info:
        await EppServer.start(
            RecordingPicker(PODS),
            ServerOptions(host="127.0.0.1", grpc_port=taken, health_port=None, insecure=True),
            CollectorRegistry(),
        )
    assert info.value.cause == "bind" and "127.0.0.1" in info.value.message


async def test_health_watch_streams_status_changes(epp) -> None:  # type: ignore[no-untyped-def]
    """``Watch`` sends the status at once, then each change (on both transports)."""
    server, picker, _ = epp
    picker.is_ready = True
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        call = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service="readiness"))
        first = await asyncio.wait_for(call.read(), 5)
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        picker.is_ready = False
        second = await asyncio.wait_for(call.read(), 5)
        assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
        call.cancel()
