"""Several live scheduling profiles per config: the disagg (P/D) profile handler, its deciders and the role
filters, through a real director (FakeClock, hand-fed metrics, no sockets)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from test_epp_rig import Rig, body, ctx, pick_request

from inferoute.endpoints import Endpoint
from inferoute.epp.datalayer.metrics import EndpointMetrics
from inferoute.epp.scheduling.disagg_metrics import MAX_MODELS, DisaggMetrics
from inferoute.epp.scheduling.handlers import (
    DECISIONS,
    ENCODERS_HEADER,
    PREFILLER_HEADER,
    DecodeFilter,
    EncodeFilter,
    PrefillFilter,
    has_multimodal_content,
)
from inferoute.epp.scheduling.types import Candidate
from inferoute.errors import InferouteError
from inferoute.picking import Destination, PickRequest

PD = """
plugins:
- type: prefill-filter
- type: decode-filter
- type: queue-scorer
- type: prefix-cache-scorer
- {type: prefix-based-pd-decider, parameters: {nonCachedTokens: 16}}
- type: disagg-profile-handler
  parameters:
    profiles: {decode: dec, prefill: pre}
    deciders: {prefill: prefix-based-pd-decider}
schedulingProfiles:
- name: dec
  plugins:
  - {pluginRef: decode-filter}
  - {pluginRef: queue-scorer}
  - {pluginRef: prefix-cache-scorer, weight: 3}
- name: pre
  plugins: [{pluginRef: prefill-filter}, {pluginRef: queue-scorer}]
"""

PREFILL = {"10.0.0.1:8000", "10.0.0.2:8000"}
DECODE = {"10.0.0.3:8000", "10.0.0.4:8000", "10.0.0.5:8000"}


def pd_rig(config: str = PD, roles: Sequence[str] = ("prefill", "prefill", "decode", "decode", "")) -> Rig:
    """Endpoints 10.0.0.1... with these ``llm-d.ai/role`` labels ("" = unlabelled, which counts as decode)."""
    rig = Rig(0, config)
    eps = [
        Endpoint(f"pod-{i}", f"10.0.0.{i + 1}", 8000, {"llm-d.ai/role": r} if r else {})
        for i, r in enumerate(roles)
    ]
    rig.datastore.set_endpoints(eps)
    for ep in eps:
        rig.scrape(ep.key)
    return rig


def decide(rig: Rig, prompt: str, headers: dict[str, str] | None = None, model: str = "m") -> Destination:
    d, s = rig.director.decide(pick_request(body(model, prompt=prompt), headers=headers))
    assert isinstance(d, Destination), d
    s.response_finished()
    return d


def test_long_uncached_prompt_goes_to_decode_with_a_prefill_pod_named() -> None:
    rig = pd_rig()
    long = "a long document that no pod has seen yet. " * 40
    d = decide(rig, long)
    assert d.endpoints[0] in DECODE
    assert d.set_headers[PREFILLER_HEADER] in PREFILL
    # the same prompt again: the decode pod now holds its prefix, so it prefills itself
    again = decide(rig, long)
    assert again.endpoints[0] == d.endpoints[0]
    assert PREFILLER_HEADER not in again.set_headers
    # a short prompt is never worth disaggregating
    assert PREFILLER_HEADER not in decide(rig, "hi").set_headers


def test_a_client_sent_prefiller_header_is_cleared() -> None:
    rig = pd_rig()
    d = decide(rig, "hi", {PREFILLER_HEADER: "169.254.169.254:80"})
    assert d.set_headers[PREFILLER_HEADER] == ""


LEGACY = """
plugins:
- type: prefill-filter
- type: decode-filter
- {type: always-disagg-pd-decider, name: always}
- type: pd-profile-handler
  parameters: {decodeProfile: decode, prefillProfile: prefill, deciderPluginName: always, primaryPort: 8000}
