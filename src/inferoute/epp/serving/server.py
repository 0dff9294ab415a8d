"""The picker's gRPC servers: the ext_proc servicer and health bound on one of two transports.

:class:`EppServer` starts ext_proc + health on the ext_proc port and health alone on the health port,
either on inferoute's own gRPC-over-HTTP/2 server (``h2``, :mod:`inferoute.epp.serving.h2server`, the
default) or on ``grpc.aio`` (``grpcio``). The stream logic (:mod:`inferoute.epp.serving.servicer`) and
the health service (:mod:`inferoute.epp.serving.health`) are the same on both.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from inferoute.epp.serving import h2server as h2s
from inferoute.epp.serving.health import HealthServicer, picker_readiness
from inferoute.epp.serving.servicer import DEFAULT_MAX_MESSAGE_BYTES, ExtProcMetrics, ExtProcServicer
from inferoute.errors import ConfigError, InferouteError, describe_os_error
from inferoute.extproc import messages as m
from inferoute.picking import DESTINATION_HEADER, EXT_PROC_SERVICE, Picker

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServerOptions:
    """Where and how ``inferoute epp`` listens."""

    host: str = "0.0.0.0"
    grpc_port: int = 9002
    health_port: int | None = 9003
    """Plain-text gRPC health port (None: health only on the ext_proc port). 0 picks a free port."""
    insecure: bool = False
    cert_path: str | None = None
    """Directory with tls.crt / tls.key (reloaded on change); None with TLS: a generated self-signed pair."""
    client_ca: str | None = None
    """PEM bundle: require and verify client certificates signed by it (mTLS). Reloaded on change."""
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    destination_header: str = DESTINATION_HEADER
    transport: str = "h2"
    """``h2``: inferoute's own gRPC-over-HTTP/2 server (epp/serving/h2server.py, the fast one); ``grpcio``:
    ``grpc.aio``."""
    h2_limits: h2s.Limits = field(default_factory=h2s.Limits)
    """The ``h2`` transport's limits (docs/security.md)."""
    reuse_port: bool = False
    """Share the ports with the other workers of ``inferoute epp --workers N`` (``SO_REUSEPORT``)."""


TRANSPORTS = ("h2", "grpcio")


def _grpc_options(max_bytes: int, reuse_port: bool = False) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.so_reuseport", int(reuse_port)),  # never share a port silently with another process
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
        ("grpc.http2.max_ping_strikes", 0),
    ]


def h2_methods(servicer: ExtProcServicer | None, health: HealthServicer) -> dict[str, h2s.Method]:
    async def watch(req: health_pb2.HealthCheckRequest, writer: h2s.StreamWriter) -> None:
        async for reply in health.changes(req.service):
            writer.send((reply,))

    methods = {
        "/grpc.health.v1.Health/Check": h2s.unary(
            health_pb2.HealthCheckRequest,
            lambda req: health.check(req.service),
        ),
        "/grpc.health.v1.Health/Watch": h2s.server_streaming(health_pb2.HealthCheckRequest, watch),
    }
    if servicer is not None:
        methods[f"/{EXT_PROC_SERVICE}/Process"] = h2s.Method(m.ProcessingRequest, servicer.open_encoded)
    return methods


