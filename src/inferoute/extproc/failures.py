"""How a failed call to an ext_proc server (the endpoint picker or a remote BBR) is told to the data plane.

Both clients fail the same ways -- no answer within their time budget, or the gRPC call failed -- and the data
plane decides what the client sees from :class:`~inferoute.picking.PickerError` alone (``timeout`` -> 504,
else 502, or fail-open). One mapping, so the causes counted in metrics and the words in the log are the same
whichever server failed; ``component`` ("picker", "BBR") names it in the message.
"""

from __future__ import annotations

import grpc

from inferoute.picking import PickerError

_TLS_WORDS = ("ssl", "tls", "certificate", "handshake", "x509")


def rpc_failure(exc: grpc.aio.AioRpcError, component: str, target: str) -> PickerError:
    """A gRPC failure as a PickerError whose ``cause`` is ``timeout``, ``tls``, ``unavailable`` or
    ``protocol`` and whose message names the root cause (the TLS verification error, the server's details).

    gRPC reports a TLS failure as UNAVAILABLE; only the details and debug string tell it apart."""
    code = exc.code()
    details = exc.details() or ""
    debug = exc.debug_error_string() or ""
    text = f"{details} {debug}".lower()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return PickerError(f"{component} {target}: deadline exceeded", timeout=True, cause="timeout")
    if code == grpc.StatusCode.UNAVAILABLE and any(w in text for w in _TLS_WORDS):
        return PickerError(f"{component} {target}: TLS failure: {details}", cause="tls")
    if code == grpc.StatusCode.UNAVAILABLE:
        return PickerError(f"{component} {target} unavailable: {details}", cause="unavailable")
    return PickerError(f"{component} {target} failed: {code.name}: {details}", cause="protocol")


def no_answer(component: str, target: str, seconds: float) -> PickerError:
    """The server did not answer within its time budget (``timeout_ms``)."""
    return PickerError(
        f"{component} {target} did not answer within {seconds * 1000:.0f} ms", timeout=True, cause="timeout"
    )