schedulingProfiles:
- {name: decode, plugins: [{pluginRef: decode-filter}]}
- {name: prefill, plugins: [{pluginRef: prefill-filter}]}
"""


def test_legacy_pd_profile_handler_and_always_decider() -> None:
    rig = pd_rig(LEGACY)
    for _ in range(5):
        d = decide(rig, "hi")
        assert d.endpoints[0] in DECODE and d.set_headers[PREFILLER_HEADER] in PREFILL


def test_prefill_first_runs_the_prefill_profile_on_every_request() -> None:
    cfg = PD.replace(
        "    deciders: {prefill: prefix-based-pd-decider}\n",
        "    deciders: {prefill: prefix-based-pd-decider}\n    stageOrder: prefill-first\n",
    )
    rig = pd_rig(cfg)
    ctx_results = []
    sched = rig.director.scheduler
    orig = sched.schedule

    def spy(ctx, cands):  # type: ignore[no-untyped-def]
        r = orig(ctx, cands)
        ctx_results.append(r)
        return r

    sched.schedule = spy  # type: ignore[method-assign]
    decide(rig, "hi")
    assert set(ctx_results[0].others) == {"pre"}  # ran, though the decider kept the request on decode
    assert PREFILLER_HEADER not in ctx_results[0].headers


def test_without_prefill_endpoints_the_decode_pod_does_it_all() -> None:
    rig = pd_rig()
    decode_only = [e for e in rig.datastore.states.values() if e.key not in PREFILL]
    rig.datastore.set_endpoints([s.endpoint for s in decode_only])
    d = decide(rig, "a long document that no pod has seen yet. " * 40)
    assert d.endpoints[0] in DECODE and PREFILLER_HEADER not in d.set_headers


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (PD.replace("- name: pre\n", "- name: other\n"), "no live scheduling profile named pre"),
        (PD + "- {name: third, plugins: [{pluginRef: queue-scorer}]}\n", "third are not one of its stages"),
        (
            PD.replace("- type: queue-scorer\n", "- type: queue-scorer\n- type: single-profile-handler\n"),
            "one profile handler per config",
        ),
        (
            PD.replace("deciders: {prefill: prefix-based-pd-decider}", "deciders: {prefill: queue-scorer}"),
            "is not a defined decider plugin",
        ),
        (
            PD.replace("profiles: {decode: dec, prefill: pre}", "profiles: {decode: dec, prefil: pre}"),
            "unknown parameter(s) ['prefil']",
        ),
        (
            PD.replace("    deciders: {prefill: prefix-based-pd-decider}\n", "    stageOrder: sideways\n"),
            "stageOrder: 'sideways' is not valid",
        ),
    ],
)
def test_config_mistakes_name_the_key(text: str, fragment: str) -> None:
    with pytest.raises(InferouteError) as e:
        Rig(0, text)
    assert e.value.cause == "config"
    assert fragment in e.value.message


def test_without_a_decider_only_the_decode_profile_runs() -> None:
    cfg = PD.replace("    deciders: {prefill: prefix-based-pd-decider}\n", "")
    rig = pd_rig(cfg)
    d = decide(rig, "a long document that no pod has seen yet. " * 40)
    assert d.endpoints[0] in DECODE and PREFILLER_HEADER not in d.set_headers


EPD = """
plugins:
- type: encode-filter
- type: prefill-filter
- type: decode-filter
- type: queue-scorer
- {type: max-score-picker, name: two, parameters: {maxNumOfEndpoints: 2}}
- type: always-disagg-multimodal-decider
- {type: prefix-based-pd-decider, parameters: {nonCachedTokens: 200}}
- type: disagg-profile-handler
  parameters:
    deciders: {encode: always-disagg-multimodal-decider, prefill: prefix-based-pd-decider}
