"""Open-loop streaming load generator for OpenAI-style endpoints.

Theory of operation: a plan (``PlannedRequest`` list, see :mod:`inferoute.bench.workloads`) fixes
every request's body and arrival offset. :func:`run_plan` starts each request at its offset whatever
happened to the earlier ones (open loop — a slow server gets more concurrent requests, as in production;
a closed loop would hide queueing). Each response is read as a server-sent event stream; a pure
:class:`StreamRecorder` turns ``(time, event)`` pairs into a :class:`RequestResult`: time to first token,
inter-token gaps, end-to-end latency, output/prompt/cached tokens (from the final ``usage`` chunk,
``usage.prompt_tokens_details.cached_tokens``), the replica that served it (``x-inference-pod`` header)
and, on failure, the status and error kind.

The generator also records its own lateness (``send_lag``: actual start - planned start), so a saturated load
generator is visible in the results instead of silently turning the run into a closed loop.

Reusable by any benchmark::

    results = await run_plan("http://127.0.0.1:8080", plan, clock=SystemClock())

Several base URLs (router replicas behind one address, the way every production deployment runs them) get
the requests spread per request as an L4 load balancer spreads connections (:func:`l4_spread`: seeded, so
every contender sees the same assignment); each result records which one it went to (``router``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from inferoute.bench.workloads import PlannedRequest
from inferoute.clock import Clock, SystemClock

log = logging.getLogger(__name__)

SERVED_BY_HEADERS = ("x-inference-pod", "x-gateway-destination-endpoint-served", "x-served-by")


@dataclass(slots=True)
class RequestResult:
    """What happened to one request. Times are seconds relative to the run start."""

    index: int
    group: str
    model: str
    scheduled: float
    sent: float = float("nan")
    first_token: float | None = None
    finished: float | None = None
    status: int = 0
    error: str | None = None
    """None on success; else a short kind: ``http-<status>``, ``timeout``, ``connect``, ``stream``,
    ``empty``."""
    error_message: str = ""
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    chunks: int = 0
    itl_sum: float = 0.0
    itl_max: float = 0.0
    itls: list[float] = field(default_factory=list)
    served_by: str = ""
    router: int = 0
    """Which of the run's base URLs (router replicas) the request was sent to."""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.sent

    @property
    def e2e(self) -> float | None:
        return None if self.finished is None else self.finished - self.sent

    @property
    def send_lag(self) -> float:
        return self.sent - self.scheduled

    @property
    def mean_itl(self) -> float | None:
        gaps = len(self.itls)
        return self.itl_sum / gaps if gaps else None

    def row(self) -> dict[str, Any]:
        """A flat record for CSV/JSON (no per-token lists)."""
        return {
            "index": self.index,
            "group": self.group,
            "model": self.model,
            "scheduled": round(self.scheduled, 6),
            "sent": round(self.sent, 6),
            "status": self.status,
            "error": self.error or "",
            "ttft": _r(self.ttft),
            "e2e": _r(self.e2e),
            "mean_itl": _r(self.mean_itl),
            "max_itl": round(self.itl_max, 6),
            "output_tokens": self.output_tokens,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "served_by": self.served_by,
            "router": self.router,
            "send_lag": round(self.send_lag, 6),
        }


def _r(value: float | None) -> float | str:
    return "" if value is None else round(value, 6)


