"""Memory settings for processes that move large request bodies (the picker's ext_proc server): glibc's
allocator, and the garbage collector after start-up.

A 200 KB prompt passes through several buffers of that size. glibc serves allocations above its mmap
threshold (128 KiB at first) with fresh ``mmap`` pages and returns freed heap tops to the kernel, so every
such request pays page faults and page zeroing: 12-20% of the picker's CPU per 200 KB request, measured
with ``perf`` behind Envoy (docs/benchmarks/picker.md). Keeping buffers up to 16 MiB on the heap and trimming
only above 128 MiB of free heap removes that; the cost is free memory the process keeps for reuse.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
ENV_OVERRIDES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_large_buffers(mmap_threshold: int = 16 << 20, trim_threshold: int = 128 << 20) -> bool:
    """Apply the settings; False when the C library has no ``mallopt`` (not glibc) or the operator set
    glibc's own environment variables, which then win."""
    if any(name in os.environ for name in ENV_OVERRIDES):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    ok = bool(
        mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1 and mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1
    )
    if not ok:
        log.info("mallopt refused the large-buffer settings; keeping glibc's defaults")
    return bool(ok)


def freeze_startup_objects() -> int:
    """Move every object alive after start-up (modules, config, plugins: tens of thousands) out of the
    garbage collector's reach (``gc.freeze``). Otherwise each full collection walks them all again, and the
    picker allocates enough per request that those collections come often: freezing them took 4-8% off
    the embedded picker's CPU per decision (docs/benchmarks/picker.md). Objects made later are collected
    as usual. Returns how many objects are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
