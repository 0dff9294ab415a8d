"""Endpoint sources behind one interface.

A source produces the pool's endpoint list: once at startup (``initial``, synchronous so configuration errors
surface before the picker starts) and then whenever it changes (``watch``, a long-running coroutine that calls
``emit``). Kubernetes InferencePool discovery will be a third implementation of :class:`EndpointSource`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import yaml

from inferoute.endpoints import Endpoint, parse_endpoints
from inferoute.errors import ConfigError, InferouteError, read_text_file

log = logging.getLogger(__name__)

Emit = Callable[[list[Endpoint]], None]


class EndpointSource(Protocol):
    def initial(self) -> list[Endpoint]:
        """The endpoint list now. Raises :class:`InferouteError` (cause ``config``) when it is invalid."""
        ...

    async def watch(self, emit: Emit) -> None:
        """Call ``emit`` with the full new list after each change; run until cancelled."""
        ...


class StaticSource:
    """A fixed list of endpoints."""

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self._endpoints = list(endpoints)

    def initial(self) -> list[Endpoint]:
        return list(self._endpoints)

    async def watch(self, emit: Emit) -> None:
        return None


def parse_endpoints_document(doc: Any, where: str) -> list[Endpoint]:
    """Accept ``{endpoints: [...]}``, ``{pool: {endpoints: [...]}}`` or a bare list."""
    if isinstance(doc, dict):
        if "pool" in doc and isinstance(doc["pool"], dict):
            return parse_endpoints(doc["pool"].get("endpoints"), f"{where}: pool.endpoints")
        unknown = set(doc) - {"endpoints"}
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; valid: endpoints, pool")
        return parse_endpoints(doc.get("endpoints"), f"{where}: endpoints")
    if isinstance(doc, list):
        return parse_endpoints(doc, f"{where}: endpoints")
    if doc is None:
        return []
    raise ConfigError(f"{where}: expected a mapping with an 'endpoints' list")


def load_endpoints_file(path: Path) -> list[Endpoint]:
    text = read_text_file(path, f"endpoints file {path}")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"endpoints file {path}: invalid YAML: {exc}") from exc
    return parse_endpoints_document(doc, f"endpoints file {path}")


class FileSource:
    """A YAML endpoints file, re-read when its modification time, size or inode changes.

    Polling (default every second) keeps this dependency-free and works on every filesystem, including
    Kubernetes ConfigMap mounts that swap a symlink. A file that becomes invalid is logged and counted through
    ``on_error``; the last good list stays in force.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        poll_interval: float = 1.0,
        on_error: Callable[[InferouteError], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self.poll_interval = poll_interval
        self._on_error = on_error
        self._stamp: tuple[int, int, int] | None = None

    def _current_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def initial(self) -> list[Endpoint]:
        self._stamp = self._current_stamp()
        return load_endpoints_file(self.path)

    def poll(self) -> list[Endpoint] | None:
        """One check: the new list when the file changed and is valid, else None."""
        stamp = self._current_stamp()
        if stamp == self._stamp:
            return None
        self._stamp = stamp
        try:
            return load_endpoints_file(self.path)
        except InferouteError as exc:
            log.error("keeping the previous endpoints: %s", exc.message)
            if self._on_error is not None:
                self._on_error(exc)
            return None

    async def watch(self, emit: Emit) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            endpoints = self.poll()
            if endpoints is not None:
                emit(endpoints)
