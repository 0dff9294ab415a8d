"""One mapping of failed ext_proc calls for both clients (picker and remote BBR), the component named."""

from __future__ import annotations

import grpc
import pytest

from inferoute.extproc.failures import no_answer, rpc_failure


def rpc_error(code: grpc.StatusCode, details: str, debug: str = "") -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details, debug)


@pytest.mark.parametrize("component", ["picker", "BBR"])
@pytest.mark.parametrize(
    ("code", "details", "debug", "cause", "timeout", "words"),
    [
        (grpc.StatusCode.DEADLINE_EXCEEDED, "late", "", "timeout", True, "deadline exceeded"),
        (grpc.StatusCode.UNAVAILABLE, "failed to connect", "CERTIFICATE_VERIFY_FAILED", "tls", False, "TLS"),
        (grpc.StatusCode.UNAVAILABLE, "Connection refused", "", "unavailable", False, "Connection refused"),
        (grpc.StatusCode.INTERNAL, "boom", "", "protocol", False, "INTERNAL: boom"),
    ],
)
def test_rpc_failure_cause_and_message(
    component: str, code: grpc.StatusCode, details: str, debug: str, cause: str, timeout: bool, words: str
) -> None:
    err = rpc_failure(rpc_error(code, details, debug), component, "10.0.0.1:9002")
    assert (err.cause, err.timeout) == (cause, timeout)
    assert str(err).startswith(f"{component} 10.0.0.1:9002")
    assert words in str(err)


def test_no_answer_names_the_component_and_budget() -> None:
    err = no_answer("BBR", "bbr:9002", 0.2)
    assert (err.cause, err.timeout) == ("timeout", True)
    assert str(err) == "BBR bbr:9002 did not answer within 200 ms"
