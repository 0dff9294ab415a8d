"""Model Server Protocol metrics: the snapshot the scorers read, and a cheap parser for it.

The picker needs five things from each model server's Prometheus page (reference spec 003):
queue length, running requests, KV-cache utilisation, LoRA adapter info and the cache configuration.
Each engine names them differently; an :class:`EngineMapping` says where to find each one.

Parsing is deliberately narrow: for every wanted family we ``bytes.find`` the family name at the start of a
line and read only the lines of that family, so the cost scales with the number of families we read, not with
the size of the page (a vLLM page with all its histograms is tens of kilobytes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from inferoute.errors import InferouteError


@dataclass(frozen=True, slots=True)
class EndpointMetrics:
    """One scrape of one endpoint. Immutable: the collector swaps whole snapshots."""

    waiting: float = 0.0
    """TotalQueuedRequests."""
    running: float = 0.0
    """TotalRunningRequests."""
    kv_usage: float = 0.0
    """KVCacheUtilization as a fraction in [0, 1]."""
    active_adapters: frozenset[str] = field(default_factory=frozenset)
    waiting_adapters: frozenset[str] = field(default_factory=frozenset)
    max_lora: int = 0
    block_size: int | None = None
    """Tokens per KV block (``cache_config_info``), when the server reports it."""
    num_gpu_blocks: int | None = None
    scraped_at: float = 0.0
    """Clock time of the scrape that produced this snapshot."""


EMPTY_METRICS = EndpointMetrics()


@dataclass(frozen=True, slots=True)
class EngineMapping:
    """Where one engine reports each Model Server Protocol metric.

    A metric spec is ``family`` or ``family{label="value"}`` (the series with that label value).
    """

    name: str
    waiting: str
    running: str
    kv_usage: str
    lora_info: str | None
    cache_info: str | None
    block_size_label: str
    num_blocks_label: str
    block_size_metric: str | None = None
    num_blocks_metric: str | None = None


ENGINES: dict[str, EngineMapping] = {
    "vllm": EngineMapping(
        name="vllm",
        waiting="vllm:num_requests_waiting",
        running="vllm:num_requests_running",
        kv_usage="vllm:kv_cache_usage_perc",
        lora_info="vllm:lora_requests_info",
        cache_info="vllm:cache_config_info",
        block_size_label="block_size",
        num_blocks_label="num_gpu_blocks",
    ),
    "sglang": EngineMapping(
        name="sglang",
        waiting="sglang:num_queue_reqs",
        running="sglang:num_running_reqs",
        kv_usage="sglang:token_usage",
        lora_info=None,
        cache_info="sglang:cache_config_info",
        block_size_label="page_size",
        num_blocks_label="num_pages",
    ),
    "trtllm-serve": EngineMapping(
        name="trtllm-serve",
        waiting="trtllm_num_requests_waiting",
        running="trtllm_num_requests_running",
        kv_usage="trtllm_kv_cache_utilization",
        lora_info=None,
        cache_info=None,
        block_size_label="",
        num_blocks_label="",
        block_size_metric="trtllm_kv_cache_tokens_per_block",
        num_blocks_metric="trtllm_kv_cache_max_blocks",
    ),
    "triton-trtllm": EngineMapping(
        name="triton-trtllm",
        waiting='nv_trt_llm_request_metrics{request_type="waiting"}',
        running='nv_trt_llm_request_metrics{request_type="scheduled"}',
        kv_usage='nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction"}',
        lora_info=None,
        cache_info=None,
        block_size_label="",
        num_blocks_label="",
        block_size_metric='nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="tokens_per"}',
        num_blocks_metric='nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max"}',
    ),
}

ENGINE_LABELS = ("inference.networking.k8s.io/engine-type", "llm-d.ai/engine-type")
"""Endpoint labels that select an engine mapping (GIE's and llm-d's spelling)."""


def engine_for(name: str) -> EngineMapping:
    """The mapping for an engine name; a config error names the valid choices."""
    try:
        return ENGINES[name]
    except KeyError:
        raise InferouteError(
            500, f"unknown engine {name!r}; valid: {', '.join(sorted(ENGINES))}", cause="config"
        ) from None


_LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True, slots=True)
class Sample:
    labels: dict[str, str]
    value: float


def find_family(page: bytes, family: str, *, labels: bool = True) -> list[Sample]:
    """All samples of ``family`` in an exposition-format ``page``.

    Finds the family's first sample line (skipping longer names that share the prefix, such as
    ``vllm:num_requests_waiting_by_reason``), then reads the following lines while they belong to the family:
    the exposition format keeps a family's samples together, so the rest of the page is never scanned.
    """
    name = family.encode()
    n = len(name)
    size = len(page)
    pos = 0
    while True:
        if pos == 0 and page.startswith(name):
            start = 0
        else:
            idx = page.find(b"\n" + name, pos)
            if idx < 0:
                return []
            start = idx + 1
        if page[start + n : start + n + 1] in (b"{", b" "):
            break
        pos = start + n
    out: list[Sample] = []
    while start < size:
        end = page.find(b"\n", start)
        if end < 0:
            end = size
        after = start + n
        nxt = page[after : after + 1]
        if not page.startswith(name, start) or nxt not in (b"{", b" "):
            break
        sample = _sample(page, after, end, nxt == b"{", labels)
        if sample is not None:
            out.append(sample)
        start = end + 1
    return out


def _sample(page: bytes, after: int, end: int, has_labels: bool, want_labels: bool) -> Sample | None:
    labels: dict[str, str] = {}
    if has_labels:
        close = page.rfind(b"}", after, end)
        if close < 0:
            return None
        if want_labels:
            labels = dict(_LABEL_RE.findall(page[after + 1 : close].decode("utf-8", "replace")))
        rest = page[close + 1 : end]
    else:
        rest = page[after:end]
    parts = rest.split()
    if not parts:
        return None
    try:
        return Sample(labels, float(parts[0]))
    except ValueError:
        return None


class ParseCache:
    """Per-endpoint memory of optional families the page lacks, so each scrape does not rescan the whole page
    looking for them (e.g. ``vllm:lora_requests_info`` on a server without LoRA); rechecked every
    ``recheck`` seconds."""

    __slots__ = ("absent", "recheck")

    def __init__(self, recheck: float = 1.0) -> None:
        self.recheck = recheck
        self.absent: dict[str, float] = {}

    def lookup(self, page: bytes, family: str, now: float) -> list[Sample]:
        until = self.absent.get(family)
        if until is not None and now < until:
            return []
        samples = find_family(page, family)
        if samples:
            self.absent.pop(family, None)
        else:
            self.absent[family] = now + self.recheck
        return samples


def _split_spec(spec: str) -> tuple[str, dict[str, str]]:
    family, brace, rest = spec.partition("{")
    if not brace:
        return family, {}
    return family, dict(_LABEL_RE.findall(rest.rstrip("}")))


def _value(page: bytes, spec: str) -> float | None:
    family, want = _split_spec(spec)
    samples = find_family(page, family, labels=bool(want))
    if want:
        samples = [s for s in samples if all(s.labels.get(k) == v for k, v in want.items())]
    if not samples:
        return None
    # Several series (e.g. one per model_name): queue and running add up, utilisation takes the max.
    return sum(s.value for s in samples) if len(samples) > 1 else samples[0].value


def _adapters(raw: str) -> frozenset[str]:
    return frozenset(a.strip() for a in raw.split(",") if a.strip())


def _int_label(labels: dict[str, str], key: str) -> int | None:
    try:
        return int(float(labels[key]))
    except (KeyError, ValueError):
        return None


class MetricsParseError(ValueError):
    """The page lacks a required family (queue, running or KV usage)."""


def parse_metrics(
    page: bytes, engine: EngineMapping, now: float, cache: ParseCache | None = None
) -> EndpointMetrics:
    """Read an :class:`EndpointMetrics` snapshot from a Prometheus text page.

    Raises :class:`MetricsParseError` when a required family is missing (the endpoint then counts as a failed
    scrape). Optional families (LoRA, cache config) default to "unknown"; with a ``cache`` their absence is
    remembered for a second.
    """
    optional = cache.lookup if cache is not None else (lambda p, f, t: find_family(p, f))
    waiting = _value(page, engine.waiting)
    running = _value(page, engine.running)
    kv_family, kv_want = _split_spec(engine.kv_usage)
    kv_samples = [
        s
        for s in find_family(page, kv_family, labels=bool(kv_want))
        if all(s.labels.get(k) == v for k, v in kv_want.items())
    ]
    missing = [
        spec
        for spec, got in ((engine.waiting, waiting), (engine.running, running), (engine.kv_usage, kv_samples))
        if got is None or got == []
    ]
    if missing:
        raise MetricsParseError(f"missing metric(s) {', '.join(missing)} for engine {engine.name}")
    assert waiting is not None and running is not None
    kv = max(s.value for s in kv_samples)
    if kv > 1.0:  # some engines report a percentage
        kv = kv / 100.0

    active: frozenset[str] = frozenset()
    pending: frozenset[str] = frozenset()
    max_lora = 0
    if engine.lora_info:
        lora = optional(page, engine.lora_info, now)
        if lora:
            newest = max(lora, key=lambda s: s.value)  # the value is a timestamp: newest series wins
            active = _adapters(newest.labels.get("running_lora_adapters", ""))
            pending = _adapters(newest.labels.get("waiting_lora_adapters", ""))
            max_lora = _int_label(newest.labels, "max_lora") or 0

    block_size: int | None = None
    num_blocks: int | None = None
    if engine.cache_info:
        info = optional(page, engine.cache_info, now)
        if info:
            block_size = _int_label(info[0].labels, engine.block_size_label)
            num_blocks = _int_label(info[0].labels, engine.num_blocks_label)
    if engine.block_size_metric:
        v = _value(page, engine.block_size_metric)
        block_size = int(v) if v else None
    if engine.num_blocks_metric:
        v = _value(page, engine.num_blocks_metric)
        num_blocks = int(v) if v else None

    return EndpointMetrics(
        waiting=waiting,
        running=running,
        kv_usage=min(max(kv, 0.0), 1.0),
        active_adapters=active,
        waiting_adapters=pending,
        max_lora=max_lora,
        block_size=block_size if block_size and block_size > 0 else None,
        num_gpu_blocks=num_blocks if num_blocks and num_blocks > 0 else None,
        scraped_at=now,
    )
