"""The gateway benchmark's open-loop client against a real backend (counts only, no timing assertions)."""

from __future__ import annotations

import hashlib

from test_gw_support import backends

from inferoute.bench.gateway import CHAT_BODY, OpenLoopClient, slice_order


async def test_open_loop_client_keeps_its_session_across_slices() -> None:
    async with backends("a") as (a,):
        async with OpenLoopClient(f"http://{a.key}/v1/chat/completions") as client:
            await client.warm(3)
            first, errors_first = await client.run(400.0, 0.02)  # 8 requests
            second, errors_second = await client.run(400.0, 0.01)  # 4 requests
        assert (len(first), errors_first, len(second), errors_second) == (8, 0, 4, 0)
        assert len(a.requests) == 3 + 8 + 4  # warm-up requests are sent, not measured
        assert all(v > 0 for v in first + second)
        assert {(r["method"], r["sha256"]) for r in a.requests} == {
            ("POST", hashlib.sha256(CHAT_BODY).hexdigest())
        }


async def test_open_loop_client_counts_error_answers() -> None:
    async with backends("a") as (a,):
        async with OpenLoopClient(f"http://{a.key}/status/503") as client:
            latencies, errors = await client.run(400.0, 0.01)
        assert (latencies, errors) == ([], 4)


def test_slice_order_rotates_every_round() -> None:
    paths = ["direct", "a", "b"]
    assert [slice_order(paths, i) for i in range(4)] == [
        ["direct", "a", "b"],
        ["a", "b", "direct"],
        ["b", "direct", "a"],
        ["direct", "a", "b"],
    ]
    assert slice_order([], 3) == []