schedulingProfiles:
- {name: decode, plugins: [{pluginRef: decode-filter}, {pluginRef: queue-scorer}]}
- {name: prefill, plugins: [{pluginRef: prefill-filter}, {pluginRef: queue-scorer}]}
- {name: encode, plugins: [{pluginRef: encode-filter}, {pluginRef: queue-scorer}, {pluginRef: two}]}
"""
ENCODE = {"10.0.0.1:8000", "10.0.0.2:8000"}
EPD_ROLES = ["encode", "encode", "prefill", "decode", "prefill-decode"]
DECODE_EPD = {"10.0.0.4:8000", "10.0.0.5:8000"}


def epd_rig(config: str = EPD, roles: Sequence[str] = EPD_ROLES) -> tuple[Rig, DisaggMetrics]:
    rig = pd_rig(config, roles)
    metrics = DisaggMetrics.for_scheduler(rig.config.scheduler, rig.registry)
    assert metrics is not None
    return rig, metrics


def chat(text: str, *blocks: dict[str, object], model: str = "m") -> bytes:
    content: object = [{"type": "text", "text": text}, *blocks] if blocks else text
    return json.dumps({"model": model, "messages": [{"role": "user", "content": content}]}).encode()


IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}


def decide_chat(rig: Rig, b: bytes, headers: dict[str, str] | None = None) -> Destination:
    req = PickRequest("POST", "/v1/chat/completions", dict(headers or {}), b)
    d, s = rig.director.decide(req)
    assert isinstance(d, Destination), d
    s.response_finished()
    return d


def decisions(rig: Rig, model: str = "m") -> dict[str, float]:
    out = {}
    for kind in DECISIONS:
        labels = {
            "plugin_name": "disagg-profile-handler",
            "plugin_type": "disagg-profile-handler",
            "model_name": model,
            "decision_type": kind,
        }
        out[kind] = rig.value("llm_d_epp_disagg_decision_total", labels)
        twin = rig.value(
            "llm_d_inference_scheduler_disagg_decision_total", {"model_name": model, "decision_type": kind}
        )
        assert twin == out[kind], (kind, twin, out[kind])
    return out


def test_role_filters_read_every_stage_of_the_role_label() -> None:
    roles = ["encode", "prefill", "decode", "encode-decode", "prefill-decode", "encode-prefill", "both", ""]
    cands = [
        Candidate(f"10.0.0.{i}:1", f"p{i}", EndpointMetrics(), labels={"llm-d.ai/role": r} if r else {})
        for i, r in enumerate(roles)
    ]
    kept = {
        f.type_name: [c.labels.get("llm-d.ai/role", "-") for c in f.filter(ctx(), cands)]
        for f in (EncodeFilter("e"), PrefillFilter("p"), DecodeFilter("d"))
    }
    assert kept == {
        "encode-filter": ["encode", "encode-decode", "encode-prefill"],
        "prefill-filter": ["prefill", "prefill-decode", "encode-prefill", "both"],
        "decode-filter": ["decode", "encode-decode", "prefill-decode", "both", "-"],
    }


def test_multimodal_content_detection() -> None:
    def mm(b: bytes) -> bool:  # the picker sees the raw JSON of the messages array
        return has_multimodal_content(json.dumps(json.loads(b)["messages"]).encode())

    assert mm(chat("look", IMAGE))
    for kind in ("audio_url", "video_url", "input_audio"):
        assert mm(chat("listen", {"type": kind, kind: {"url": "x"}}))
    assert not mm(chat("only text"))
    assert not mm(chat('text that says "image_url" in quotes'))
    assert not has_multimodal_content(b'["image_url", "a completions prompt list"]')  # decoded, not messages
    assert not has_multimodal_content(b'[{"role": "user", "content": "hi", "image_url": "x"}]')  # not a block
    assert not has_multimodal_content(b"")


def test_a_multimodal_request_gets_encoders_and_every_decision_is_counted() -> None:
    rig, _ = epd_rig()
    long_text = "a long document that no pod has seen yet. " * 40
    # text only, short: decode-only; the client's encoder header is cleared
    d = decide_chat(rig, chat("hi"), {ENCODERS_HEADER: "169.254.169.254:80"})
    assert d.endpoints[0] in DECODE_EPD and d.set_headers[ENCODERS_HEADER] == ""
    assert PREFILLER_HEADER not in d.set_headers
    # an image: both encoders named, in the picker's order, no prefill for a short prompt
    d = decide_chat(rig, chat("what is this?", IMAGE))
    assert d.endpoints[0] in DECODE_EPD
    assert set(d.set_headers[ENCODERS_HEADER].split(",")) == ENCODE
    assert PREFILLER_HEADER not in d.set_headers
    # long text: prefill-decode
    d = decide_chat(rig, chat(long_text))
    assert d.set_headers[PREFILLER_HEADER] in {"10.0.0.3:8000", "10.0.0.5:8000"}
    assert ENCODERS_HEADER not in d.set_headers
    # long text with an image: all three stages
    d = decide_chat(rig, chat(long_text + " again", IMAGE))
    assert ENCODERS_HEADER in d.set_headers and PREFILLER_HEADER in d.set_headers
    assert decisions(rig) == {
        "decode-only": 1,
        "prefill-decode": 1,
        "encode-decode": 1,
        "encode-prefill-decode": 1,
    }


def test_without_encoders_the_decode_pod_encodes_itself() -> None:
    rig, _ = epd_rig(roles=["prefill", "decode"])
    d = decide_chat(rig, chat("what is this?", IMAGE))
    assert d.endpoints[0] == "10.0.0.2:8000" and ENCODERS_HEADER not in d.set_headers
    assert decisions(rig)["decode-only"] == 1


def test_prefill_first_asks_the_encode_decider_before_decode() -> None:
    cfg = EPD.replace("    deciders: {encode", "    stageOrder: prefill-first\n    deciders: {encode")
    rig, _ = epd_rig(cfg)
    d = decide_chat(rig, chat("what is this?", IMAGE))
    assert set(d.set_headers[ENCODERS_HEADER].split(",")) == ENCODE
    assert decisions(rig)["encode-decode"] == 1


def test_the_legacy_alias_is_counted_under_its_own_type_and_model_names_are_bounded() -> None:
    rig, metrics = epd_rig(LEGACY, roles=["prefill", "decode"])
    for i in range(MAX_MODELS + 5):
        decide(rig, "hi", model=f"model-{i}")
    labels = {
        "plugin_name": "pd-profile-handler",
        "plugin_type": "pd-profile-handler",
        "decision_type": "prefill-decode",
    }
    assert rig.value("llm_d_epp_disagg_decision_total", {**labels, "model_name": "model-0"}) == 1
    assert rig.value("llm_d_epp_disagg_decision_total", {**labels, "model_name": "other"}) == 5
    metrics.close()
    decide(rig, "hi", model="model-0")  # no longer counted, and the family is gone
    assert (
        rig.registry.get_sample_value("llm_d_epp_disagg_decision_total", {**labels, "model_name": "model-0"})
        is None
    )


def test_the_documented_disagg_config_loads() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "picker.md").read_text()
    blocks = [b.split("```", 1)[0] for b in doc.split("```yaml\n")[1:]]
    (epd,) = [b for b in blocks if "disagg-profile-handler" in b]
    rig, _ = epd_rig(epd)
    d = decide_chat(rig, chat("what is this?", IMAGE))
    assert set(d.set_headers[ENCODERS_HEADER].split(",")) == ENCODE


def test_prefill_first_without_a_decider_sends_every_request_through_prefill() -> None:
    """The reference's prefill-first: no prefill decider (it refuses one in this order); the prefill pick is
    sent on every request."""
    cfg = PD.replace("    deciders: {prefill: prefix-based-pd-decider}\n", "    stageOrder: prefill-first\n")
    rig = pd_rig(cfg)
    metrics = DisaggMetrics.for_scheduler(rig.config.scheduler, rig.registry)
    assert metrics is not None
    for _ in range(3):
        d = decide(rig, "hi")
        assert d.endpoints[0] in DECODE and d.set_headers[PREFILLER_HEADER] in PREFILL
    labels = {"plugin_name": "disagg-profile-handler", "plugin_type": "disagg-profile-handler"}
    labels |= {"model_name": "m", "decision_type": "prefill-decode"}
    assert rig.value("llm_d_epp_disagg_decision_total", labels) == 3
