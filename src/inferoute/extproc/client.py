"""GrpcPicker: the data-plane side of the Endpoint Picker Protocol, a :class:`~inferoute.picking.Picker`.

Per request it opens one ext_proc stream on a pooled channel and plays the proxy's part:

* ``full_duplex`` (what GIE EPPs require): request headers (``:method``, ``:path``, ``:authority``,
  ``x-request-id`` and the request's headers), then the body in chunks; the reply is the held headers
  mutation with the destination (``envoy.lb`` metadata preferred, the header must agree), then the echoed
  body, which becomes ``Destination.body`` when the picker changed it.
* ``buffered``: headers, then the whole body in one message; the decision rides on the body reply.
* ``headers_only``: headers with ``end_of_stream`` (seed 000's way; the picker sees no body).

An ImmediateResponse becomes :class:`~inferoute.picking.Reject`. Failures raise
:class:`~inferoute.picking.PickerError` -- ``timeout=True`` after ``timeout_ms``, else ``cause`` ``tls``,
``unavailable`` or ``protocol`` -- with the root cause (e.g. the TLS verification error) in the message.

The returned session reports the response phase on the same stream (response headers carrying
``envoy.lb/x-gateway-destination-endpoint-served``, body chunks, end) through a queue that feeds the gRPC
request iterator, so session calls never block; the stream is drained and closed when the session ends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Literal

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

from inferoute.extproc import messages as m
from inferoute.extproc.channel import ChannelOptions, ReloadingChannel
from inferoute.extproc.failures import no_answer, rpc_failure
from inferoute.picking import (
    DESTINATION_HEADER,
    EXT_PROC_SERVICE,
    Decision,
    Destination,
    NullSession,
    PickerError,
    PickRequest,
    PickSession,
    Reject,
)
from inferoute.tasks import TaskSet

__all__ = ["BodyMode", "ChannelOptions", "GrpcPicker"]

log = logging.getLogger(__name__)

BodyMode = Literal["full_duplex", "headers_only", "buffered"]
_SENT_CHUNK = 62_000
_DRAIN_TIMEOUT = 30.0
READY_TTL = 1.0


class _Metrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.enabled = registry is not None
        if registry is None:
            return
        c = Counter(
            "inferoute_picker_client_requests_total",
            "Picks asked over ext_proc, by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.destination = c.labels("destination")
        self.reject = c.labels("reject")
        self.errors = Counter(
            "inferoute_picker_client_errors_total",
            "Failed picks over ext_proc, by cause.",
            ["cause"],
            registry=registry,
        )
        self.seconds = Histogram(
            "inferoute_picker_client_pick_duration_seconds",
            "Round trip of a pick over ext_proc (send headers and body, receive the decision).",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=registry,
        )


class GrpcPicker:
    """A :class:`~inferoute.picking.Picker` that asks a remote EPP over ext_proc (see module docstring)."""

    def __init__(
        self,
        opts: ChannelOptions,
        *,
        timeout_ms: int = 200,
        body_mode: BodyMode = "full_duplex",
        header_name: str = DESTINATION_HEADER,
        registry: CollectorRegistry | None = None,
        chunk_size: int = 65_536,
        tls_reload_interval: float = 1.0,
    ) -> None:
        if body_mode not in ("full_duplex", "headers_only", "buffered"):
            raise ValueError(f"body_mode must be full_duplex, headers_only or buffered, not {body_mode!r}")
        self._opts = opts
        self._timeout = timeout_ms / 1000.0
        self._mode = body_mode
        self._header = header_name.lower()
        self._chunk = chunk_size
        self._channel = ReloadingChannel(opts, check_interval=tls_reload_interval)
        self._ready = True  # so the first failed probe is logged
        self._ready_until = 0.0
        self._stub_for: tuple[Any, Any] | None = None
        self._tasks = TaskSet("grpc-picker")
        self._metrics = _Metrics(registry)
        req_mode = m.BUFFERED if body_mode == "buffered" else m.FULL_DUPLEX_STREAMED
        if body_mode == "headers_only":
            req_mode = m.NONE
        # Response bodies are reported in STREAMED mode: the picker acknowledges instead of echoing them.
        self._config = m.protocol_config(req_mode, m.STREAMED)

    def _stub(self) -> Any:
        channel = self._channel.get()
        cached = self._stub_for
        if cached is None or cached[0] is not channel:
            cached = (channel, ext_grpc.ExternalProcessorStub(channel))
            self._stub_for = cached
        return cached[1]

    def _first_messages(self, request: PickRequest) -> list[m.ProcessingRequest]:
        h = request.headers
        pairs: list[tuple[str, str]] = [
            (":method", request.method or "POST"),
            (":path", request.path or "/"),
            (":authority", h.get("host", "")),
            (":scheme", "http"),
        ]
        rid = request.request_id
        if rid:
            pairs.append(("x-request-id", rid))
        for k, v in h.items():
            if k not in m.NOT_SENT_TO_PROCESSOR and k != "x-request-id" and k != self._header:
                pairs.append((k, v))
        body = request.body
        if self._mode == "headers_only" or not body:
            return [m.headers_request(pairs, end_of_stream=True, config=self._config, subset=request.subset)]
        pairs.append(("content-length", str(len(body))))
        first = m.headers_request(pairs, end_of_stream=False, config=self._config, subset=request.subset)
        if self._mode == "buffered":
            return [first, m.body_chunk_request(body, end_of_stream=True)]
        return [first, *m.body_chunk_requests(body, self._chunk)]

    async def pick(self, request: PickRequest) -> tuple[Decision, PickSession]:
        """Ask the remote picker; raises PickerError (timeout / tls / unavailable / protocol)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        outbox: asyncio.Queue[m.ProcessingRequest | None] = asyncio.Queue()
        first = self._first_messages(request)
        call = self._stub().Process(_requests(first, outbox))
        try:
            async with asyncio.timeout(self._timeout):
                decision = await self._read_decision(call, request.body if len(first) > 1 else None)
        except TimeoutError:
            call.cancel()
            self._count_error("timeout")
            raise no_answer("picker", self._opts.target, self._timeout) from None
        except grpc.aio.AioRpcError as exc:
            call.cancel()
            err = rpc_failure(exc, "picker", self._opts.target)
            self._count_error(err.cause)
            raise err from exc
        except PickerError as err:
            call.cancel()
            self._count_error(err.cause)
            raise
        except BaseException:
            call.cancel()
            raise
        if self._metrics.enabled:
            self._metrics.seconds.observe(loop.time() - start)
        if isinstance(decision, Reject):
            if self._metrics.enabled:
                self._metrics.reject.inc()
            outbox.put_nowait(None)
            self._tasks.spawn(_drain(call), "drain")
            return decision, NullSession()
        if self._metrics.enabled:
            self._metrics.destination.inc()
        return decision, _GrpcSession(call, outbox, self._tasks)

    def _count_error(self, cause: str) -> None:
        if self._metrics.enabled:
            self._metrics.errors.labels(cause).inc()

    async def _read_decision(self, call: Any, sent_body: bytes | None) -> Decision:
        target = self._opts.target
        decision: Destination | None = None
        echoed: list[bytes] = []
        while True:
            resp = await call.read()
            if resp is grpc.aio.EOF:
                raise PickerError(f"picker {target} closed the stream before deciding", cause="protocol")
            kind = resp.WhichOneof("response")
            if kind == "immediate_response":
                ir = resp.immediate_response
                headers = {
                    o.header.key.lower(): (
                        o.header.raw_value.decode() if o.header.raw_value else o.header.value
                    )
                    for o in ir.headers.set_headers
                }
                return Reject(
                    int(ir.status.code) or 500, bytes(ir.body), headers, cause=ir.details or "reject"
                )
            if decision is None and kind in ("request_headers", "request_body"):
                common = getattr(resp, kind).response
                if (
                    kind == "request_body"
                    and common.body_mutation.WhichOneof("mutation") == "streamed_response"
                ):
                    raise PickerError(f"picker {target} sent a body before its decision", cause="protocol")
                meta, header, others = m.destination_from_response(resp, self._header)
                if meta is None and header is None:
                    if kind == "request_headers" and self._mode == "buffered":
                        continue  # the empty headers reply of BUFFERED mode; the decision follows
                    raise PickerError(f"picker {target} answered without a destination", cause="protocol")
                if meta is not None and header is not None and meta != header:
                    log.warning(
                        "picker %s: header %s disagrees with envoy.lb metadata %s", target, header, meta
                    )
                endpoints = meta if meta is not None else header
                assert endpoints is not None
                if not endpoints:
                    raise PickerError(f"picker {target} returned an empty destination", cause="protocol")
                replaced = (
                    common.body_mutation.body
                    if common.body_mutation.WhichOneof("mutation") == "body"
                    else None
                )
                decision = Destination(
                    endpoints,
                    others,
                    replaced,
                    m.restore_from_response(resp),
                    m.fallbacks_from_response(resp),
                )
                if sent_body is None or self._mode != "full_duplex":
                    return decision
                continue
            if decision is not None and kind == "request_body":
                sr = resp.request_body.response.body_mutation.streamed_response
                echoed.append(sr.body)
                if sr.end_of_stream:
                    body = b"".join(echoed)
                    if body == sent_body:
                        return decision
                    return dataclasses.replace(decision, body=body)
                continue
            raise PickerError(f"picker {target} sent an unexpected {kind!r} message", cause="protocol")

    async def ready(self) -> bool:
        """Whether the picker answers its gRPC health check (ext_proc service SERVING) within a second, asked
        at most once per ``READY_TTL`` seconds: the gateway's ``/readyz`` is not ready while its picker is
        unreachable, fails TLS verification or is not ready itself (fail-closed)."""
        now = time.monotonic()
        if now < self._ready_until:
            return self._ready
        self._ready_until = now + READY_TTL
        request = health_pb2.HealthCheckRequest(service=EXT_PROC_SERVICE)
        try:
            reply = await health_pb2_grpc.HealthStub(self._channel.get()).Check(request, timeout=1.0)
            ready = bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
            why = (
                ""
                if ready
                else f"it reports {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
            )
        except grpc.aio.AioRpcError as exc:
            failure = rpc_failure(exc, "picker", self._opts.target)
            ready, why = False, str(failure)
            if failure.cause == "tls" and not self._opts.ca_file:
                why += (
                    " -- set epp.ca_file to the picker's certificate (inferoute epp keeps its own "
                    "in ~/.local/state/inferoute/epp-tls/tls.crt on its machine)"
                )
        if ready != self._ready:
            log.log(
                logging.INFO if ready else logging.WARNING,
                "picker %s %s%s",
                self._opts.target,
                "ready" if ready else "not ready: ",
                why,
            )
        self._ready = ready
        return ready

    async def aclose(self) -> None:
        await self._tasks.aclose()
        await self._channel.aclose()


