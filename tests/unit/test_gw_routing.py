"""RequestRouter: every decision and failure, with an in-process picker and a fake clock (no sockets)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from inferoute.clock import FakeClock
from inferoute.endpoints import Endpoint
from inferoute.epp.requestcontrol.parse import ParsedBody
from inferoute.errors import InferouteError
from inferoute.gateway.config import parse_config
from inferoute.gateway.destinations import AllowList, routing_header_names
from inferoute.gateway.routing import PickerRejected, RequestRouter
from inferoute.picking import (
    Decision,
    Destination,
    NullSession,
    PickerError,
    PickRequest,
    PickSession,
    Reject,
)

POOL = [Endpoint("a", "10.0.0.1", 8000), Endpoint("b", "10.0.0.2", 8000)]
BODY = b'{"model": "m1", "messages": []}'
HEADERS = [("Content-Type", "application/json"), ("X-Gateway-Destination-Endpoint", "6.6.6.6:6")]


class Session:
    def __init__(self) -> None:
        self.events: list[str] = []

    def response_started(self, served: str, status: int, headers: Mapping[str, str]) -> None:
        self.events.append("started")

    def response_chunk(self, chunk: bytes) -> None:
        self.events.append("chunk")

    def response_finished(self) -> None:
        self.events.append("finished")

    def aborted(self, reason: str) -> None:
        self.events.append(f"aborted:{reason}")


class Picker:
    def __init__(
        self,
        decision: Decision | None = None,
        error: PickerError | None = None,
        cost: float = 0.0,
        clock: FakeClock | None = None,
    ) -> None:
        self.decision = decision or Destination(("10.0.0.2:8000", "10.0.0.1:8000"))
        self.error = error
        self.cost = cost
        self.clock = clock
        self.requests: list[PickRequest] = []
        self.sessions: list[Session] = []

    async def pick(self, request: PickRequest) -> tuple[Decision, PickSession]:
        self.requests.append(request)
        if self.clock:
            self.clock.advance(self.cost)
        if self.error:
            raise self.error
        s = Session()
        self.sessions.append(s)
        return self.decision, s

    async def aclose(self) -> None:
        return None


class BBR:
    def __init__(self, result: str | None = None, error: PickerError | None = None) -> None:
        self.result = result
        self.error = error
        self.calls: list[tuple[dict[str, str], bytes]] = []

    async def model_header(self, headers: Mapping[str, str], body: bytes) -> str | None:
        self.calls.append((dict(headers), body))
        if self.error:
            raise self.error
        return self.result


def decider(
    picker: Any,
    route: dict[str, Any] | None = None,
    remote_bbr: Any = None,
    clock: FakeClock | None = None,
    cidrs: list[str] | None = None,
) -> RequestRouter:
    cfg = parse_config({"routes": [{"path": "/", **(route or {})}]})
    r = cfg.routes[0]
    allow = AllowList(POOL, cidrs or [], extra=[r.default_upstream] if r.default_upstream else [])
    return RequestRouter(
        r,
        POOL,
        picker,
        allow=allow,
        routing_headers=routing_header_names([r.epp.header_name]),
        remote_bbr=remote_bbr,
        clock=clock or FakeClock(),
    )


async def test_happy_path_sets_model_strips_spoof_and_times_stages() -> None:
    clock = FakeClock()
    p = Picker(cost=0.003, clock=clock)
    d = await decider(p, clock=clock).decide("POST", "/v1/chat/completions", HEADERS, BODY, "rid")
    assert d.upstreams == ("10.0.0.2:8000", "10.0.0.1:8000")
    assert d.model == "m1" and d.set_headers == {"X-Gateway-Model-Name": "m1"}
    assert ("X-Gateway-Model-Name", "m1") in d.headers
    assert all("6.6.6.6" not in v for _, v in d.headers)
    assert d.source == "picker" and d.picker_seconds == pytest.approx(0.003)
    req = p.requests[0]
    assert req.headers["x-gateway-model-name"] == "m1" and req.body == BODY and req.request_id == "rid"
    assert "x-gateway-destination-endpoint" not in req.headers
    assert d.upstream_headers("10.0.0.2:8000")[-1] == ("x-gateway-destination-endpoint", "10.0.0.2:8000")


async def test_client_model_header_is_overwritten_by_bbr() -> None:
    d = await decider(Picker()).decide("POST", "/", [("x-gateway-model-name", "spoof")], BODY)
    assert [v for k, v in d.headers if k.lower() == "x-gateway-model-name"] == ["m1"]


async def test_headers_only_mode_sends_no_body_to_the_picker() -> None:
    p = Picker()
    await decider(p, {"epp": {"body": "headers_only"}}).decide("POST", "/", HEADERS, BODY)
    assert p.requests[0].body == b"" and p.requests[0].model == "m1" and p.requests[0].parsed is None


async def test_the_body_is_parsed_once_and_the_parse_handed_to_the_picker() -> None:
    p = Picker()
    await decider(p).decide("POST", "/", HEADERS, BODY)
    parsed = p.requests[0].parsed
    assert isinstance(parsed, ParsedBody) and parsed.model == "m1" and bytes(parsed.prompt) == b"[]"
    await decider(p).decide("POST", "/", HEADERS, b'{"model": ""}')
    bad = p.requests[1].parsed
    assert isinstance(bad, InferouteError) and bad.status == 400  # the picker answers it, not BBR
    await decider(p, {"bbr": {"enabled": False}}).decide("POST", "/", HEADERS, BODY)
    assert p.requests[2].parsed is None  # BBR off: the picker parses the body itself


async def test_body_over_limit_is_413_before_picking() -> None:
    p = Picker()
    with pytest.raises(InferouteError) as e:
        await decider(p, {"bbr": {"max_body_size": 10}}).decide("POST", "/", HEADERS, BODY)
    assert e.value.status == 413 and p.requests == []


@pytest.mark.parametrize("status", [429, 503])
async def test_reject_is_passed_through_and_session_ended(status: int) -> None:
    p = Picker(decision=Reject(status, b'{"error": {"message": "busy"}}', {"retry-after": "3"}))
    with pytest.raises(PickerRejected) as e:
        await decider(p).decide("POST", "/", HEADERS, BODY)
    assert e.value.status == status and e.value.body() == b'{"error": {"message": "busy"}}'
    assert e.value.headers == {"retry-after": "3"}
    assert p.sessions[0].events == ["aborted:picker-reject"]


@pytest.mark.parametrize(
    ("error", "status", "cause"),
    [
        (PickerError("x", timeout=True), 504, "picker-timeout"),
        (PickerError("refused", cause="unavailable"), 502, "unavailable"),
        (PickerError("bad cert: UnknownIssuer", cause="tls"), 502, "tls"),
        (PickerError("garbage", cause="protocol"), 502, "protocol"),
    ],
)
async def test_picker_failure_fail_closed(error: PickerError, status: int, cause: str) -> None:
    with pytest.raises(InferouteError) as e:
        await decider(Picker(error=error)).decide("POST", "/", HEADERS, BODY)
    assert (e.value.status, e.value.cause) == (status, cause)
    assert e.value.body().startswith(b'{"error":')


async def test_fail_open_prefers_default_upstream() -> None:
    route = {"epp": {"failure_mode_allow": True}, "default_upstream": "10.9.9.9:80"}
    d = await decider(Picker(error=PickerError("down", cause="unavailable")), route).decide(
        "POST", "/", [], BODY
    )
    assert d.upstreams == ("10.9.9.9:80",) and d.source == "fail-open" and d.picker_error == "unavailable"
    assert isinstance(d.session, NullSession)


async def test_fail_open_without_default_round_robins_the_pool() -> None:
    dec = decider(Picker(error=PickerError("t", timeout=True)), {"epp": {"failure_mode_allow": True}})
    firsts = [(await dec.decide("POST", "/", [], BODY)).upstreams for _ in range(3)]
    assert firsts == [
        ("10.0.0.1:8000", "10.0.0.2:8000"),
        ("10.0.0.2:8000", "10.0.0.1:8000"),
        ("10.0.0.1:8000", "10.0.0.2:8000"),
    ]


async def test_invalid_destination_is_always_502_even_fail_open() -> None:
    p = Picker(decision=Destination(("10.0.0.1:8000", "8.8.8.8:53")))
    with pytest.raises(InferouteError) as e:
        await decider(p, {"epp": {"failure_mode_allow": True}}).decide("POST", "/", [], BODY)
    assert (e.value.status, e.value.cause) == (502, "invalid-destination") and "8.8.8.8:53" in e.value.message
    assert p.sessions[0].events == ["aborted:invalid-destination"]


async def test_cidr_allows_and_comma_lists_are_split() -> None:
    p = Picker(decision=Destination(("192.168.1.5:80,10.0.0.1:8000",)))
    d = await decider(p, cidrs=["192.168.0.0/16"]).decide("POST", "/", [], BODY)
    assert d.upstreams == ("192.168.1.5:80", "10.0.0.1:8000")


async def test_empty_destination_is_502_fail_closed() -> None:
    p = Picker(decision=Destination(()))
    with pytest.raises(InferouteError) as e:
        await decider(p).decide("POST", "/", [], BODY)
    assert (e.value.status, e.value.cause) == (502, "no-destination")
    assert p.sessions[0].events == ["aborted:no-destination"]


async def test_mutations_and_body_replacement() -> None:
    dest = Destination(
        ("10.0.0.1:8000",),
        set_headers={
            "x-lora": "a",
            "x-inference-upstream": "6.6.6.6:1",
            "x-gateway-destination-endpoint": "6.6.6.6:1",
        },
        body=b"{}",
    )
    d = await decider(Picker(decision=dest)).decide("POST", "/", [("x-lora", "client")], BODY)
    assert d.body == b"{}"
    assert [v for k, v in d.headers if k == "x-lora"] == ["a"]
    assert all("6.6.6.6" not in v for _, v in d.headers)


async def test_epp_disabled_routes_statically() -> None:
    d = await decider(None, {"epp": {"enabled": False}}).decide("GET", "/v1/models", [], b"")
    assert d.source == "static" and d.upstreams[0] == "10.0.0.1:8000" and d.model is None


async def test_epp_disabled_with_empty_pool_is_503() -> None:
    cfg = parse_config({"routes": [{"path": "/", "epp": {"enabled": False}}]})
    dec = RequestRouter(cfg.routes[0], [], None, allow=AllowList([]), routing_headers=routing_header_names())
    with pytest.raises(InferouteError) as e:
        await dec.decide("GET", "/", [], b"")
    assert (e.value.status, e.value.cause) == (503, "no-endpoints")


async def test_remote_bbr_used_and_its_failure_modes() -> None:
    route = {"bbr": {"endpoint": "127.0.0.1:9", "default_model": "dflt"}}
    bbr = BBR(result="remote-model")
    d = await decider(Picker(), route, remote_bbr=bbr).decide("POST", "/", HEADERS, BODY)
    assert d.model == "remote-model" and bbr.calls[0][1] == BODY
    d = await decider(Picker(), route, remote_bbr=BBR(result=None)).decide("POST", "/", HEADERS, BODY)
    assert d.model == "dflt"
    failing = BBR(error=PickerError("down", cause="unavailable"))
    d = await decider(Picker(), route, remote_bbr=failing).decide("POST", "/", HEADERS, BODY)
    assert d.model == "dflt" and d.bbr_error == "bbr-error"  # fail-open by default
    closed = {"bbr": {**route["bbr"], "failure_mode_allow": False}}
    with pytest.raises(InferouteError) as e:
        await decider(Picker(), closed, remote_bbr=failing).decide("POST", "/", HEADERS, BODY)
    assert (e.value.status, e.value.cause) == (502, "bbr-error")
    with pytest.raises(InferouteError) as e:
        await decider(Picker(), closed, remote_bbr=BBR(error=PickerError("t", timeout=True))).decide(
            "POST", "/", HEADERS, BODY
        )
    assert (e.value.status, e.value.cause) == (504, "bbr-timeout")
    # body-less requests never reach the remote BBR
    quiet = BBR(result="x")
    d = await decider(Picker(), route, remote_bbr=quiet).decide("GET", "/", [], b"")
    assert d.model is None and quiet.calls == []


async def test_invalid_mutations_are_dropped() -> None:
    dest = Destination(
        ("10.0.0.1:8000",),
        set_headers={"x-ok": "1", "x-bad": "a\r\nb", "x-gateway-destination-endpoint-served": "x"},
    )
    d = await decider(Picker(decision=dest)).decide("POST", "/", [], BODY)
    assert d.set_headers == {"X-Gateway-Model-Name": "m1", "x-ok": "1"}


async def test_remote_bbr_model_with_control_characters() -> None:
    route = {"bbr": {"endpoint": "127.0.0.1:9", "default_model": "dflt"}}
    d = await decider(Picker(), route, remote_bbr=BBR(result="a\nb")).decide("POST", "/", HEADERS, BODY)
    assert d.model == "dflt" and d.bbr_error == "bbr-error"
    closed = {"bbr": {**route["bbr"], "failure_mode_allow": False}}
    with pytest.raises(InferouteError) as e:
        await decider(Picker(), closed, remote_bbr=BBR(result="a\nb")).decide("POST", "/", HEADERS, BODY)
    assert (e.value.status, e.value.cause) == (502, "bbr-error")
