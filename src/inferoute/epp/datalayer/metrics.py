"""Model Server Protocol metrics: the snapshot the scorers read, and a cheap parser for it.

The picker needs five things from each model server's Prometheus page (reference spec 003):
queue length, running requests, KV-cache utilisation, LoRA adapter info and the cache configuration.
Each engine names them differently; an :class:`EngineMapping` says where to find each one.

Parsing is deliberately narrow: for every wanted family we ``bytes.find`` the family name at the start of a
line and read only the lines of that family, so the cost scales with the number of families we read, not with
the size of the page (a vLLM page with all its histograms is tens of kilobytes).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

from inferoute.errors import ConfigError


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


def restamp(m: EndpointMetrics, now: float) -> EndpointMetrics:
    """The same values scraped again at ``now`` (cheaper than :func:`dataclasses.replace`)."""
    return EndpointMetrics(
        m.waiting,
        m.running,
        m.kv_usage,
        m.active_adapters,
        m.waiting_adapters,
        m.max_lora,
        m.block_size,
        m.num_gpu_blocks,
        now,
    )


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
        raise ConfigError(f"unknown engine {name!r}; valid: {', '.join(sorted(ENGINES))}") from None


_LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True, slots=True)
class Sample:
    labels: dict[str, str]
    value: float


@dataclass(frozen=True, slots=True)
class _Spec:
    """A compiled metric spec: ``family`` or ``family{label="value",...}``."""

    text: str
    name: bytes
    line_start: bytes
    want: tuple[tuple[str, str], ...]


@functools.cache
def _compile(spec: str) -> _Spec:
    family, brace, rest = spec.partition("{")
    want = tuple(_LABEL_RE.findall(rest.rstrip("}"))) if brace else ()
    name = family.encode()
    return _Spec(spec, name, b"\n" + name, want)


def _first_line(page: bytes, spec: _Spec) -> int:
    """Offset of the family's first sample line, -1 when absent. Longer names sharing the prefix (such as
    ``vllm:num_requests_waiting_by_reason``) are skipped."""
    name = spec.name
    n = len(name)
    pos = 0
    while True:
        if pos == 0 and page.startswith(name):
            start = 0
        else:
            idx = page.find(spec.line_start, pos)
            if idx < 0:
                return -1
            start = idx + 1
        if page[start + n : start + n + 1] in (b"{", b" "):
            return start
        pos = start + n


def _samples(
    page: bytes, spec: _Spec, want_labels: bool, memo: dict[bytes, dict[str, str]] | None = None
) -> list[Sample]:
    """Samples of the family, read line by line from its first line while lines belong to it: the exposition
    format keeps a family's samples together, so the rest of the page is never scanned."""
    start = _first_line(page, spec)
    if start < 0:
        return []
    name = spec.name
    n = len(name)
    size = len(page)
    want = spec.want
    out: list[Sample] = []
    while start < size:
        end = page.find(b"\n", start)
        if end < 0:
            end = size
        after = start + n
        nxt = page[after : after + 1]
        if nxt not in (b"{", b" ") or not page.startswith(name, start):
            break
        start = end + 1
        labels: dict[str, str] = {}
        if nxt == b"{":
            close = page.rfind(b"}", after, end)
            if close < 0:
                continue
            if want_labels or want:
                raw = page[after + 1 : close]
                cached = memo.get(raw) if memo is not None else None
                if cached is None:
                    cached = dict(_LABEL_RE.findall(raw.decode("utf-8", "replace")))
                    if memo is not None:
                        if len(memo) > 64:
                            memo.clear()
                        memo[raw] = cached
                labels = cached
                if want and any(labels.get(k) != v for k, v in want):
                    continue
            rest = page[close + 1 : end]
        else:
            if want:
                continue
            rest = page[after:end]
        parts = rest.split(None, 1)
        if not parts:
            continue
        try:
            out.append(Sample(labels, float(parts[0])))
        except ValueError:
            continue
    return out


def _values(page: bytes, spec: _Spec, memo: dict[bytes, dict[str, str]] | None = None) -> list[float]:
    """Values of the family's series that match ``spec`` (:func:`_samples` without building samples or label
    dicts unless the spec filters on labels): the required gauges are read this way on every scrape."""
    want = spec.want
    if want:
        return [s.value for s in _samples(page, spec, False, memo)]
    start = _first_line(page, spec)
    if start < 0:
        return []
    name = spec.name
    n = len(name)
    size = len(page)
    out: list[float] = []
    while start < size:
        end = page.find(b"\n", start)
        if end < 0:
            end = size
        after = start + n
        nxt = page[after : after + 1]
        if nxt == b"{":
            value_at = page.rfind(b"}", after, end) + 1
            if value_at == 0:
                start = end + 1
                continue
        elif nxt == b" ":
            value_at = after
        else:
            break
        if not page.startswith(name, start):
            break
        start = end + 1
        parts = page[value_at:end].split(None, 1)
        if parts:
            try:
                out.append(float(parts[0]))
            except ValueError:
                continue
    return out


