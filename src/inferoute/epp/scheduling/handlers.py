"""Profile handlers that run more than one live profile, their deciders and the role filters.

* ``disagg-profile-handler`` (``pd-profile-handler`` is the reference's deprecated alias): encode, prefill and
  decode disaggregation. Parameters: ``profiles: {decode, prefill, encode}`` (profile names, default
  ``decode``, ``prefill`` and ``encode``), ``deciders: {prefill, encode}`` (decider plugin names; a stage is
  enabled only with a decider, but for the prefill stage of ``prefill-first``), ``stageOrder: decode-first``
  (default: the decode pod is picked first and the deciders look at it) or ``prefill-first`` (the prefill
  profile, when live, runs first on every request and its pick is sent, as in the reference; with a prefill
  decider, which the reference refuses in this order, the decider decides after the decode pick whether it is
  sent). The legacy flat parameters ``decodeProfile``, ``prefillProfile``, ``encodeProfile``,
  ``deciderPluginName`` / ``prefillDeciderPluginName`` and ``encodeDeciderPluginName`` are read too
  (``prefixPluginType``, ``prefixPluginName`` and ``primaryPort`` are accepted and ignored). The decode pick
  is the request's destination. When the prefill decider disaggregates, the prefill pick goes in the
  ``x-prefiller-host-port`` request header; when the encode decider does, every endpoint the encode profile
  picked goes in ``x-encoder-hosts-ports`` (``ip:port,ip:port``), for the decode pod's sidecar. A client-sent
  value of either header is cleared.
* deciders: ``always-disagg-pd-decider``; ``prefix-based-pd-decider`` (``nonCachedTokens``: disaggregate when
  the prompt tokens the decode pod probably lacks are at least this many, 0 = never; ``promptTokens``: and the
  prompt has at least this many tokens, 0 = no gate); ``always-disagg-multimodal-decider`` (encode: the chat
  request has an ``image_url``, ``audio_url``, ``video_url`` or ``input_audio`` content block).
* filters: ``prefill-filter``, ``decode-filter`` and ``encode-filter`` keep endpoints whose ``llm-d.ai/role``
  label has that stage (``prefill``, ``encode-prefill-decode``, ...); unlabelled endpoints and the deprecated
  ``both`` count as decode (``both``: prefill and decode).
* every decision is reported (``report``) as ``decode-only``, ``prefill-decode``, ``encode-decode`` or
  ``encode-prefill-decode``: which stages the request was sent through.

The prefill and encode picks are not counted in flight (the data plane reports the decode pod's response
only).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import ClassVar, Protocol, runtime_checkable

import msgspec

from inferoute.epp.plugin import Factory, Params, PluginDeps, config_error
from inferoute.epp.scheduling.framework import NoEndpoints, ProfileResult, SchedulerProfile
from inferoute.epp.scheduling.types import Candidate, CycleContext, uncached_tokens

PREFILLER_HEADER = "x-prefiller-host-port"
ENCODERS_HEADER = "x-encoder-hosts-ports"
ROLE_LABEL = "llm-d.ai/role"

DECODE_ONLY = "decode-only"
PREFILL_DECODE = "prefill-decode"
ENCODE_DECODE = "encode-decode"
ENCODE_PREFILL_DECODE = "encode-prefill-decode"
DECISIONS = (DECODE_ONLY, PREFILL_DECODE, ENCODE_DECODE, ENCODE_PREFILL_DECODE)

DecisionReport = Callable[[str, str], None]
"""(target model, decision): told once per scheduled request."""


def decision_type(encoded: bool, prefilled: bool) -> str:
    """The stages a request went through, as the reference names them."""
    if encoded:
        return ENCODE_PREFILL_DECODE if prefilled else ENCODE_DECODE
    return PREFILL_DECODE if prefilled else DECODE_ONLY


@runtime_checkable
class PdDecider(Protocol):
    """Decides whether a stage runs on its own pods. ``decode`` is the decode pick, or None when the stage is
    decided before the decode profile runs (``stageOrder: prefill-first``)."""

    type_name: ClassVar[str]
    name: str

    def disaggregate(self, ctx: CycleContext, decode: Candidate | None) -> bool: ...


@dataclass(slots=True)
class AlwaysDisagg:
    type_name: ClassVar[str] = "always-disagg-pd-decider"
    name: str

    def disaggregate(self, ctx: CycleContext, decode: Candidate | None) -> bool:
        return True


@dataclass(slots=True)
class PrefixBasedDecider:
    type_name: ClassVar[str] = "prefix-based-pd-decider"
    name: str
    non_cached_tokens: int = 0
    prompt_tokens: int = 0

    def disaggregate(self, ctx: CycleContext, decode: Candidate | None) -> bool:
        if self.non_cached_tokens <= 0:
            return False
        if self.prompt_tokens and ctx.request.prompt_tokens < self.prompt_tokens:
            return False
        if decode is None:
            return ctx.request.prompt_tokens >= self.non_cached_tokens
        return uncached_tokens(ctx, decode.key) >= self.non_cached_tokens


MULTIMODAL_BLOCKS = frozenset(("image_url", "audio_url", "video_url", "input_audio"))
_MARKERS = tuple(f'"{t}"'.encode() for t in sorted(MULTIMODAL_BLOCKS))


class _Block(msgspec.Struct):
    type: str = ""


class _Message(msgspec.Struct):
    content: str | list[_Block] | None = None


_MESSAGES = msgspec.json.Decoder(list[_Message])


def has_multimodal_content(prompt: bytes | memoryview) -> bool:
    """Whether a chat ``messages`` array (raw JSON) has a content block of a :data:`MULTIMODAL_BLOCKS` type.
    A prompt without any of the type names is answered by a substring scan; only a candidate is decoded."""
    raw = bytes(prompt)
    if not any(m in raw for m in _MARKERS):
        return False
    try:
        messages = _MESSAGES.decode(raw)
    except msgspec.DecodeError:  # not a messages array (a completions prompt that mentions "image_url")
        return False
    return any(
        isinstance(m.content, list) and any(b.type in MULTIMODAL_BLOCKS for b in m.content) for m in messages
    )


@dataclass(slots=True)
class AlwaysDisaggMultimodal:
    """``always-disagg-multimodal-decider``: encode on the encoder pods whenever the request carries images,
    audio or video (:func:`has_multimodal_content`)."""

    type_name: ClassVar[str] = "always-disagg-multimodal-decider"
    name: str

    def disaggregate(self, ctx: CycleContext, decode: Candidate | None) -> bool:
        return has_multimodal_content(ctx.request.prompt)


@functools.lru_cache(maxsize=64)
def _parse_role(role: str) -> frozenset[str]:
    if not role:
        return frozenset(("decode",))
    if role == "both":
        return frozenset(("prefill", "decode"))
    return frozenset(role.split("-"))


def role_stages(c: Candidate) -> frozenset[str]:
    """The stages an endpoint serves, from its ``llm-d.ai/role`` label: its ``-``-separated parts
    (``encode-prefill-decode``); unlabelled: decode; the deprecated ``both``: prefill and decode."""
    return _parse_role(c.labels.get(ROLE_LABEL, ""))


@dataclass(slots=True)
class _StageFilter:
    """Endpoints whose ``llm-d.ai/role`` has the :attr:`stage` (see module docstring)."""

    type_name: ClassVar[str]
    stage: ClassVar[str]
    name: str

    def filter(self, ctx: CycleContext, candidates: list[Candidate]) -> list[Candidate]:
        return [c for c in candidates if self.stage in role_stages(c)]


class PrefillFilter(_StageFilter):
    """``prefill-filter``: endpoints with a prefill stage."""

    type_name: ClassVar[str] = "prefill-filter"
    stage: ClassVar[str] = "prefill"


class DecodeFilter(_StageFilter):
    """``decode-filter``: endpoints with a decode stage, unlabelled ones included."""

    type_name: ClassVar[str] = "decode-filter"
    stage: ClassVar[str] = "decode"


class EncodeFilter(_StageFilter):
    """``encode-filter``: endpoints with an encode stage (``encode``, ``encode-decode``, ...)."""

    type_name: ClassVar[str] = "encode-filter"
    stage: ClassVar[str] = "encode"


@dataclass(frozen=True, slots=True)
class Stages:
    """Profile names of the three stages and the decider plugin names enabling prefill and encode."""

    decode: str = "decode"
    prefill: str = "prefill"
    encode: str = "encode"
    prefill_decider: str | None = None
    encode_decider: str | None = None


class DisaggProfileHandler:
    """``disagg-profile-handler`` (see module docstring)."""

    type_name: ClassVar[str] = "disagg-profile-handler"

    def __init__(
        self, name: str, stages: Stages, prefill_first: bool, where: str, configured_type: str = ""
    ) -> None:
        self.name = name
        self.stages = stages
        self.configured_type = configured_type or self.type_name
        """The type the config named (``pd-profile-handler`` for the alias): the metric's ``plugin_type``."""
        self.prefill_decider: PdDecider | None = None
        self.encode_decider: PdDecider | None = None
        self.prefill_first = prefill_first
        self.where = where
        self.report: DecisionReport | None = None

    def bind(self, plugins: Mapping[str, object]) -> None:
        self.prefill_decider = self._decider(plugins, self.stages.prefill_decider)
        self.encode_decider = self._decider(plugins, self.stages.encode_decider)

    def _decider(self, plugins: Mapping[str, object], name: str | None) -> PdDecider | None:
        if name is None:
            return None
        plugin = plugins.get(name)
        if not isinstance(plugin, PdDecider):
            raise config_error(
                f"{self.where}: decider {name!r} is not a defined decider plugin (types: "
                "always-disagg-pd-decider, prefix-based-pd-decider, always-disagg-multimodal-decider)"
            )
        return plugin

    def check(self, live: Sequence[str]) -> None:
        s = self.stages
        wanted = [s.decode]
        wanted += [s.prefill] if s.prefill_decider is not None else []
        wanted += [s.encode] if s.encode_decider is not None else []
        missing = [n for n in wanted if n not in live]
        if missing:
            raise ValueError(
                f"disagg-profile-handler {self.name}: no live scheduling profile named {', '.join(missing)} "
                f"(profiles: {', '.join(live) or 'none'})"
            )
        extra = sorted(set(live) - {s.decode, s.prefill, s.encode})
        if extra:
            raise ValueError(
                f"disagg-profile-handler {self.name}: profile(s) {', '.join(extra)} are not one of its "
                f"stages (decode {s.decode!r}, prefill {s.prefill!r}, encode {s.encode!r}); name them "
                "shadow-* to dark-launch them"
            )

    def run(
        self, profiles: Mapping[str, SchedulerProfile], ctx: CycleContext, candidates: list[Candidate]
    ) -> ProfileResult:
        s = self.stages
        prefill: ProfileResult | None = None
        encode: ProfileResult | None = None
        disagg_prefill = False
        if self.prefill_first:
            if self.prefill_decider is not None or s.prefill in profiles:
                prefill = self._optional(profiles, s.prefill, ctx, candidates)
            encode = self._encode(profiles, ctx, candidates, None)
        decode = profiles[s.decode].run(ctx, list(candidates))
        primary = decode.endpoints[0]
        if not self.prefill_first:
            encode = self._encode(profiles, ctx, candidates, primary)
        if self.prefill_first and self.prefill_decider is None:
            disagg_prefill = prefill is not None  # the reference's prefill-first: always, when it picked
        elif self.prefill_decider is not None and self.prefill_decider.disaggregate(ctx, primary):
            if prefill is None:
                prefill = self._optional(profiles, s.prefill, ctx, candidates)
            disagg_prefill = prefill is not None  # no prefill endpoint: the decode pod does it all
        headers: dict[str, str] = {}
        request_headers = ctx.request.headers
        if disagg_prefill and prefill is not None:
            headers[PREFILLER_HEADER] = prefill.endpoints[0].key
        elif PREFILLER_HEADER in request_headers:
            headers[PREFILLER_HEADER] = ""
        if encode is not None:
            headers[ENCODERS_HEADER] = ",".join(c.key for c in encode.endpoints)
        elif ENCODERS_HEADER in request_headers:
            headers[ENCODERS_HEADER] = ""
        if self.report is not None:
            self.report(ctx.request.target_model, decision_type(encode is not None, disagg_prefill))
        others = {r.profile: r for r in (prefill, encode) if r is not None}
        return replace(decode, headers=headers, others=others)

    def _encode(
        self,
        profiles: Mapping[str, SchedulerProfile],
        ctx: CycleContext,
        candidates: list[Candidate],
        decode: Candidate | None,
    ) -> ProfileResult | None:
        """The encode pick when the encode decider wants it and an encoder is there (else the decode pod
        encodes itself, as the reference does)."""
        if self.encode_decider is None or not self.encode_decider.disaggregate(ctx, decode):
            return None
        return self._optional(profiles, self.stages.encode, ctx, candidates)

    @staticmethod
    def _optional(
        profiles: Mapping[str, SchedulerProfile], name: str, ctx: CycleContext, candidates: list[Candidate]
    ) -> ProfileResult | None:
        try:
            return profiles[name].run(ctx, list(candidates))
        except NoEndpoints:
            return None


