"""RemoteBBR: ask a body-based-routing ext_proc server for the model header (seed 000's remote BBR).

Per request: one ext_proc stream on a pooled channel; request headers with a FULL_DUPLEX_STREAMED
``protocol_config``, then the body in ``chunk_size`` pieces; the answer is the header mutation naming
``header_name`` (GIE BBR: ``X-Gateway-Model-Name``) on the headers reply (full duplex) or on a body reply
(STREAMED / BUFFERED servers). Once the mutation is read the stream is cancelled: the data plane already
holds the body, so the echoed copy is not read.

Errors: timeout -> ``PickerError(timeout=True)``; transport/TLS/protocol -> ``PickerError(cause=...)`` with
the root cause; an ImmediateResponse (e.g. 400 for a body that is not JSON) -> :class:`InferouteError`
carrying the BBR's status and message, for the data plane to answer with.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc

from inferoute.errors import InferouteError
from inferoute.extproc import messages as m
from inferoute.extproc.channel import ChannelOptions, ReloadingChannel
from inferoute.extproc.failures import no_answer, rpc_failure
from inferoute.picking import PickerError

__all__ = ["ChannelOptions", "RemoteBBR"]


class RemoteBBR:
    """Streams a request body to a BBR ext_proc server and returns the model header it sets."""

    def __init__(
        self,
        opts: ChannelOptions,
        *,
        header_name: str = "X-Gateway-Model-Name",
        chunk_size: int = 65536,
        timeout_ms: int = 200,
    ) -> None:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be > 0")
        self._opts = opts
        self._header = header_name.lower()
        self._chunk = chunk_size
        self._timeout = timeout_ms / 1000.0
        self._channel = ReloadingChannel(opts)
        self._config = m.protocol_config(m.FULL_DUPLEX_STREAMED, m.NONE)

    def _messages(self, headers: Mapping[str, str], body: bytes) -> list[m.ProcessingRequest]:
        pairs = [
            (":method", headers.get(":method", "POST")),
            (":path", headers.get(":path", "/")),
            (":authority", headers.get("host", "")),
        ]
        pairs += [
            (k, v) for k, v in headers.items() if k not in m.NOT_SENT_TO_PROCESSOR and not k.startswith(":")
        ]
        if not body:
            return [m.headers_request(pairs, end_of_stream=True, config=self._config)]
        first = m.headers_request(pairs, end_of_stream=False, config=self._config)
        return [first, *m.body_chunk_requests(body, self._chunk)]

    async def model_header(self, headers: Mapping[str, str], body: bytes) -> str | None:
        """The value the BBR sets for ``header_name``, or None when it sets none (no/empty model)."""
        stub = ext_grpc.ExternalProcessorStub(self._channel.get())
        msgs = self._messages(headers, body)
        call = stub.Process(_iterate(msgs))
        try:
            async with asyncio.timeout(self._timeout):
                return await self._read(call, len(msgs) - 1)
        except TimeoutError:
            raise no_answer("BBR", self._opts.target, self._timeout) from None
        except grpc.aio.AioRpcError as exc:
            raise rpc_failure(exc, "BBR", self._opts.target) from exc
        finally:
            call.cancel()

    async def _read(self, call: Any, chunks: int) -> str | None:
        """Read replies until the one that carries the decision; ``chunks`` body messages were sent."""
        body_replies = 0
        while True:
            resp = await call.read()
            if resp is grpc.aio.EOF:
                if not chunks:
                    return None
                raise PickerError(
                    f"BBR {self._opts.target} closed the stream without an answer", cause="protocol"
                )
            kind = resp.WhichOneof("response")
            if kind == "immediate_response":
                ir = resp.immediate_response
                status = int(ir.status.code) or 500
                raise InferouteError(status, _message(bytes(ir.body)), cause="bbr-reject")
            if kind not in ("request_headers", "request_body"):
                raise PickerError(
                    f"BBR {self._opts.target} sent an unexpected {kind!r} message", cause="protocol"
                )
            common = getattr(resp, kind).response
            for opt in common.header_mutation.set_headers:
                h = opt.header
                if h.key.lower() == self._header:
                    return h.raw_value.decode("utf-8", "replace") if h.raw_value else str(h.value)
            if kind == "request_headers":
                if not chunks or common.header_mutation.set_headers or common.clear_route_cache:
                    return None  # the decision (full duplex, or a bodyless request) without our header
                continue  # STREAMED/BUFFERED server: the headers ack; the answer rides on a body reply
            body_replies += 1
            if body_replies >= chunks or common.header_mutation.set_headers:
                return None  # the reply to the last chunk carried no model header

    async def aclose(self) -> None:
        await self._channel.aclose()


def _message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace") or "rejected by body-based routing"


async def _iterate(msgs: list[m.ProcessingRequest]) -> AsyncIterator[m.ProcessingRequest]:
    for msg in msgs:
        yield msg
