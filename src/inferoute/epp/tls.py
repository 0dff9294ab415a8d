"""TLS material for the picker's gRPC server.

GIE's EPP serves TLS by default: certificates from ``--cert-path`` (``tls.crt`` / ``tls.key``, the Kubernetes
secret layout), else a self-signed certificate generated at start-up. Proxies in front of it (Envoy) typically
skip verification of that self-signed certificate; deployments that care mount a real one.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from inferoute.errors import InferouteError

CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"


@dataclass(frozen=True, slots=True)
class KeyPair:
    """PEM-encoded certificate chain and private key."""

    cert_pem: bytes
    key_pem: bytes


def self_signed(hosts: Sequence[str] = (), *, days: int = 365) -> KeyPair:
    """A fresh self-signed ECDSA P-256 certificate for localhost, 127.0.0.1, ::1, this host and ``hosts``."""
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    for h in (*hosts, socket.gethostname()):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    names += [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1"))]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "inferoute-epp")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return KeyPair(
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )


def load_dir(cert_dir: str | os.PathLike[str]) -> KeyPair:
    """Read ``tls.crt`` and ``tls.key`` from ``cert_dir`` (InferouteError 500 when unreadable)."""
    d = Path(cert_dir)
    try:
        return KeyPair((d / CERT_FILE).read_bytes(), (d / KEY_FILE).read_bytes())
    except OSError as exc:
        raise InferouteError(
            500, f"--cert-path {d}: cannot read {CERT_FILE}/{KEY_FILE}: {exc}", cause="tls"
        ) from exc


def server_credentials(cert_dir: str | os.PathLike[str] | None) -> grpc.ServerCredentials:
    """Credentials from ``cert_dir`` (reloaded when its files change) or a generated self-signed pair."""
    if cert_dir is None:
        pair = self_signed()
        return grpc.ssl_server_credentials([(pair.key_pem, pair.cert_pem)])
    initial = load_dir(cert_dir)
    fetch = _reloader(Path(cert_dir))
    return grpc.dynamic_ssl_server_credentials(
        grpc.ssl_server_certificate_configuration([(initial.key_pem, initial.cert_pem)]), fetch
    )


def _reloader(d: Path) -> Callable[[], grpc.ServerCertificateConfiguration | None]:
    """gRPC calls this before each handshake: return a new configuration only when the files changed."""

    def stamp() -> tuple[float, float]:
        return (d / CERT_FILE).stat().st_mtime, (d / KEY_FILE).stat().st_mtime

    last = [stamp()]

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        try:
            now = stamp()
            if now == last[0]:
                return None
            pair = load_dir(d)
        except (OSError, InferouteError):
            return None  # keep serving the previous certificate
        last[0] = now
        return grpc.ssl_server_certificate_configuration([(pair.key_pem, pair.cert_pem)])

    return fetch
