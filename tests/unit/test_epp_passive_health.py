"""Passive health and fallbacks in the picker (pure: injected clock, no sockets): an endpoint the data plane
could not connect to stops being picked at once, until its next good scrape; every decision carries
fallbacks; the ext_proc messages that carry both."""

from __future__ import annotations

from test_epp_rig import Rig, body, pick_request

from inferoute.extproc import messages as m
from inferoute.picking import FALLBACKS_KEY, Destination, report_endpoint_failed


def _decide(rig: Rig) -> tuple[Destination, object]:
    decision, session = rig.director.decide(pick_request(body()))  # type: ignore[arg-type]
    assert isinstance(decision, Destination)
    return decision, session


def test_a_refused_endpoint_is_avoided_at_once_and_back_after_its_next_scrape() -> None:
    rig = Rig(3)
    dead = "10.0.0.1:8000"
    _, session = _decide(rig)
    report_endpoint_failed(session, dead, "connection refused")  # type: ignore[arg-type]
    assert not rig.datastore.get(dead).fresh(rig.clock.now(), 2.0)  # type: ignore[union-attr]
    for _ in range(30):
        d, s = _decide(rig)
        assert dead not in d.walk
        s.response_finished()  # type: ignore[attr-defined]
    rig.scrape(dead)  # it answers its scrape again: fresh, picked again
    assert any(dead in _decide(rig)[0].walk for _ in range(30))


def test_decisions_carry_two_fallbacks_in_turn() -> None:
    rig = Rig(4)
    seen: set[str] = set()
    primaries: set[str] = set()
    for _ in range(8):
        d, _ = _decide(rig)
        assert len(d.endpoints) == 1 and len(d.fallbacks) == 2
        assert len(set(d.walk)) == 3
        seen.update(d.fallbacks)
        primaries.add(d.endpoints[0])
    assert len(seen - primaries) == 4 - len(primaries)  # taken in turn: every other endpoint in some decision
    assert _decide(Rig(1))[0].fallbacks == ()  # nothing else to offer


def test_ext_proc_messages_carry_fallbacks_and_failed_endpoints() -> None:
    resp = m.headers_response(destination=("10.0.0.1:8000",), fallbacks=("10.0.0.2:8000", "10.0.0.3:8000"))
    meta, header, _ = m.destination_from_response(resp)
    assert meta == header == ("10.0.0.1:8000",)  # what Envoy reads: one endpoint
    assert m.fallbacks_from_response(resp) == ("10.0.0.2:8000", "10.0.0.3:8000")
    assert FALLBACKS_KEY in resp.dynamic_metadata.fields["envoy.lb"].struct_value.fields
    req = m.headers_request([(":status", "200")], end_of_stream=False, phase="response_headers",
                            served="10.0.0.2:8000", failed=["10.0.0.1:8000"])  # fmt: skip
    assert m.failed_endpoints(req) == ["10.0.0.1:8000"] and m.served_endpoint(req) == "10.0.0.2:8000"
    bare = m.headers_request([(":status", "200")], end_of_stream=False, phase="response_headers")
    assert m.failed_endpoints(bare) == [] and m.fallbacks_from_response(m.headers_response()) == ()
