"""Cross-worker sync on one host: a shared-memory file with one slot per worker process.

Slot layout (little endian): ``version u64 | stamp_ns u64 | length u32 | table bytes``. The owner writes its
slot under a seqlock (version odd while writing, even when done); a reader copies a slot and retries when the
version was odd or changed meanwhile. ``stamp_ns`` is ``CLOCK_MONOTONIC`` (one clock for every process of
the host): a slot older than ``ttl`` belongs to a worker that stopped publishing and is ignored. The parent of
the workers creates the file (:func:`create_segment`) and removes it when they are gone.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import struct
import tempfile
import time
from collections.abc import Callable, Mapping

from inferoute.epp.sync.syncer import SnapshotSyncer

log = logging.getLogger(__name__)

HEADER = struct.Struct("<QQI")
DEFAULT_SLOT_BYTES = 256 * 1024
"""Per worker: ~5,000 endpoints' in-flight counts."""
_READ_ATTEMPTS = 8


def create_segment(slots: int, slot_bytes: int = DEFAULT_SLOT_BYTES) -> str:
    """A zeroed file for ``slots`` workers (in ``/dev/shm`` when there is one); returns its path. The caller
    removes it."""
    where = "/dev/shm" if os.path.isdir("/dev/shm") else None
    fd, path = tempfile.mkstemp(prefix="inferoute-epp-sync-", dir=where)
    try:
        os.ftruncate(fd, slots * slot_bytes)
    finally:
        os.close(fd)
    return path


def unlink_segment(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def every_slot_written(path: str, slots: int, slot_bytes: int = DEFAULT_SLOT_BYTES) -> bool:
    """Whether each of ``slots`` workers has published at least once (so each has the segment mapped)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        return all(
            HEADER.unpack(os.pread(fd, HEADER.size, slot * slot_bytes))[0] > 0 for slot in range(slots)
        )
    finally:
        os.close(fd)


def unlink_once_mapped(path: str, slots: int, within: float = 60.0, poll: float = 0.05) -> None:
    """Remove the segment as soon as every worker has it mapped, so nothing is left behind even when the
    parent is SIGKILLed later (blocking: run it in a thread); after ``within`` seconds remove it anyway."""
    deadline = time.monotonic() + within
    while not every_slot_written(path, slots) and time.monotonic() < deadline:
        time.sleep(poll)
    unlink_segment(path)


class ShmSyncer(SnapshotSyncer):
    """Worker ``slot`` of a segment made by :func:`create_segment` with ``slots`` slots."""

    def __init__(
        self,
        path: str,
        slot: int,
        slots: int,
        *,
        slot_bytes: int = DEFAULT_SLOT_BYTES,
        ttl: float = 1.0,
        clock_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        if not 0 <= slot < slots:
            raise ValueError(f"slot {slot} outside 0..{slots - 1}")
        super().__init__(f"worker-{slot}", ttl, lambda: clock_ns() / 1e9)
        self.slot, self.slots, self.slot_bytes = slot, slots, slot_bytes
        self._clock_ns = clock_ns
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), slots * slot_bytes)
        self._mem = memoryview(self._map)
        self._too_big = False

    def _write(self, blob: bytes, stamp: int) -> None:
        base = self.slot * self.slot_bytes
        if HEADER.size + len(blob) > self.slot_bytes:
            if not self._too_big:
                log.warning("shared-memory sync: a %d-byte table over the slot", len(blob))
            self._too_big = True
            blob = b"\x80"  # an empty msgpack map: better no load than a torn one
        version = HEADER.unpack_from(self._map, base)[0]
        HEADER.pack_into(self._map, base, version + 1, stamp, len(blob))  # odd: writing
        self._mem[base + HEADER.size : base + HEADER.size + len(blob)] = blob
        HEADER.pack_into(self._map, base, version + 2, stamp, len(blob))

    def _read(self, slot: int) -> tuple[int, bytes] | None:
        base = slot * self.slot_bytes
        for _ in range(_READ_ATTEMPTS):
            version, stamp, length = HEADER.unpack_from(self._map, base)
            if version == 0:
                return None  # never written
            if version % 2 or length > self.slot_bytes - HEADER.size:
                continue
            blob = bytes(self._mem[base + HEADER.size : base + HEADER.size + length])
            if HEADER.unpack_from(self._map, base)[0] == version:
                return stamp, blob
        return None  # its owner keeps writing: next time

    async def exchange(self, mine: bytes) -> Mapping[str, bytes]:
        now = self._clock_ns()
        self._write(mine, now)
        out: dict[str, bytes] = {}
        limit = int(self.ttl * 1e9)
        for slot in range(self.slots):
            if slot == self.slot:
                continue
            got = self._read(slot)
            if got is not None and now - got[0] <= limit:
                out[f"worker-{slot}"] = got[1]
        return out

    async def aclose(self) -> None:
        if self._map.closed:
            return
        with contextlib.suppress(ValueError):
            self._write(b"\x80", 0)  # stamp 0: expired for every reader
        self._mem.release()
        self._map.close()
