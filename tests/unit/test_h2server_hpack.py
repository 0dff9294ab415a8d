"""The h2 server's header-block memo: identical blocks are decoded once, and never after the HPACK dynamic
table changed (the same bytes can then mean other headers)."""

from __future__ import annotations

import hpack

from inferoute.epp.serving.h2core import H2Core, Limits


def test_repeated_blocks_are_reused_until_the_dynamic_table_changes() -> None:
    enc = hpack.Encoder()
    conn = H2Core(Limits(), 0.0)
    insert_a = enc.encode([(b"x-a", b"1")])  # literal with incremental indexing: A becomes entry 62
    assert conn._decode(insert_a) == [(b"x-a", b"1")]
    ref62 = b"\xbe"  # indexed field, index 62: the newest dynamic entry
    assert conn._decode(ref62) == [(b"x-a", b"1")]
    assert conn._blocks == {ref62: [(b"x-a", b"1")]}  # a block that changed nothing is remembered
    assert conn._blocks[ref62] == [(b"x-a", b"1")]
    conn._decode(enc.encode([(b"x-b", b"2")]))  # B inserted: 62 is now B
    assert conn._blocks == {}
    assert conn._decode(ref62) == [(b"x-b", b"2")]


def test_reinserting_an_equal_header_still_invalidates() -> None:
    """The table's first entry is compared by identity: adding an equal header again shifts the indices."""
    enc = hpack.Encoder()
    conn = H2Core(Limits(), 0.0)
    conn._decode(enc.encode([(b"x-a", b"1")]))
    conn._decode(enc.encode([(b"x-b", b"2")]))  # table: [B, A]
    ref63 = b"\xbf"  # index 63: A
    assert conn._decode(ref63) == [(b"x-a", b"1")]
    again = b"\x40\x03x-b\x012"  # literal with incremental indexing, new name: B again -> [B', B, A]
    assert conn._decode(again) == [(b"x-b", b"2")]
    assert conn._decode(ref63) == [(b"x-b", b"2")]  # 63 is now the older B
