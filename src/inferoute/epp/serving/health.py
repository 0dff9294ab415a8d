"""gRPC health (``grpc.health.v1``), served on the health port and on the ext_proc port.

``liveness`` is always SERVING; ``readiness``, ``envoy.service.ext_proc.v3.ExternalProcessor`` and ``""``
follow ``picker.ready()`` when the picker has one (the embedded picker: SERVING once its datastore has ready
endpoints); any other name is unknown (``Check`` answers NOT_FOUND, ``Watch`` SERVICE_UNKNOWN).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inferoute.epp.serving import h2server as h2s
from inferoute.epp.serving.h2server import GrpcAbort
from inferoute.picking import EXT_PROC_SERVICE, Picker

log = logging.getLogger(__name__)

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthServicer(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """gRPC health: ``liveness`` always SERVING; readiness names follow ``ready()``; others unknown."""

    READINESS = frozenset({"", "readiness", EXT_PROC_SERVICE})

    def __init__(self, ready: Callable[[], bool], *, watch_interval: float = 1.0) -> None:
        self._ready = ready
        self.interval = watch_interval

    def status(self, service: str) -> int:
        if service == "liveness":
            return int(_SERVING)
        if service in self.READINESS:
            try:
                return int(_SERVING if self._ready() else _NOT_SERVING)
            except Exception:
                log.exception("readiness check failed")
                return int(_NOT_SERVING)
        return int(_UNKNOWN)

    def check(self, service: str) -> health_pb2.HealthCheckResponse:
        """``Check``: the status, or NOT_FOUND for an unknown service (the gRPC health protocol; ``Watch``
        answers SERVICE_UNKNOWN instead and keeps watching)."""
        status = self.status(service)
        if status == _UNKNOWN:
            raise GrpcAbort(h2s.NOT_FOUND, "unknown service")
        return health_pb2.HealthCheckResponse(status=status)

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        try:
            return self.check(request.service)
        except GrpcAbort as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, exc.details)
            raise

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        async for reply in self.changes(request.service):
            yield reply

    async def changes(self, service: str) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """The status now, then each change (polled every ``interval``): ``Watch`` on either transport."""
        last = -1
        while True:
            now = self.status(service)
            if now != last:
                last = now
                yield health_pb2.HealthCheckResponse(status=now)
            await asyncio.sleep(self.interval)


def picker_readiness(picker: Picker) -> Callable[[], bool]:
    """``picker.ready`` when the picker has one (the EmbeddedPicker does), else always ready."""
    ready = getattr(picker, "ready", None)
    if callable(ready):
        return lambda: bool(ready())
    return lambda: True
