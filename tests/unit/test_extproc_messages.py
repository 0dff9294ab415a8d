"""ext_proc message builders and parsers (pure: no sockets, no sleeps)."""

from __future__ import annotations

import json

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from inferoute.errors import error_body
from inferoute.extproc import messages as m
from inferoute.picking import (
    DESTINATION_HEADER,
    DESTINATION_SERVED_KEY,
    LB_NAMESPACE,
    SUBSET_KEY,
    SUBSET_NAMESPACE,
)


def _headers_req(*values: base_pb2.HeaderValue) -> pb.ProcessingRequest:
    req = pb.ProcessingRequest()
    req.request_headers.headers.headers.extend(values)
    return req


def test_headers_read_from_raw_value_and_value() -> None:
    req = _headers_req(
        base_pb2.HeaderValue(key=":path", raw_value=b"/v1/completions"),
        base_pb2.HeaderValue(key="X-Old-Style", value="legacy"),
        base_pb2.HeaderValue(key="Accept", raw_value=b"a"),
        base_pb2.HeaderValue(key="accept", raw_value=b"b"),
    )
    h = m.parse_headers(req.request_headers.headers)
    assert h == {":path": "/v1/completions", "x-old-style": "legacy", "accept": "a,b"}


def test_raw_value_wins_over_value() -> None:
    req = _headers_req(base_pb2.HeaderValue(key="k", value="old", raw_value=b"new"))
    assert m.parse_headers(req.request_headers.headers) == {"k": "new"}


def _option_map(common: pb.CommonResponse) -> dict[str, tuple[str, int]]:
    return {
        o.header.key: (o.header.raw_value.decode(), o.append_action)
        for o in common.header_mutation.set_headers
    }


def test_destination_sets_header_and_identical_metadata_with_fallbacks() -> None:
    resp = m.headers_response(destination=("10.0.0.1:8000", "10.0.0.2:8000"), content_length=12)
    common = resp.request_headers.response
    opts = _option_map(common)
    assert opts[DESTINATION_HEADER][0] == "10.0.0.1:8000,10.0.0.2:8000"
    assert opts["content-length"][0] == "12"
    # Overwrite, never append: a client-supplied header must not survive next to the picked one.
    assert {a for _, a in opts.values()} == {base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD}
    assert common.clear_route_cache
    meta = resp.dynamic_metadata.fields[LB_NAMESPACE].struct_value.fields[DESTINATION_HEADER].string_value
    assert meta == "10.0.0.1:8000,10.0.0.2:8000"
    # and the parser (data-plane side) reads both back
    from_meta, from_header, others = m.destination_from_response(resp)
    assert from_meta == from_header == ("10.0.0.1:8000", "10.0.0.2:8000")
    assert others == {}


def test_empty_headers_response_is_marked_present() -> None:
    resp = m.headers_response("response_headers")
    assert resp.WhichOneof("response") == "response_headers"
    assert not resp.response_headers.response.header_mutation.set_headers


def test_buffered_decision_on_body_reply_replaces_body() -> None:
    resp = m.headers_response(
        "request_body", destination=("1.2.3.4:5",), content_length=3, replace_body=b"new"
    )
    common = resp.request_body.response
    assert common.body_mutation.body == b"new"
    assert _option_map(common)["content-length"][0] == "3"
    assert m.destination_from_response(resp)[0] == ("1.2.3.4:5",)


def test_body_chunks_at_62000_with_eos_on_last() -> None:
    body = bytes(range(256)) * 1000  # 256,000 bytes -> 62,000 * 4 + 8,000
    chunks = list(m.body_chunks(body))
    sizes = [len(c.request_body.response.body_mutation.streamed_response.body) for c in chunks]
    assert sizes == [62_000, 62_000, 62_000, 62_000, 8_000]
    eos = [c.request_body.response.body_mutation.streamed_response.end_of_stream for c in chunks]
    assert eos == [False, False, False, False, True]
    rebuilt = b"".join(c.request_body.response.body_mutation.streamed_response.body for c in chunks)
    assert rebuilt == body


def test_body_chunks_exact_multiple_and_empty() -> None:
    assert len(list(m.body_chunks(b"x" * 124_000))) == 2
    (only,) = list(m.body_chunks(b""))
    assert only.request_body.response.body_mutation.streamed_response.end_of_stream
    (single,) = m.body_chunks(b"abc", end_of_stream=False)
    assert not single.request_body.response.body_mutation.streamed_response.end_of_stream


def test_response_body_chunks_use_response_phase() -> None:
    (c,) = list(m.body_chunks(b"data: x\n\n", "response_body", end_of_stream=False))
    assert c.WhichOneof("response") == "response_body"
    assert c.response_body.response.body_mutation.streamed_response.body == b"data: x\n\n"


def _with_subset(value_setter) -> pb.ProcessingRequest:  # type: ignore[no-untyped-def]
    req = pb.ProcessingRequest()
    value_setter(req.metadata_context.filter_metadata[SUBSET_NAMESPACE].fields[SUBSET_KEY])
    return req


