"""TLS material for the picker's gRPC server.

GIE's EPP serves TLS by default: certificates from ``--cert-path`` (``tls.crt`` / ``tls.key``, the Kubernetes
secret layout), else a self-signed certificate. Proxies in front of GIE's EPP typically skip verification of
that certificate; inferoute never does. Instead ``inferoute epp`` keeps its self-signed pair in a per-user
state directory (``~/.local/state/inferoute/epp-tls``, see :mod:`inferoute.localtrust`; made once by
:func:`ensure_local_cert` and reused across restarts), and a data plane on the same machine trusts that one
certificate in addition to the system roots: the default gateway + picker pairing verifies its peer with no
configuration. On another machine, copy ``tls.crt`` and name it in ``epp.ca_file`` (or mount a real
certificate with ``--cert-path``).
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import re
import socket
import ssl
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from inferoute.errors import ConfigError, InferouteError
from inferoute.localtrust import local_cert_dir

log = logging.getLogger(__name__)
T = TypeVar("T")

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


class _Reloading(Generic[T]):
    """A value built from files, rebuilt when their modification times change (checked on each
    :meth:`refresh`, a ``stat`` per file). A set that fails to load is logged and the last good value kept;
    it is tried again at the next refresh."""

    def __init__(self, files: Sequence[Path], load: Callable[[], T]) -> None:
        self._files = files
        self._load = load
        self._stamp = self._mtimes()
        self.value = load()

    def _mtimes(self) -> tuple[int, ...]:
        return tuple(f.stat().st_mtime_ns for f in self._files)

    def refresh(self) -> bool:
        """True when the files changed and the new value loaded."""
        try:
            now = self._mtimes()
            if now == self._stamp:
                return False
            value = self._load()
        except (OSError, ssl.SSLError, InferouteError) as exc:  # e.g. caught between writing key and cert
            log.error("picker TLS material changed but cannot be loaded (keeping the previous): %s", exc)
            return False
        self._stamp, self.value = now, value
        log.info("picker TLS material reloaded from %s", ", ".join(map(str, self._files)))
        return True


def server_credentials(cert_dir: str | os.PathLike[str] | None) -> grpc.ServerCredentials:
    """Credentials from ``cert_dir`` (reloaded when its files change) or a generated self-signed pair."""
    if cert_dir is None:
        pair = self_signed()
        return grpc.ssl_server_credentials([(pair.key_pem, pair.cert_pem)])
    d = Path(cert_dir)
    loaded = _Reloading([d / CERT_FILE, d / KEY_FILE], lambda: load_dir(d))

    def configuration() -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(loaded.value.key_pem, loaded.value.cert_pem)])

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        """gRPC calls this before each handshake: a new configuration only when the files changed."""
        return configuration() if loaded.refresh() else None

    return grpc.dynamic_ssl_server_credentials(configuration(), fetch)


def server_ssl_context(
    cert_dir: str | os.PathLike[str] | None, client_ca: str | os.PathLike[str] | None = None
) -> ssl.SSLContext:
    """An ``ssl.SSLContext`` for the h2 gRPC server (TLS 1.2+, ALPN ``h2``).

    The certificate comes from ``cert_dir`` (``tls.crt`` / ``tls.key``) or is a generated self-signed pair.
    With ``client_ca`` the server requires client certificates signed by that bundle (mTLS). The files are
    checked before every handshake (a ``stat`` each) and a changed set is loaded for that connection and the
    following ones; a set that fails to load is logged and the previous one kept.
    """
    files: list[Path] = []
    if cert_dir is not None:
        files += [Path(cert_dir) / CERT_FILE, Path(cert_dir) / KEY_FILE]
    if client_ca is not None:
        files.append(Path(client_ca))

    def build() -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["h2"])
        if cert_dir is None:
            pair = self_signed()
            with tempfile.TemporaryDirectory() as tmp:  # load_cert_chain reads files only
                cert, key = Path(tmp) / CERT_FILE, Path(tmp) / KEY_FILE
                cert.write_bytes(pair.cert_pem)
                key.touch(mode=0o600)
                key.write_bytes(pair.key_pem)
                ctx.load_cert_chain(cert, key)
        else:
            try:
                ctx.load_cert_chain(Path(cert_dir) / CERT_FILE, Path(cert_dir) / KEY_FILE)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"--cert-path {cert_dir}: needs {CERT_FILE} and {KEY_FILE} (a PEM certificate and its "
                    f"key): {_tls_reason(exc)}"
                ) from exc
        if client_ca is not None:
            try:
                ctx.load_verify_locations(cafile=client_ca)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"--client-ca {client_ca}: expected a PEM file of CA certificates: {_tls_reason(exc)}"
                ) from exc
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    if cert_dir is not None:
        missing = [f.name for f in files[:2] if not f.is_file()]
        if missing:
            raise ConfigError(
                f"--cert-path {cert_dir}: no {' or '.join(missing)} there "
                f"(the directory needs {CERT_FILE} and {KEY_FILE}, PEM)"
            )
    try:
        current = _Reloading(files, build)
    except ConfigError:
        raise
    except (OSError, ssl.SSLError) as exc:
        raise InferouteError(
            500, f"TLS material for the picker cannot be loaded: {exc}", cause="tls"
        ) from exc
    base = current.value

    def on_hello(sslobj: ssl.SSLObject | ssl.SSLSocket, _name: str | None, _ctx: ssl.SSLContext) -> None:
        current.refresh()
        if current.value is not base:
            sslobj.context = current.value

    if files:
        base.sni_callback = on_hello
    return base


def _tls_reason(exc: OSError | ssl.SSLError) -> str:
    """OpenSSL's reason without its library codes (``[X509: NO_CERTIFICATE_OR_CRL_FOUND] ...``)."""
    if exc.filename:
        return f"{exc.strerror or exc}: {Path(exc.filename).name}"
    text = str(getattr(exc, "reason", None) or exc.strerror or exc)
    text = re.sub(r"\s*\(_ssl\.c:\d+\)$", "", re.sub(r"^\[[^\]]*\]\s*", "", text))
    if text == "PEM lib":
        return "not PEM, or the key does not belong to the certificate"
    return text.replace("_", " ").lower()


def _usable(cert_file: Path, min_days: float = 1.0) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except (OSError, ValueError):
        return False
    left = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    return left > datetime.timedelta(days=min_days)


def ensure_local_cert(directory: Path | None = None) -> Path:
    """The directory of the machine-local self-signed pair, made (or renewed a day before it expires) when
    needed. Written to a private temporary directory and renamed into place, so concurrent pickers never see
    a half-written pair; the key is readable by its owner only."""
    d = directory or local_cert_dir()
    if _usable(d / CERT_FILE) and (d / KEY_FILE).exists():
        return d
    d.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = Path(tempfile.mkdtemp(prefix=".epp-tls-", dir=d.parent))
    pair = self_signed(days=825)
    (tmp / KEY_FILE).touch(mode=0o600)
    (tmp / KEY_FILE).write_bytes(pair.key_pem)
    (tmp / CERT_FILE).write_bytes(pair.cert_pem)
    old = d.with_name(d.name + f".old-{os.getpid()}")
    if d.exists():
        os.replace(d, old)
    try:
        os.replace(tmp, d)
    except OSError:  # another picker won the race: use its pair
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    if old.exists():
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    log.info("made a self-signed picker certificate in %s", d)
    return d