def find_family(page: bytes, family: str, *, labels: bool = True) -> list[Sample]:
    """All samples of ``family`` (a name, optionally with ``{label="value"}`` filters) in a text page."""
    return _samples(page, _compile(family), labels)


class ParseCache:
    """Per-endpoint memory that keeps repeated scrapes cheap.

    * Optional families the page lacks (e.g. ``vllm:lora_requests_info`` without LoRA) are not searched for
      again for ``recheck`` seconds: a miss scans the whole page.
    * Static families (the cache configuration) are re-read every ``static_refresh`` seconds, not on every
      scrape.
    """

    __slots__ = ("absent", "labels", "lora", "recheck", "static", "static_refresh")

    def __init__(self, recheck: float = 1.0, static_refresh: float = 10.0) -> None:
        self.recheck = recheck
        self.static_refresh = static_refresh
        self.absent: dict[str, float] = {}
        self.static: dict[str, tuple[float, list[Sample]]] = {}
        self.labels: dict[bytes, dict[str, str]] = {}
        """Parsed label sets by raw bytes (LoRA info changes its value every scrape, its labels rarely)."""
        self.lora: tuple[dict[str, str], frozenset[str], frozenset[str], int] | None = None
        """The newest LoRA series' label set (the memoised dict itself) and what was read from it."""

    def lookup(self, page: bytes, spec: str, now: float) -> list[Sample]:
        until = self.absent.get(spec)
        if until is not None and now < until:
            return []
        samples = _samples(page, _compile(spec), True, self.labels)
        if samples:
            self.absent.pop(spec, None)
        else:
            self.absent[spec] = now + self.recheck
        return samples

    def lookup_static(self, page: bytes, spec: str, now: float) -> list[Sample]:
        hit = self.static.get(spec)
        if hit is not None and now < hit[0]:
            return hit[1]
        samples = self.lookup(page, spec, now)
        self.static[spec] = (now + (self.static_refresh if samples else self.recheck), samples)
        return samples


def _value(samples: list[Sample]) -> float | None:
    # Several series (e.g. one per model_name): counts add up.
    if not samples:
        return None
    return samples[0].value if len(samples) == 1 else sum(s.value for s in samples)


@functools.lru_cache(maxsize=256)
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
    scrape). Optional families (LoRA, cache config) default to "unknown". A per-endpoint ``cache`` remembers
    missing optional families and re-reads static ones only every few seconds.
    """
    cache = cache or ParseCache(recheck=0.0, static_refresh=0.0)
    memo = cache.labels
    waiting_v = _values(page, _compile(engine.waiting), memo)
    running_v = _values(page, _compile(engine.running), memo)
    kv_v = _values(page, _compile(engine.kv_usage), memo)
    if not (waiting_v and running_v and kv_v):
        found = ((engine.waiting, waiting_v), (engine.running, running_v), (engine.kv_usage, kv_v))
        missing = [spec for spec, got in found if not got]
        raise MetricsParseError(f"missing metric(s) {', '.join(missing)} for engine {engine.name}")
    kv = kv_v[0] if len(kv_v) == 1 else max(kv_v)  # utilisation of several series: the fullest
    if kv > 1.0:  # some engines report a percentage
        kv = kv / 100.0

    active: frozenset[str] = frozenset()
    pending: frozenset[str] = frozenset()
    max_lora = 0
    if engine.lora_info:
        lora = cache.lookup(page, engine.lora_info, now)
        if lora:
            # the value is a timestamp: the newest series wins
            newest = lora[0] if len(lora) == 1 else max(lora, key=lambda s: s.value)
            seen = cache.lora
            if seen is not None and seen[0] is newest.labels:  # same label set as last scrape
                _, active, pending, max_lora = seen
            else:
                active = _adapters(newest.labels.get("running_lora_adapters", ""))
                pending = _adapters(newest.labels.get("waiting_lora_adapters", ""))
                max_lora = _int_label(newest.labels, "max_lora") or 0
                cache.lora = (newest.labels, active, pending, max_lora)

    block_size: int | None = None
    num_blocks: int | None = None
    if engine.cache_info:
        info = cache.lookup_static(page, engine.cache_info, now)
        if info:
            block_size = _int_label(info[0].labels, engine.block_size_label)
            num_blocks = _int_label(info[0].labels, engine.num_blocks_label)
    if engine.block_size_metric:
        v = _value(cache.lookup_static(page, engine.block_size_metric, now))
        block_size = int(v) if v else None
    if engine.num_blocks_metric:
        v = _value(cache.lookup_static(page, engine.num_blocks_metric, now))
        num_blocks = int(v) if v else None

    return EndpointMetrics(
        waiting=waiting_v[0] if len(waiting_v) == 1 else sum(waiting_v),
        running=running_v[0] if len(running_v) == 1 else sum(running_v),
        kv_usage=min(max(kv, 0.0), 1.0),
        active_adapters=active,
        waiting_adapters=pending,
        max_lora=max_lora,
        block_size=block_size if block_size and block_size > 0 else None,
        num_gpu_blocks=num_blocks if num_blocks and num_blocks > 0 else None,
        scraped_at=now,
    )
