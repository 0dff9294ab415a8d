"""Time as an injected dependency, so pure logic is tested without sleeps.

:class:`Clock` reads the time; :class:`Timer` also runs callbacks at a time (an asyncio event loop is one:
``loop.time()`` and ``loop.call_at``). :class:`FakeClock` and :class:`ManualTimer` move only when a test
tells them to.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds."""
        ...


class SystemClock:
    """The real monotonic clock."""

    __slots__ = ()

    def now(self) -> float:
        return time.monotonic()


class FakeClock:
    """A clock that moves only when told to (tests)."""

    __slots__ = ("t",)

    def __init__(self, start: float = 0.0) -> None:
        self.t = start

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("time does not go backwards")
        self.t += seconds


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class Timer(Protocol):
    """Monotonic time and callbacks at a given time; ``asyncio.AbstractEventLoop`` satisfies it."""

    def time(self) -> float: ...

    def call_at(self, when: float, callback: Callable[[], object]) -> Cancellable: ...


class _Call:
    __slots__ = ("callback", "cancelled")

    def __init__(self, callback: Callable[[], object]) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualTimer:
    """A :class:`Timer` (and :class:`Clock`) whose time moves only in :meth:`advance` (tests).

    ``early``: each callback runs that many seconds before its time, as an event loop's timers may (they
    fire within the clock's resolution), so code that reschedules itself is tested against it.
    """

    def __init__(self, start: float = 0.0, *, early: float = 0.0) -> None:
        self.t = start
        self.early = early
        self._due: list[tuple[float, int, _Call]] = []
        self._order = itertools.count()

    def time(self) -> float:
        return self.t

    now = time

    def call_at(self, when: float, callback: Callable[[], object]) -> Cancellable:
        call = _Call(callback)
        heapq.heappush(self._due, (when, next(self._order), call))
        return call

    def advance(self, seconds: float) -> int:
        """Move time forward, running every callback that falls due on the way, each at its own time (in
        time order; a callback may schedule more). Returns how many ran."""
        if seconds < 0:
            raise ValueError("time does not go backwards")
        target = self.t + seconds
        ran = 0
        while self._due and self._due[0][0] - self.early <= target:
            when, _, call = heapq.heappop(self._due)
            if call.cancelled:
                continue
            self.t = max(self.t, when - self.early)
            call.callback()
            ran += 1
        self.t = target
        return ran
