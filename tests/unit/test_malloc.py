"""The allocator settings apply on glibc (this project's platform) and yield to glibc's own variables; the
start-up freeze keeps the collector working on what comes later."""

from __future__ import annotations

import ctypes

import pytest

from inferoute.malloc import keep_large_buffers


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in [
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        ]
    ]


def test_large_buffers_come_from_the_heap(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    assert keep_large_buffers() is True
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    before = libc.mallinfo2().hblks  # regions served by mmap
    block = libc.malloc(4 << 20)  # 4 MiB: above glibc's default threshold, below ours
    during = libc.mallinfo2().hblks
    libc.free(block)
    assert block and during == before


def test_operator_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert keep_large_buffers() is False


def test_freeze_keeps_startup_objects_out_of_collections_but_collects_later_garbage() -> None:
    import gc
    import weakref

    from inferoute.malloc import freeze_startup_objects

    class Node:
        pass

    try:
        freeze_startup_objects()
        assert gc.get_freeze_count() > 1000  # the interpreter's and the suite's objects
        a, b = Node(), Node()
        a.other, b.other = b, a  # type: ignore[attr-defined]  # a cycle made after the freeze
        ref = weakref.ref(a)
        del a, b
        gc.collect()
        assert ref() is None
    finally:
        gc.unfreeze()
