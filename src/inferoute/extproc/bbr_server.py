"""A body-based-routing (BBR) ext_proc server with GIE BBR behaviour.

GIE's BBR (``pkg/bbr``, now llm-d-inference-payload-processor): read the JSON body, copy its ``model``
into the request header ``X-Gateway-Model-Name`` (with ``clear_route_cache`` so routes can match on it) and
give the body back unchanged.

* FULL_DUPLEX_STREAMED (``--streaming``, the default): the headers reply is held until the body's end, then
  the header mutation (+ ``Content-Length``) and the body echoed as 62,000-byte ``streamed_response`` chunks.
* STREAMED / BUFFERED (announced in ``protocol_config``): headers answered at once, body chunks acknowledged,
  the mutation rides on the last body reply.
* invalid JSON -> ImmediateResponse 400; missing / empty / non-object model -> no header, body unchanged;
  a request without body -> an empty headers reply.

Usable in tests (:func:`start_bbr_server`) and runnable:
``python -m inferoute.extproc.bbr_server --port 9004``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import msgspec
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc

from inferoute.epp.requestcontrol.parse import MAX_JSON_DEPTH, nested_deeper_than
from inferoute.errors import error_body
from inferoute.extproc import messages as m

log = logging.getLogger(__name__)

MODEL_HEADER = "X-Gateway-Model-Name"


class _ModelOnly(msgspec.Struct):
    model: Any = None


_DECODER = msgspec.json.Decoder(_ModelOnly)


class InvalidBody(ValueError):
    """The body is not a JSON object."""


def model_of(body: bytes) -> str | None:
    """The body's ``model`` as GIE BBR renders it (``%v``: any JSON scalar as text); None when missing/empty.

    Raises :class:`InvalidBody` when the body is not a JSON object or nests deeper than
    :data:`~inferoute.epp.requestcontrol.parse.MAX_JSON_DEPTH` (the decoder's own limit moves with the call
    stack).
    """
    if nested_deeper_than(body, MAX_JSON_DEPTH):
        raise InvalidBody(f"nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        value = _DECODER.decode(body).model
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise InvalidBody(str(exc)) from exc
    if value is None or isinstance(value, dict | list):
        return None
    text = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return text or None


class BbrServicer(ext_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """GIE BBR over ext_proc (see module docstring)."""

    def __init__(self, header_name: str = MODEL_HEADER) -> None:
        self.header_name = header_name

    async def Process(
        self, request_iterator: AsyncIterator[m.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[m.ProcessingResponse]:
        full_duplex = full_duplex_response = True
        chunks: list[bytes] = []
        async for req in request_iterator:
            phase = req.WhichOneof("request")
            if phase == "request_headers":
                if req.HasField("protocol_config"):
                    pc = req.protocol_config
                    full_duplex = pc.request_body_mode == m.FULL_DUPLEX_STREAMED
                    full_duplex_response = pc.response_body_mode == m.FULL_DUPLEX_STREAMED
                if req.request_headers.end_of_stream or not full_duplex:
                    yield m.headers_response("request_headers")
            elif phase == "request_body":
                chunks.append(req.request_body.body)
                if not req.request_body.end_of_stream:
                    if not full_duplex:
                        yield m.body_response("request_body")
                    continue
                body = b"".join(chunks)
                chunks.clear()
                for resp in self._decide(body, full_duplex):
                    yield resp
            elif phase == "request_trailers":
                yield m.trailers_response("request_trailers")
            elif phase in ("response_headers", "response_body", "response_trailers"):
                for resp in _pass_through(req, phase, full_duplex_response):
                    yield resp

    def _decide(self, body: bytes, full_duplex: bool) -> list[m.ProcessingResponse]:
        try:
            model = model_of(body)
        except InvalidBody:
            return [m.immediate_response(400, error_body(400, "failed to parse request body as JSON"))]
        headers = {self.header_name: model} if model else None
        if not full_duplex:
            return [m.headers_response("request_body", set_headers=headers)]
        reply = m.headers_response("request_headers", set_headers=headers, content_length=len(body))
        if model:
            reply.request_headers.response.clear_route_cache = True
        return [reply, *m.body_chunks(body, "request_body")]


def _pass_through(req: m.ProcessingRequest, phase: str, full_duplex: bool) -> list[m.ProcessingResponse]:
    """Response phase: BBR changes nothing (echo in full duplex, plain acknowledgements otherwise)."""
    if phase == "response_body":
        rb = req.response_body
        if full_duplex:
            return list(m.body_chunks(rb.body, "response_body", end_of_stream=rb.end_of_stream))
        return [m.body_response("response_body")]
    if phase == "response_headers":
        return [m.headers_response("response_headers")]
    return [m.trailers_response("response_trailers")]


class BbrServer:
    """A running BBR gRPC server (plain text; TLS is the EPP's business in this project)."""

    def __init__(self, server: grpc.aio.Server, port: int) -> None:
        self._server = server
        self.port = port

    async def aclose(self, grace: float = 0.5) -> None:
        await self._server.stop(grace)


async def start_bbr_server(
    host: str = "127.0.0.1", port: int = 0, *, header_name: str = MODEL_HEADER
) -> BbrServer:
    """Start a BBR server; ``port=0`` picks a free port (see ``.port``)."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 128 * 1024 * 1024),
            ("grpc.max_send_message_length", 128 * 1024 * 1024),
            ("grpc.so_reuseport", 0),
        ]
    )
    ext_grpc.add_ExternalProcessorServicer_to_server(BbrServicer(header_name), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return BbrServer(server, bound)


def main(argv: list[str] | None = None) -> None:
    """``python -m inferoute.extproc.bbr_server [--host H] [--port 9004]``: serve until interrupted."""
    parser = argparse.ArgumentParser(description="GIE-style body-based routing ext_proc server")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=9004)
    parser.add_argument("--header-name", default=MODEL_HEADER)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)

    async def serve() -> None:
        server = await start_bbr_server(args.host, args.port, header_name=args.header_name)
        log.info("BBR ext_proc listening on %s:%d", args.host, server.port)
        try:
            await server._server.wait_for_termination()
        finally:
            await server.aclose()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