async def _requests(
    first: list[m.ProcessingRequest], outbox: asyncio.Queue[m.ProcessingRequest | None]
) -> AsyncIterator[m.ProcessingRequest]:
    for msg in first:
        yield msg
    while True:
        msg = await outbox.get()
        if msg is None:
            return
        yield msg


async def _drain(call: Any) -> None:
    """Read the remaining replies until the server closes the stream, so the call is released."""
    try:
        async with asyncio.timeout(_DRAIN_TIMEOUT):
            while await call.read() is not grpc.aio.EOF:
                pass
    except (TimeoutError, grpc.aio.AioRpcError):
        call.cancel()


class _GrpcSession:
    """Response phase on the pick's stream (queue-fed, never blocks; ends exactly once). One task reads the
    picker's replies for the whole response: an ImmediateResponse among them is flow control evicting the
    request (:class:`~inferoute.picking.EvictableSession`)."""

    __slots__ = (
        "_call",
        "_deadline",
        "_done",
        "_evict",
        "_evicted",
        "_failed",
        "_outbox",
        "_served",
        "_tasks",
    )

    def __init__(self, call: Any, outbox: asyncio.Queue[m.ProcessingRequest | None], tasks: TaskSet) -> None:
        self._call = call
        self._outbox = outbox
        self._tasks = tasks
        self._done = False
        self._served: str | None = None
        self._evict: Callable[[], None] | None = None
        self._evicted = False
        self._deadline: asyncio.TimerHandle | None = None
        self._failed: list[str] | None = None
        """Endpoints that refused the connection, reported with the response headers (passive health)."""
        tasks.spawn(self._watch(), "watch")

    async def _watch(self) -> None:
        call = self._call
        try:
            while True:
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    return
                if resp.WhichOneof("response") == "immediate_response":
                    self._evicted = True
                    if self._evict is not None and not self._done:
                        self._evict()
                    return
        except grpc.aio.AioRpcError:
            return
        finally:
            if self._deadline is not None:
                self._deadline.cancel()

    def on_evict(self, handler: Callable[[], None]) -> None:
        self._evict = handler
        if self._evicted and not self._done:
            handler()

    def response_started(self, served: str, status: int, headers: Mapping[str, str]) -> None:
        if self._done:
            return
        self._served = served or None
        pairs = [(":status", str(status)), *((k, v) for k, v in headers.items() if not k.startswith(":"))]
        failed, self._failed = self._failed, None
        self._outbox.put_nowait(
            m.headers_request(
                pairs, end_of_stream=False, phase="response_headers", served=self._served, failed=failed
            )
        )

    def endpoint_failed(self, endpoint: str, reason: str) -> None:
        """Passive health: sent to the picker in the response-headers metadata (``FAILED_ENDPOINTS_KEY``)."""
        if self._done:
            return
        if self._failed is None:
            self._failed = []
        self._failed.append(endpoint)

    def response_chunk(self, chunk: bytes) -> None:
        if self._done or not chunk:
            return
        for start in range(0, len(chunk), _SENT_CHUNK):
            piece = chunk[start : start + _SENT_CHUNK]
            self._outbox.put_nowait(m.body_chunk_request(piece, end_of_stream=False, phase="response_body"))

    def response_finished(self) -> None:
        if self._done:
            return
        self._done = True
        self._outbox.put_nowait(
            m.body_chunk_request(b"", end_of_stream=True, phase="response_body", served=self._served)
        )
        self._outbox.put_nowait(None)
        # the watcher reads the rest; a picker that never closes the stream is cut off
        self._deadline = asyncio.get_running_loop().call_later(_DRAIN_TIMEOUT, self._call.cancel)

    def aborted(self, reason: str) -> None:
        if self._done:
            return
        if self._failed:  # nothing answered: the picker still learns which endpoints refused (with the 502)
            self.response_started("", 502, {})
            self.response_finished()
            return
        self._done = True
        log.debug("pick session aborted: %s", reason)
        self._call.cancel()
        self._outbox.put_nowait(None)
