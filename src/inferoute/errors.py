"""OpenAI-style error bodies, mapped in one place.

Every component (simulator, picker, gateway, NGINX decider) answers failures with the same JSON shape::

    {"error": {"message": "...", "type": "...", "param": null, "code": 503}}

``type`` follows OpenAI's vocabulary where one exists.
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path

# HTTP status -> OpenAI error "type".
_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    502: "bad_gateway_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


def error_type(status: int) -> str:
    """The OpenAI error type for an HTTP status."""
    if status in _TYPES:
        return _TYPES[status]
    return "invalid_request_error" if status < 500 else "internal_server_error"


def error_body(
    status: int,
    message: str,
    *,
    type: str | None = None,
    param: str | None = None,
    code: str | int | None = None,
) -> bytes:
    """Serialise an OpenAI-style error body (UTF-8 JSON)."""
    payload = {
        "error": {
            "message": message,
            "type": type or error_type(status),
            "param": param,
            "code": code if code is not None else status,
        }
    }
    return json.dumps(payload, separators=(",", ":")).encode()


@dataclass(slots=True)
class InferouteError(Exception):
    """A failure with the HTTP status the client must see.

    ``cause`` is a short machine-readable label used in metrics (``errors_total{cause=...}``).
    """

    status: int
    message: str
    cause: str = "error"
    type: str | None = None
    param: str | None = None

    def __str__(self) -> str:
        return f"{self.status} {self.cause}: {self.message}"

    def body(self) -> bytes:
        return error_body(self.status, self.message, type=self.type, param=self.param)


def describe_os_error(exc: OSError) -> str:
    """A short, user-facing reason for an OSError (no errno numbers): what a CLI line or a log line says after
    naming the address or file it concerns."""
    if exc.errno == errno.EADDRINUSE:
        return (
            "address already in use (another process listens there; pick another port, or 0 for a free one)"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return "address not available on this machine"
    if exc.errno == errno.EACCES:
        return "permission denied"
    reason = exc.strerror or str(exc)
    return f"{reason}: {exc.filename}" if exc.filename else reason


class ConfigError(InferouteError):
    """A mistake in a configuration file or start-up option, found before anything serves.

    Its text names the key or flag and the valid choices, and never starts with an HTTP status: the
    ``inferoute`` command prints it as one line and exits with status 2 (like a bad flag). It is an
    :class:`InferouteError` (status 500, cause ``config``) only so that a configuration loaded while serving
    (a reload) still maps to an error answer through the one error path.
    """

    def __init__(self, message: str) -> None:
        InferouteError.__init__(self, 500, message, cause="config")

    def __str__(self) -> str:
        return self.message


def read_text_file(path: str | os.PathLike[str], label: str) -> str:
    """The text of a file the user named (a configuration, an endpoints list), as UTF-8. A file that cannot
    be read or is not UTF-8 raises :class:`ConfigError` starting with ``label`` (which names the file and
    what it is for, e.g. ``config file gw.yaml``)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{label}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
            "save the file as UTF-8"
        ) from exc
    except OSError as exc:
        raise ConfigError(f"{label}: cannot read: {exc.strerror or exc}") from exc
