"""The manual timer the scraper tests drive time with (no sockets, no sleeps)."""

from __future__ import annotations

import pytest

from inferoute.clock import ManualTimer


def test_callbacks_run_in_time_order_each_at_its_own_time() -> None:
    timer = ManualTimer(10.0)
    seen: list[tuple[str, float]] = []
    timer.call_at(10.3, lambda: seen.append(("c", timer.time())))
    timer.call_at(10.1, lambda: seen.append(("a", timer.time())))
    timer.call_at(10.2, lambda: seen.append(("b", timer.time())))
    assert timer.advance(0.25) == 2
    assert seen == [("a", 10.1), ("b", 10.2)] and timer.time() == timer.now() == 10.25
    assert timer.advance(1.0) == 1 and seen[-1] == ("c", 10.3)


def test_a_callback_may_schedule_the_next_within_the_same_advance() -> None:
    timer = ManualTimer()
    ticks: list[float] = []

    def tick() -> None:
        ticks.append(timer.time())
        timer.call_at(timer.time() + 0.25, tick)

    timer.call_at(0.25, tick)
    assert timer.advance(1.0) == 4 and ticks == [0.25, 0.5, 0.75, 1.0]


def test_cancelled_callbacks_do_not_run() -> None:
    timer = ManualTimer()
    ran: list[int] = []
    timer.call_at(1.0, lambda: ran.append(1)).cancel()
    timer.call_at(2.0, lambda: ran.append(2))
    assert timer.advance(5.0) == 1 and ran == [2]


def test_early_fires_before_the_time_asked_for() -> None:
    timer = ManualTimer(early=0.001)
    at: list[float] = []
    timer.call_at(1.0, lambda: at.append(timer.time()))
    timer.advance(0.9985)
    assert at == []
    timer.advance(0.0005)
    assert at == [pytest.approx(0.999)]


def test_time_does_not_go_backwards() -> None:
    with pytest.raises(ValueError, match="backwards"):
        ManualTimer().advance(-1.0)
