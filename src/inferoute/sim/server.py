"""The asyncio shell: one aiohttp server per replica around one :class:`~inferoute.sim.engine.Engine`.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (JSON or SSE), ``GET /v1/models``,
``POST /tokenize``, ``POST /v1/completions/render`` and ``/v1/chat/completions/render`` (the token ids the
engine would run, for a picker that tokenizes through the server as llm-d does), ``POST /reset_prefix_cache``,
``GET /health``, ``GET /metrics``.

With KV events enabled, replica ``i`` is data-parallel rank ``i`` of the configured publisher (ports offset by
``i``) and the timer callback publishes the event batches of the steps it completed
(:mod:`inferoute.sim.kvpublish`). The replica's :class:`Endpoint` then carries its connectable event
addresses in the labels :data:`KV_EVENTS_LABEL` and :data:`KV_REPLAY_LABEL`.

Per replica there is exactly one timer, armed at ``engine.next_event_time()``. When it fires the shell calls
``engine.advance(now)`` and hands each request that progressed to its :class:`_Stream`: a streaming response
already under way gets its new tokens written straight onto its transport from the callback; other handlers
are woken once (first write, or completion). Nothing sleeps or wakes per token per request.

Error statuses (all with an OpenAI-style body from :mod:`inferoute.errors`, logged at debug level and counted
in ``inferoute_sim:errors_total{cause}``): invalid JSON / fields / batched prompts -> 400, unknown model ->
404, prompt over the context length -> 400, waiting queue full -> 429, injected failures -> 500 or 503,
unknown path -> 404, wrong method -> 405. Every response carries ``x-inference-pod`` and
``x-inference-port``. A client that disconnects aborts its request (its KV blocks are freed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from inferoute.endpoints import Endpoint
from inferoute.errors import InferouteError, error_body
from inferoute.kvevents.config import KV_EVENTS_LABEL, KV_REPLAY_LABEL
from inferoute.sim.config import SimConfig
from inferoute.sim.engine import Engine, SimRequest
from inferoute.sim.kvpublish import KVEventPublisher
from inferoute.sim.metrics import EngineCollector, MetricsPage, engine_fingerprint
from inferoute.sim.protocol import (
    DONE,
    ResponseWriter,
    models_body,
    new_id,
    parse_chat,
    parse_completion,
    parse_tokenize,
)
from inferoute.sim.tokenizer import Tokenizer

log = logging.getLogger(__name__)

POD_HEADER = "x-inference-pod"
PORT_HEADER = "x-inference-port"
FORCE_STATUS_HEADER = "x-sim-force-status"
_JSON = "application/json"


class _Stream:
    """Per-request link between the timer callback and the handler.

    A streamed response has two phases. The handler makes the first body write through aiohttp (which sends
    the response head with it). From then on the timer callback writes each new token straight onto the
    transport, framed as an HTTP/1.1 chunk (aiohttp's writer is in chunked mode, so the handler's final
    ``write_eof`` adds the terminating chunk): no task switch and no future per token. The handler only
    wakes again when the request is done. Non-streamed requests wake their handler once, at the end.
    """

    __slots__ = (
        "include_usage",
        "req",
        "schedule",
        "sent",
        "streaming",
        "times",
        "transport",
        "waiter",
        "writer",
    )

    def __init__(self, req: SimRequest, writer: ResponseWriter, streaming: bool, include_usage: bool) -> None:
        self.req = req
        self.writer = writer
        self.streaming = streaming
        self.include_usage = include_usage
        self.schedule = writer.schedule
        self.sent = 0
        self.waiter: asyncio.Future[None] | None = None
        self.times: list[float] = []
        self.transport: asyncio.Transport | None = None

    def wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def wait(self) -> None:
        self.waiter = asyncio.get_running_loop().create_future()
        await self.waiter

    def flush(self) -> None:
        """The engine produced tokens for this request (called from the timer callback, once per wake-up,
        after every due step was applied, so ``times`` holds a stamp for every generated token)."""
        transport = self.transport
        if transport is not None:
            req = self.req
            sent = self.sent
            if req.generated == sent + 1 and not req.done and not self.schedule:  # the common case
                self.sent = sent + 1
                data = self.writer.token_chunk(sent, None)
            else:
                data = self.render()
            if data and not transport.is_closing():
                transport.write(b"%x\r\n%b\r\n" % (len(data), data))
            if self.req.done:
                self.wake()
        elif self.streaming or self.req.done:
            self.wake()

    def render(self) -> bytes:
        """SSE bytes for the tokens not sent yet, and the end of the stream when the request is done.

        With ``emit_schedule`` each token carries its scheduled time and the time of this call.
        """
        req, writer = self.req, self.writer
        n = req.generated
        parts: list[bytes] = []
        if self.sent == 0 and writer.chat and (n or req.done):
            parts.append(writer.role_chunk())
        last = n - 1 if req.done else -1
        reason = req.finish_reason
        if self.schedule:
            times = self.times
            now = time.monotonic()
            for i in range(self.sent, n):
                parts.append(writer.token_chunk(i, reason if i == last else None, times[i], now))
        else:
            for i in range(self.sent, n):
                parts.append(writer.token_chunk(i, reason if i == last else None))
        self.sent = n
        if req.done:
            if self.include_usage:
                parts.append(writer.usage_chunk(req.prompt_len, n, req.cached_tokens))
            parts.append(DONE)
        return b"".join(parts)


class _ProtocolLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's per-connection logger, with malformed requests (e.g. the HTTP/2 preface a router sends to
    probe for gRPC) logged at debug level instead of as tracebacks; real handler failures stay errors."""

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        if isinstance(exc_info, HttpProcessingError):
            self.debug(msg, *args, **kwargs)
            return
        self.error(msg, *args, exc_info=exc_info, **kwargs)