class SseDecoder:
    """Incremental server-sent-events decoder: bytes in, ``data:`` payloads out (pure)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        while True:
            end, sep = _event_end(self._buf)
            if end < 0:
                return out
            event, self._buf = self._buf[:end], self._buf[end + sep :]
            payload = [line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")]
            if payload:
                out.append(b"\n".join(payload))

    def flush(self) -> list[bytes]:
        """Payloads of a final event not terminated by a blank line."""
        rest, self._buf = self._buf, b""
        return self.feed(rest + b"\n\n") if rest.strip() else []


def _event_end(buf: bytes) -> tuple[int, int]:
    best, size = -1, 0
    for sep in (b"\n\n", b"\r\n\r\n"):
        i = buf.find(sep)
        if i >= 0 and (best < 0 or i < best):
            best, size = i, len(sep)
    return best, size


class StreamRecorder:
    """Turns the timed SSE payloads of one streamed completion into a :class:`RequestResult` (pure)."""

    __slots__ = ("_last_token", "result")

    def __init__(self, result: RequestResult) -> None:
        self.result = result
        self._last_token: float | None = None

    def on_payload(self, now: float, payload: bytes) -> None:
        if payload.strip() == b"[DONE]":
            return
        try:
            chunk = json.loads(payload)
        except ValueError:
            self.fail("stream", f"undecodable SSE payload: {payload[:80]!r}")
            return
        if not isinstance(chunk, dict):
            return
        if "error" in chunk:
            err = chunk["error"]
            self.fail("stream", str(err.get("message", err) if isinstance(err, dict) else err))
            return
        if _has_token(chunk):
            self._token(now)
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._usage(usage)

    def _token(self, now: float) -> None:
        r = self.result
        r.chunks += 1
        if self._last_token is None:
            r.first_token = now
        else:
            gap = now - self._last_token
            r.itls.append(gap)
            r.itl_sum += gap
            r.itl_max = max(r.itl_max, gap)
        self._last_token = now

    def _usage(self, usage: dict[str, Any]) -> None:
        r = self.result
        r.output_tokens = int(usage.get("completion_tokens") or 0)
        r.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict):
            r.cached_tokens = int(details.get("cached_tokens") or 0)

    def fail(self, kind: str, message: str) -> None:
        if self.result.error is None:
            self.result.error = kind
            self.result.error_message = message[:300]

    def finish(self, now: float) -> RequestResult:
        r = self.result
        r.finished = now
        if r.error is None and r.output_tokens == 0:
            r.output_tokens = r.chunks  # server sent no usage: count content chunks
        if r.error is None and r.first_token is None:
            self.fail("empty", "stream ended without a token")
        return r


def _has_token(chunk: dict[str, Any]) -> bool:
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return False
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        if choice.get("text"):
            return True
        delta = choice.get("delta")
        if isinstance(delta, dict) and (delta.get("content") or delta.get("reasoning_content")):
            return True
    return False


@dataclass(frozen=True, slots=True)
class LoadOptions:
    request_timeout: float = 120.0
    """Seconds for one whole request (connect to last byte) before it is recorded as ``timeout``."""
    headers: tuple[tuple[str, str], ...] = ()


def l4_spread(count: int, targets: int, seed: int) -> list[int]:
    """Which of ``targets`` router replicas each of ``count`` requests goes to: a uniform random choice per
    request from a generator seeded by ``seed`` alone, as a Kubernetes Service (kube-proxy) or another L4 load
    balancer spreads new connections over its backends. The same seed gives the same assignment, whatever
    the contender, so every contender's replicas see the same traffic."""
    if targets < 1:
        raise ValueError(f"need at least one target, got {targets}")
    if targets == 1:
        return [0] * count
    rng = random.Random(f"l4-spread:{seed}:{targets}")
    return [rng.randrange(targets) for _ in range(count)]


async def run_plan(
    base_url: str | Sequence[str],
    plan: Sequence[PlannedRequest],
    *,
    clock: Clock | None = None,
    options: LoadOptions | None = None,
    on_done: Callable[[RequestResult], None] | None = None,
    spread_seed: int = 0,
) -> list[RequestResult]:
    """Send ``plan`` open-loop to ``base_url`` and return one result per request, in plan order. With
    several base URLs (router replicas) each request goes to one of them, by :func:`l4_spread` with
    ``spread_seed``."""
    clock = clock or SystemClock()
    options = options or LoadOptions()
    urls = [base_url] if isinstance(base_url, str) else list(base_url)
    spread = l4_spread(len(plan), len(urls), spread_seed)
    connector = aiohttp.TCPConnector(limit=0, force_close=False, enable_cleanup_closed=True)
    timeout = aiohttp.ClientTimeout(total=options.request_timeout)
    results: list[RequestResult] = [
        RequestResult(p.index, p.group, p.model, p.at, router=spread[i]) for i, p in enumerate(plan)
    ]
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
        start = clock.now()

        async def one(i: int, planned: PlannedRequest) -> None:
            await _send(session, urls[spread[i]], planned, results[i], clock, start, options)
            if on_done is not None:
                on_done(results[i])

        async with asyncio.TaskGroup() as tg:
            for i, planned in enumerate(plan):
                delay = planned.at - (clock.now() - start)
                if delay > 0:
                    await asyncio.sleep(delay)
                tg.create_task(one(i, planned), name=f"loadgen:{planned.index}")
    return results


async def _send(
    session: aiohttp.ClientSession,
    base_url: str,
    planned: PlannedRequest,
    result: RequestResult,
    clock: Clock,
    start: float,
    options: LoadOptions,
) -> None:
    recorder = StreamRecorder(result)
    decoder = SseDecoder()
    headers = {"content-type": "application/json", **dict(options.headers), **dict(planned.headers)}
    result.sent = clock.now() - start
    try:
        async with session.post(
            base_url.rstrip("/") + planned.path, data=planned.body, headers=headers
        ) as resp:
            result.status = resp.status
            result.served_by = next((resp.headers[h] for h in SERVED_BY_HEADERS if h in resp.headers), "")
            if resp.status != 200:
                body = await resp.read()
                recorder.fail(f"http-{resp.status}", body[:300].decode(errors="replace"))
            else:
                async for data in resp.content.iter_any():
                    now = clock.now() - start
                    for payload in decoder.feed(data):
                        recorder.on_payload(now, payload)
                for payload in decoder.flush():
                    recorder.on_payload(clock.now() - start, payload)
    except TimeoutError:
        recorder.fail("timeout", f"no complete answer within {options.request_timeout}s")
    except aiohttp.ClientConnectionError as exc:
        recorder.fail("connect" if result.status == 0 else "stream", repr(exc))
    except aiohttp.ClientError as exc:
        recorder.fail("client", repr(exc))
    recorder.finish(clock.now() - start)
    if result.error is not None:
        log.debug("request %d failed: %s %s", planned.index, result.error, result.error_message)
