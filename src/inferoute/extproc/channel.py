"""One pooled, long-lived gRPC channel per remote processor, with TLS and certificate reload.

A data plane never opens a channel per request: :class:`ReloadingChannel` keeps one ``grpc.aio`` channel
(HTTP/2, keepalive) and hands it out. When TLS files are configured it checks their modification times at most
once per ``check_interval`` seconds (one ``stat`` per file) and, when they changed, builds a new channel; the
old one is closed after a grace period so in-flight streams finish.

TLS without a ``ca_file`` verifies against the system roots plus the certificate ``inferoute epp`` keeps on
this machine (:mod:`inferoute.localtrust`), so a gateway and a picker started with default settings verify
each other; that file is watched like the others (a picker started later, or a renewed certificate, gives a
new channel). Verification is never skipped.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from inferoute import localtrust
from inferoute.errors import InferouteError
from inferoute.tasks import TaskSet

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 128 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ChannelOptions:
    """How to reach an ext_proc server (the EPP or a BBR).

    ``target`` is ``host:port``. With ``tls`` the server is verified against ``ca_file`` (PEM) or the system
    roots; ``cert_file``/``key_file`` add a client certificate (mTLS); ``server_name`` overrides the name
    checked in the server certificate (when dialing an IP).
    """

    target: str
    tls: bool = True
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise InferouteError(500, f"cannot read {what} {path}: {exc}", cause="tls") from exc


def build_channel(opts: ChannelOptions) -> grpc.aio.Channel:
    """A new channel for ``opts`` (reads the TLS files now; InferouteError 500 if unreadable)."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.enable_retries", 0),
        # A picker that went away (a leader failing over, a pod replaced) is reached again quickly: after
        # failed attempts gRPC waits 100 ms growing 1.6x up to 0.5 s (its defaults: 1 s up to 2 minutes),
        # and an attempt to an address that does not answer gives up after 2 s (default 20 s).
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 500),
        ("grpc.min_reconnect_backoff_ms", 2_000),
        # Several picker replicas (an ipv4:/ipv6: list, or a name resolving to several addresses): spread the
        # streams over the ready ones; a replica that is down is skipped until it reconnects.
        ("grpc.lb_policy_name", "round_robin"),
    ]
    if not opts.tls:
        return grpc.aio.insecure_channel(opts.target, options=options)
    if (opts.cert_file is None) != (opts.key_file is None):
        raise InferouteError(500, "client TLS needs both cert_file and key_file", cause="tls")
    roots = _read(opts.ca_file, "CA file") if opts.ca_file else localtrust.trust_bundle()
    creds = grpc.ssl_channel_credentials(
        root_certificates=roots,
        private_key=_read(opts.key_file, "client key"),
        certificate_chain=_read(opts.cert_file, "client certificate"),
    )
    if opts.server_name:
        options.append(("grpc.ssl_target_name_override", opts.server_name))
    return grpc.aio.secure_channel(opts.target, creds, options=options)


class ReloadingChannel:
    """Hands out one channel; rebuilds it when the configured certificate files change."""

    def __init__(
        self,
        opts: ChannelOptions,
        *,
        check_interval: float = 1.0,
        grace: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._opts = opts
        self._files = [f for f in (opts.ca_file, opts.cert_file, opts.key_file) if f] if opts.tls else []
        if opts.tls and not opts.ca_file:
            self._files.append(str(localtrust.local_trust_file()))
        self._interval = check_interval
        self._grace = grace
        self._clock = clock
        self._stamp = self._mtimes()
        self._channel = build_channel(opts)
        self._next_check = clock()
        self._tasks = TaskSet("grpc-channel")
        self.generation = 0
        """Incremented on every rebuild (observable in tests and logs)."""

    def _mtimes(self) -> tuple[float, ...]:
        out = []
        for f in self._files:
            try:
                out.append(os.stat(f).st_mtime)
            except OSError:
                out.append(-1.0)
        return tuple(out)

    def get(self) -> grpc.aio.Channel:
        """The current channel (cheap: a clock read, and a stat per TLS file once per interval)."""
        if self._files:
            now = self._clock()
            if now >= self._next_check:
                self._next_check = now + self._interval
                stamp = self._mtimes()
                if stamp != self._stamp:
                    self._rebuild(stamp)
        return self._channel

    def _rebuild(self, stamp: tuple[float, ...]) -> None:
        try:
            fresh = build_channel(self._opts)
        except InferouteError as exc:
            log.warning("certificate files changed but cannot be loaded, keeping the old channel: %s", exc)
            return
        old, self._channel, self._stamp = self._channel, fresh, stamp
        self.generation += 1
        log.info("TLS files changed: new channel to %s (generation %d)", self._opts.target, self.generation)
        self._tasks.spawn(old.close(self._grace), "close-old-channel")

    async def aclose(self) -> None:
        await self._channel.close(None)
        await self._tasks.aclose()
