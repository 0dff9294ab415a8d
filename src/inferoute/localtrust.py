"""Where ``inferoute epp`` keeps its self-signed certificate, so a data plane on this machine can trust it.

``inferoute epp`` without ``--cert-path`` serves a self-signed pair kept in :func:`local_cert_dir` (made once,
reused across restarts: see :mod:`inferoute.epp.serving.tls`). A gateway whose picker channel has TLS and no
``ca_file`` trusts the system roots plus that one certificate (:func:`trust_bundle`), so the default pairing
verifies the picker instead of failing (or skipping verification). Only the certificate is read here; the
key stays private to the picker.
"""

from __future__ import annotations

import os
import ssl
from importlib import resources
from pathlib import Path

STATE_DIR_ENV = "INFEROUTE_STATE_DIR"
"""Overrides the state directory (tests, containers); else ``$XDG_STATE_HOME/inferoute`` or
``~/.local/state/inferoute``."""
CERT_FILE = "tls.crt"


def local_cert_dir() -> Path:
    """The directory of the picker's machine-local ``tls.crt`` / ``tls.key``."""
    base = os.environ.get(STATE_DIR_ENV)
    if not base:
        xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        base = str(Path(xdg) / "inferoute")
    return Path(base) / "epp-tls"


def local_trust_file() -> Path:
    """The machine-local picker certificate (it may not exist yet)."""
    return local_cert_dir() / CERT_FILE


def _system_roots() -> bytes:
    """The PEM roots gRPC would use by default: $GRPC_DEFAULT_SSL_ROOTS_FILE_PATH, the OpenSSL bundle, or
    the roots shipped with grpcio."""
    paths = ssl.get_default_verify_paths()
    for candidate in (
        os.environ.get("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"),
        paths.cafile,
        "/etc/ssl/certs/ca-certificates.crt",
    ):
        if candidate and os.path.isfile(candidate):
            return Path(candidate).read_bytes()
    return resources.files("grpc").joinpath("_cython/_credentials/roots.pem").read_bytes()


def trust_bundle() -> bytes | None:
    """System roots plus the local picker certificate, or None (use gRPC's defaults) when there is none."""
    try:
        local = local_trust_file().read_bytes()
    except OSError:
        return None
    return _system_roots().rstrip(b"\n") + b"\n" + local