def test_subset_hint_forms() -> None:
    assert m.subset_hint(pb.ProcessingRequest()) is None
    as_list = _with_subset(lambda v: v.list_value.extend(["10.0.0.1:8000", "10.0.0.2"]))
    assert m.subset_hint(as_list) == ("10.0.0.1:8000", "10.0.0.2")
    as_string = _with_subset(lambda v: setattr(v, "string_value", "10.0.0.1:8000, 10.0.0.3"))
    assert m.subset_hint(as_string) == ("10.0.0.1:8000", "10.0.0.3")
    empty = _with_subset(lambda v: v.list_value.SetInParent())
    assert m.subset_hint(empty) == ()
    wrong_type = _with_subset(lambda v: setattr(v, "number_value", 3))
    assert m.subset_hint(wrong_type) == ()  # never "whole pool" for a malformed hint


def test_subset_hint_round_trip_via_builder_including_empty() -> None:
    req = m.headers_request([(":path", "/")], end_of_stream=True, subset=["10.0.0.1:1"])
    assert m.subset_hint(req) == ("10.0.0.1:1",)
    req = m.headers_request([(":path", "/")], end_of_stream=True, subset=[])
    assert m.subset_hint(req) == ()
    assert m.subset_hint(m.headers_request([], end_of_stream=True)) is None


def test_served_endpoint_from_metadata_then_attribute() -> None:
    req = m.headers_request(
        [(":status", "200")], end_of_stream=False, phase="response_headers", served="1.1.1.1:80"
    )
    assert (
        req.metadata_context.filter_metadata[LB_NAMESPACE].fields[DESTINATION_SERVED_KEY].string_value
        == "1.1.1.1:80"
    )
    assert m.served_endpoint(req) == "1.1.1.1:80"
    req2 = pb.ProcessingRequest()
    req2.attributes[m.EXT_PROC_ATTRIBUTES_KEY].fields["upstream.address"].string_value = "2.2.2.2:81"
    assert m.served_endpoint(req2) == "2.2.2.2:81"
    assert m.served_endpoint(pb.ProcessingRequest()) is None


def test_immediate_response_has_status_json_body_and_content_type() -> None:
    body = error_body(503, "no endpoints")
    resp = m.immediate_response(503, body, {"Retry-After": "1"}, details="subset")
    ir = resp.immediate_response
    assert ir.status.code == 503
    assert json.loads(ir.body)["error"]["code"] == 503
    hdrs = {o.header.key: o.header.raw_value.decode() for o in ir.headers.set_headers}
    assert hdrs == {"content-type": "application/json", "retry-after": "1"}
    assert ir.details == "subset"


def test_status_and_split_helpers() -> None:
    assert m.status_of({":status": "429"}) == 429
    assert m.status_of({":status": "x"}) == 0
    assert m.split_endpoints(" a:1, ,b:2 ") == ("a:1", "b:2")


def test_body_chunk_request_and_phase() -> None:
    req = m.body_chunk_request(b"abc", end_of_stream=True)
    assert m.request_phase(req) == "request_body"
    assert req.request_body.body == b"abc" and req.request_body.end_of_stream
    assert m.request_phase(m.trailers_request()) == "request_trailers"
    cfg = m.protocol_config(m.BUFFERED, m.STREAMED)
    assert cfg.request_body_mode == m.BUFFERED and cfg.response_body_mode == m.STREAMED


@pytest.mark.parametrize("phase", ["request_body", "response_body"])
@pytest.mark.parametrize("size", [0, 1, 127, 128, 16_383, 62_000, 62_001, 200_000, 327_683])
@pytest.mark.parametrize("eos", [True, False])
def test_body_chunks_wire_is_byte_identical_to_protobuf(phase: str, size: int, eos: bool) -> None:
    """The h2 transport sends the hand-encoded echo; it must be exactly what protobuf would send."""
    body = bytes(range(256)) * (size // 256) + bytes(size % 256)
    expected = [r.SerializeToString() for r in m.body_chunks(body, phase, end_of_stream=eos)]
    wire = [b"".join(pieces) for pieces in m.body_chunks_wire(body, phase, end_of_stream=eos)]
    assert wire == expected


@pytest.mark.parametrize(
    ("details", "failed"),
    [
        (
            "upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_111}",
            True,
        ),
        ("upstream_reset_before_response_started{connection_timeout}", True),
        ("upstream_reset_before_response_started{local_connection_failure}", True),
        ("upstream_reset_before_response_started{remote_reset}", False),  # it had connected
        ("via_upstream", False),  # a model server's own answer, 503 or not
        ("", False),
    ],
)
def test_envoy_connect_failure_from_code_details(details: str, failed: bool) -> None:
    """What Envoy 1.40 sends with its local 503 (measured: refused, and a connect timeout)."""
    req = m.headers_request([(":status", "503")], end_of_stream=False, phase="response_headers")
    assert m.connect_failure_of(req) is None  # no attributes asked for
    req.attributes[m.EXT_PROC_ATTRIBUTES_KEY].fields["response.code_details"].string_value = details
    assert (m.connect_failure_of(req) == details) is failed