def _disagg(configured_type: str) -> Factory:
    def create(name: str, p: Params, deps: PluginDeps) -> DisaggProfileHandler:
        profiles = p.section("profiles")
        decode = profiles.text("decode", p.text("decodeProfile", "decode"))
        prefill = profiles.text("prefill", p.text("prefillProfile", "prefill"))
        encode = profiles.text("encode", p.text("encodeProfile", "encode"))
        profiles.done()
        deciders = p.section("deciders")
        prefill_decider = deciders.text("prefill", "")
        encode_decider = deciders.text("encode", "")
        deciders.done()
        legacy_encode = p.text("encodeDeciderPluginName", "")
        legacy = p.text("prefillDeciderPluginName", "") or None
        legacy = p.text("deciderPluginName", "") or legacy
        for ignored in ("prefixPluginType", "prefixPluginName"):
            p.text(ignored, "")
        p.integer("primaryPort", 0)
        order = p.text("stageOrder", "decode-first", choices=("decode-first", "prefill-first"))
        p.done()
        stages = Stages(
            decode, prefill, encode, prefill_decider or legacy, encode_decider or legacy_encode or None
        )
        return DisaggProfileHandler(name, stages, order == "prefill-first", p.where, configured_type)

    return create


def _prefix_decider(name: str, p: Params, deps: PluginDeps) -> PrefixBasedDecider:
    d = PrefixBasedDecider(
        name, p.integer("nonCachedTokens", 0, minimum=0), p.integer("promptTokens", 0, minimum=0)
    )
    p.done()
    return d


def _always(name: str, p: Params, deps: PluginDeps) -> AlwaysDisagg:
    p.done()
    return AlwaysDisagg(name)


def _multimodal(name: str, p: Params, deps: PluginDeps) -> AlwaysDisaggMultimodal:
    p.done()
    return AlwaysDisaggMultimodal(name)


def _stage_filter(cls: type[_StageFilter]) -> Factory:
    def create(name: str, p: Params, deps: PluginDeps) -> _StageFilter:
        p.done()
        return cls(name)

    return create


FACTORIES: dict[str, Factory] = {
    "disagg-profile-handler": _disagg("disagg-profile-handler"),
    "pd-profile-handler": _disagg("pd-profile-handler"),
    "always-disagg-pd-decider": _always,
    "prefix-based-pd-decider": _prefix_decider,
    "always-disagg-multimodal-decider": _multimodal,
    "prefill-filter": _stage_filter(PrefillFilter),
    "decode-filter": _stage_filter(DecodeFilter),
    "encode-filter": _stage_filter(EncodeFilter),
}