class _ErrorCollector(Collector):
    def __init__(self, counts: Counter[str], model: str) -> None:
        self._counts = counts
        self._model = model

    def collect(self) -> list[Metric]:
        c = CounterMetricFamily(
            "inferoute_sim:errors", "Error responses by cause.", labels=["model_name", "cause"]
        )
        for cause, n in sorted(self._counts.items()):
            c.add_metric([self._model, cause], n)
        return [c]


class Replica:
    """One simulated model server: engine + HTTP app, bound to one listening socket."""

    def __init__(self, config: SimConfig, name: str, sock: socket.socket, index: int = 0) -> None:
        self.config = config
        self.name = name
        self.engine = Engine(config)
        self._sock = sock
        self.host, self.port = sock.getsockname()[:2]
        self._tokenizer = Tokenizer()
        self._rng = random.Random(f"{config.seed}:{index}:failures")
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._runner: web.AppRunner | None = None
        self._errors: Counter[str] = Counter()
        self.metrics_registry = CollectorRegistry(auto_describe=False)  # all but the LoRA info: MetricsPage
        self.metrics_registry.register(EngineCollector(self.engine, lora_info=False))
        self.metrics_registry.register(_ErrorCollector(self._errors, config.model))
        engine, errors = self.engine, self._errors
        self.metrics_page = MetricsPage(
            engine, self.metrics_registry, lambda: (engine_fingerprint(engine), tuple(errors.items()))
        )
        self._headers = {POD_HEADER: name, PORT_HEADER: str(self.port)}
        self._models = models_body(config.model, config.lora_adapters, config.max_model_len, int(time.time()))
        self._served = frozenset(config.served_models)
        self._schedule = config.emit_schedule
        self.kv_events: KVEventPublisher | None = None
        if config.kv_events.enabled:
            self.kv_events = KVEventPublisher(
                config.kv_events.for_rank(index),
                config.kv_events.topic_for(name, config.model),
                dp_rank=index,
                legacy=config.legacy_kv_events,
            )

    @property
    def endpoint(self) -> Endpoint:
        """This replica as a pool member (``name``, listening address and port, ``extra_labels``, and the
        KV-event addresses when it publishes)."""
        labels = dict(self.config.extra_labels)
        pub = self.kv_events
        if pub is not None:
            labels[KV_EVENTS_LABEL] = _connectable(pub.endpoint, self.host)
            if pub.replay_endpoint:
                labels[KV_REPLAY_LABEL] = _connectable(pub.replay_endpoint, self.host)
        return Endpoint(self.name, self.host, self.port, labels)

    # -- lifecycle ------------------------------------------------------------------------------------
    def make_app(self) -> web.Application:
        """The aiohttp application of this replica (routes, error middleware, pod headers)."""
        app = web.Application(middlewares=[self._error_middleware], client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/v1/models", self._list_models)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_post("/v1/completions/render", self._render_completion)
        app.router.add_post("/v1/chat/completions/render", self._render_chat)
        app.router.add_post("/reset_prefix_cache", self._reset_prefix_cache)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.on_response_prepare.append(self._add_headers)
        return app

    async def start(self) -> None:
        """Serve on the bound socket (and open the KV-event sockets)."""
        if self.kv_events is not None:
            await self.kv_events.start()
        self._runner = web.AppRunner(
            self.make_app(),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=0.5,
            handler_cancellation=True,
            logger=_ProtocolLogger(logging.getLogger("inferoute.sim.http"), {}),
        )
        await self._runner.setup()
        await web.SockSite(self._runner, self._sock).start()

    async def aclose(self) -> None:
        """Stop the timer, close connections (in-flight requests are cut) and the listening socket."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._sock.close()
        if self.kv_events is not None:
            await self.kv_events.aclose()

    # -- engine clock ---------------------------------------------------------------------------------
    def _arm(self) -> None:
        """Keep the single timer at the engine's next event time."""
        t = self.engine.next_event_time()
        if t is None or (self._timer is not None and self._timer_at is not None and self._timer_at <= t):
            return
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer_at = t
        self._timer = loop.call_later(max(0.0, t - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        try:
            self._step_due()
        except Exception:  # a bug in the engine must not silently stall the replica forever
            log.exception("%s: engine step failed", self.name)
            self._errors["engine-error"] += 1
        self._arm()

    def _step_due(self) -> None:
        results = self.engine.advance(time.monotonic())
        self._publish_events()
        if len(results) == 1:
            self._deliver(results[0].at, results[0].progressed, flush=True)
        elif results:  # the timer was late: several steps came due at once; deliver each request once
            touched: dict[SimRequest, None] = {}
            for result in results:
                self._deliver(result.at, result.progressed, flush=False)
                touched.update(dict.fromkeys(result.progressed))
            for req in touched:
                link = req.tag
                assert isinstance(link, _Stream)
                link.flush()

    def _publish_events(self) -> None:
        batches = self.engine.take_event_batches()
        if self.kv_events is not None:
            for events in batches:
                self.kv_events.publish(events)

    def _deliver(self, at: float, progressed: list[SimRequest], flush: bool) -> None:
        """Stamp each progressed request's new token with ``at`` (and flush it to its client)."""
        schedule = self._schedule
        for req in progressed:
            link = req.tag
            assert isinstance(link, _Stream)
            if schedule:
                link.times.append(at)
            if flush:
                link.flush()

    # -- HTTP -----------------------------------------------------------------------------------------
    async def _add_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers.update(self._headers)

    @web.middleware
    async def _error_middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except InferouteError as exc:
            self._errors[exc.cause] += 1
            log.debug("%s %s -> %s", self.name, request.path, exc)
            return web.Response(status=exc.status, body=exc.body(), content_type=_JSON)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            cause = "not-found" if exc.status == 404 else f"http-{exc.status}"
            self._errors[cause] += 1
            msg = f"{exc.reason}: {request.method} {request.path}"
            return web.Response(status=exc.status, body=error_body(exc.status, msg), content_type=_JSON)

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _list_models(self, request: web.Request) -> web.Response:
        return web.Response(body=self._models, content_type=_JSON)

    async def _tokenize(self, request: web.Request) -> web.Response:
        """vLLM's ``/tokenize``: the simulator's token ids for a prompt or chat (see ``sim.tokenizer``)."""
        model, prompt = parse_tokenize(await request.read())
        if model is not None and model not in self._served:
            raise InferouteError(
                404, f"The model `{model}` does not exist.", cause="unknown-model", param="model"
            )
        tokens = self._tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        body = {
            "count": len(tokens),
            "max_model_len": self.config.max_model_len,
            "tokens": tokens,
            "token_strs": None,
        }
        return web.Response(body=msgspec.json.encode(body), content_type=_JSON)

    async def _render(self, request: web.Request, chat: bool) -> web.Response:
        """The prompt token ids of a completions or chat request, without running it."""
        raw = await request.read()
        if chat:
            body, prompt, _ = parse_chat(raw)
            model: str = body.model
            text: str | list[int] = prompt
        else:
            cbody, text, _ = parse_completion(raw)
            model = cbody.model
        if model not in self._served:
            raise InferouteError(
                404, f"The model `{model}` does not exist.", cause="unknown-model", param="model"
            )
        tokens = self._tokenizer.encode(text) if isinstance(text, str) else list(text)
        out = {"model": model, "prompt_token_ids": tokens, "token_ids": tokens, "count": len(tokens)}
        return web.Response(body=msgspec.json.encode(out), content_type=_JSON)

    async def _render_completion(self, request: web.Request) -> web.Response:
        return await self._render(request, chat=False)

    async def _render_chat(self, request: web.Request) -> web.Response:
        return await self._render(request, chat=True)

    async def _reset_prefix_cache(self, request: web.Request) -> web.Response:
        """vLLM's ``/reset_prefix_cache``: 200, or 409 while requests hold KV blocks."""
        done = self.engine.reset_prefix_cache()
        self._publish_events()
        if not done:
            raise InferouteError(
                409, "The prefix cache cannot be reset while requests are running.", cause="busy"
            )
        return web.Response(status=200)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics_page.body(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self._preflight(request)
        body, text, max_tokens = parse_chat(await request.read())
        return await self._serve(
            request,
            True,
            body.model,
            text,
            max_tokens,
            body.ignore_eos,
            body.stream,
            bool(body.stream_options and body.stream_options.include_usage),
        )

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        self._preflight(request)
        body, prompt, max_tokens = parse_completion(await request.read())
        return await self._serve(
            request,
            False,
            body.model,
            prompt,
            max_tokens,
            body.ignore_eos,
            body.stream,
            bool(body.stream_options and body.stream_options.include_usage),
        )

    def _preflight(self, request: web.Request) -> None:
        cfg = self.config
        if cfg.allow_forced_errors:
            forced = request.headers.get(FORCE_STATUS_HEADER)
            if forced is not None:
                try:
                    status = int(forced)
                except ValueError:
                    status = 0
                if not 400 <= status <= 599:
                    raise InferouteError(
                        400,
                        f"{FORCE_STATUS_HEADER} must be a status 400-599, got {forced!r}",
                        cause="invalid-request",
                    )
                raise InferouteError(
                    status, f"Forced failure ({FORCE_STATUS_HEADER}: {status}).", cause="forced"
                )
        if cfg.failure_rate and self._rng.random() < cfg.failure_rate:
            status = 500 if self._rng.random() < 0.5 else 503
            raise InferouteError(status, "Injected failure (--failure-rate).", cause=f"injected-{status}")

    async def _serve(
        self,
        request: web.Request,
        chat: bool,
        model: str,
        prompt: str | list[int],
        max_tokens: int | None,
        ignore_eos: bool,
        stream: bool,
        include_usage: bool,
    ) -> web.StreamResponse:
        if model not in self._served:
            raise InferouteError(
                404, f"The model `{model}` does not exist.", cause="unknown-model", param="model"
            )
        engine = self.engine
        tokens = self._tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        max_tokens = engine.check_lengths(len(tokens), max_tokens)
        output = engine.plan_output(tokens, max_tokens, ignore_eos)
        rid = new_id("chatcmpl" if chat else "cmpl", request.headers.get("x-request-id"))
        text_seed = (len(tokens) * 31 + self.config.seed) & 0xFFFF
        req = SimRequest(
            rid,
            model,
            tokens,
            output,
            max_tokens,
            lora=None if model == self.config.model else model,
            output_seed=text_seed,
        )
        writer = ResponseWriter(chat, rid, model, text_seed=text_seed, schedule=self._schedule)
        link = _Stream(req, writer, stream, include_usage)
        req.tag = link
        engine.submit(req, time.monotonic())
        self._arm()
        try:
            if stream:
                return await self._stream(request, link)
            while not req.done:
                await link.wait()
            return web.Response(
                body=writer.full_response(
                    req.generated, req.finish_reason or "stop", req.prompt_len, req.cached_tokens
                ),
                content_type=_JSON,
            )
        finally:
            if not req.done:
                engine.abort(req, time.monotonic())
                self._errors["client-disconnect"] += 1
                self._arm()

    async def _stream(self, request: web.Request, link: _Stream) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        req = link.req
        # Direct writes frame HTTP/1.1 chunks themselves: only when aiohttp chose chunked encoding.
        transport = request.transport
        direct = response.headers.get("Transfer-Encoding") == "chunked" and transport is not None
        try:
            while True:
                while req.generated == link.sent and not req.done:
                    await link.wait()
                data = link.render()
                if not req.done and direct:
                    # aiohttp puts these bytes (and the response head) on the transport before its first
                    # await, so from here on the timer callback may append chunks directly (see _Stream).
                    link.transport = transport
                    await response.write(data)
                    while not req.done:
                        await link.wait()
                    break
                await response.write(data)
                if req.done:
                    break
            await response.write_eof()
        except ConnectionResetError:
            log.debug("%s: client went away during %s", self.name, req.request_id)  # `_serve` aborts it
        return response


def _connectable(endpoint: str, host: str) -> str:
    """A bound ZMQ address others can dial: a wildcard host becomes the replica's own address."""
    for wildcard in ("tcp://0.0.0.0:", "tcp://*:", "tcp://[::]:"):
        if endpoint.startswith(wildcard):
            h = f"[{host}]" if ":" in host else host
            return f"tcp://{h}:{endpoint[len(wildcard) :]}"
    return endpoint


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class SimPool:
    """N independent replicas served from this process (``async with await SimPool.start(...) as pool``)."""

    def __init__(self, replicas: list[Replica]) -> None:
        self.replicas = replicas

    @classmethod
    async def start(
        cls,
        config: SimConfig | Sequence[SimConfig] | None = None,
        replicas: int = 1,
        host: str = "127.0.0.1",
        base_port: int = 0,
        name_prefix: str = "sim",
    ) -> SimPool:
        """Bind and start ``replicas`` replicas: on ports ``base_port..base_port+N-1``, or on free ports
        chosen by the OS when ``base_port`` is 0. Replica ``i`` is named ``f"{name_prefix}-{i}"``.

        ``config`` may be one config for all, or one per replica (a heterogeneous pool, e.g. one slow
        replica: ``[SimConfig(), SimConfig(step_base_s=0.05)]``); its length then sets the replica count.
        """
        if replicas < 1:
            raise ValueError("replicas must be >= 1")
        if config is None:
            configs = [SimConfig()] * replicas
        elif isinstance(config, SimConfig):
            configs = [config] * replicas
        else:
            configs = list(config)
            if replicas not in (1, len(configs)) or not configs:
                raise ValueError(f"{len(configs)} configs for {replicas} replicas")
            replicas = len(configs)
        socks: list[socket.socket] = []
        try:
            for i in range(replicas):
                socks.append(_bind(host, base_port + i if base_port else 0))
        except BaseException:
            for s in socks:
                s.close()
            raise
        pool = cls(
            [
                Replica(c, f"{name_prefix}-{i}", s, i)
                for i, (c, s) in enumerate(zip(configs, socks, strict=True))
            ]
        )
        try:
            for r in pool.replicas:
                await r.start()
        except BaseException:
            await pool.aclose()
            raise
        return pool

    @property
    def endpoints(self) -> list[Endpoint]:
        """One :class:`~inferoute.endpoints.Endpoint` per replica, in replica order."""
        return [r.endpoint for r in self.replicas]

    @property
    def urls(self) -> list[str]:
        """``http://host:port`` of each replica."""
        return [f"http://{r.endpoint.key}" for r in self.replicas]

    async def aclose(self) -> None:
        """Stop every replica (idempotent)."""
        for r in self.replicas:
            with contextlib.suppress(Exception):
                await r.aclose()

    async def __aenter__(self) -> SimPool:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