class EppServer:
    """The running gRPC servers (ext_proc + health on one port, health alone on another)."""

    def __init__(
        self,
        servers: list[grpc.aio.Server | h2s.GrpcServer],
        grpc_port: int,
        health_port: int | None,
        metrics: ExtProcMetrics,
    ) -> None:
        self._servers = servers
        self.grpc_port = grpc_port
        self.health_port = health_port
        self.transport = "h2" if isinstance(servers[0], h2s.GrpcServer) else "grpcio"
        self.metrics = metrics

    @classmethod
    async def start(cls, picker: Picker, opts: ServerOptions, registry: CollectorRegistry) -> EppServer:
        """Bind and start; raises InferouteError(500, cause="bind") when a port is taken."""
        if opts.transport not in TRANSPORTS:
            raise ConfigError(f"transport {opts.transport!r}: choose one of {', '.join(TRANSPORTS)}")
        metrics = ExtProcMetrics(registry)
        health = HealthServicer(picker_readiness(picker))
        servicer = ExtProcServicer(picker, metrics, destination_header=opts.destination_header)
        if opts.transport == "h2":
            return await cls._start_h2(servicer, health, opts, metrics)
        if opts.client_ca is not None:
            raise ConfigError("client certificates (mTLS) need the h2 transport")
        main = grpc.aio.server(options=_grpc_options(opts.max_message_bytes, opts.reuse_port))
        ext_grpc.add_ExternalProcessorServicer_to_server(servicer, main)
        health_pb2_grpc.add_HealthServicer_to_server(health, main)
        servers: list[grpc.aio.Server | h2s.GrpcServer] = [main]
        addr = f"{opts.host}:{opts.grpc_port}"
        try:
            if opts.insecure:
                port = main.add_insecure_port(addr)
            else:
                from inferoute.epp.serving.tls import server_credentials

                port = main.add_secure_port(addr, server_credentials(opts.cert_path))
            health_port: int | None = None
            if opts.health_port is not None:
                hs = grpc.aio.server(options=_grpc_options(4 * 1024 * 1024, opts.reuse_port))
                health_pb2_grpc.add_HealthServicer_to_server(health, hs)
                health_port = hs.add_insecure_port(f"{opts.host}:{opts.health_port}")
                servers.append(hs)
        except RuntimeError as exc:  # grpc.aio says only "Failed to bind"
            ports = f"{opts.grpc_port} (--grpc-port) or {opts.health_port} (--health-port)"
            raise InferouteError(
                500, f"cannot listen on {opts.host} port {ports}: in use or not available", cause="bind"
            ) from exc
        for s in servers:
            await s.start()  # type: ignore[call-arg]
        cls._log_listening(opts, port, health_port)
        return cls(servers, port, health_port, metrics)

    @classmethod
    async def _start_h2(
        cls, servicer: ExtProcServicer, health: HealthServicer, opts: ServerOptions, metrics: ExtProcMetrics
    ) -> EppServer:
        ctx = None
        if not opts.insecure:
            from inferoute.epp.serving.tls import server_ssl_context

            ctx = server_ssl_context(opts.cert_path, opts.client_ca)
        main = h2s.GrpcServer(
            h2_methods(servicer, health), max_message_bytes=opts.max_message_bytes, limits=opts.h2_limits
        )
        servers: list[grpc.aio.Server | h2s.GrpcServer] = [main]
        where = f"{opts.host}:{opts.grpc_port} (--grpc-port)"
        try:
            port = await main.start(opts.host, opts.grpc_port, ctx, reuse_port=opts.reuse_port)
            health_port: int | None = None
            if opts.health_port is not None:
                where = f"{opts.host}:{opts.health_port} (--health-port)"
                hs = h2s.GrpcServer(h2_methods(None, health), limits=opts.h2_limits)
                health_port = await hs.start(opts.host, opts.health_port, reuse_port=opts.reuse_port)
                servers.append(hs)
        except OSError as exc:
            for s in servers:
                await s.stop(0)
            msg = f"cannot listen on {where}: {describe_os_error(exc)}"
            raise InferouteError(500, msg, cause="bind") from exc
        cls._log_listening(opts, port, health_port)
        return cls(servers, port, health_port, metrics)

    @staticmethod
    def _log_listening(opts: ServerOptions, port: int, health_port: int | None) -> None:
        log.info(
            "ext_proc listening on %s:%d (%s, %s%s), health on %s",
            opts.host,
            port,
            opts.transport,
            "plaintext" if opts.insecure else "TLS",
            ", client certificates required" if opts.client_ca else "",
            health_port,
        )

    async def aclose(self, grace: float = 1.0) -> None:
        """Stop accepting, let open streams finish for ``grace`` seconds, then cancel them."""
        for s in self._servers:
            with contextlib.suppress(Exception):
                await s.stop(grace)

    async def wait(self) -> None:
        main = self._servers[0]
        if isinstance(main, h2s.GrpcServer):
            await main.wait()
        else:
            await main.wait_for_termination()
