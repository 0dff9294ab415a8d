"""CPU evidence for a benchmark point: did the processes get the CPU they needed? (Linux /proc).

A routing point's latencies are only the routers' and the simulated engines' if the simulator, the router and
the load generator ran when they wanted to. :class:`CpuProbe` snapshots, for each role's process tree (every
thread of every process), the CPU time used and the time spent runnable but waiting for a CPU
(``/proc/PID/task/TID/schedstat``: time on a CPU and run-queue delay, in nanoseconds), plus the
machine's busy share (``/proc/stat``) and load average. :meth:`CpuProbe.finish` turns two snapshots into
shares of the wall time between them:

* ``<role>_cpu`` — CPU seconds per wall second (1.0 = one core busy all the time);
* ``<role>_wait`` — run-queue seconds per wall second, summed over threads: time the role was ready to run and
  a CPU was not free. Near 0: the role was never held back; a simulator with ``sim_wait`` 0.3 fired its
  timers up to hundreds of ms late in total each second.
* ``machine_busy`` — share of all CPUs busy (any process), ``load1`` — the 1-minute load average at the end.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from inferoute.bench.peers import process_tree


def tree_times(pids: Sequence[int], descendants: bool = True) -> tuple[float, float]:
    """(CPU seconds, run-queue wait seconds) summed over every thread of ``pids`` (and their descendants)."""
    cpu = wait = 0.0
    for root in pids:
        for pid in process_tree(root) if descendants else [root]:
            with contextlib.suppress(OSError):
                for task in Path(f"/proc/{pid}/task").iterdir():
                    with contextlib.suppress(OSError, ValueError, IndexError):
                        on_cpu, waited = (task / "schedstat").read_text().split()[:2]
                        cpu += int(on_cpu) / 1e9
                        wait += int(waited) / 1e9
    return cpu, wait


def machine_times() -> tuple[float, float]:
    """(busy, total) jiffies over all CPUs since boot (``/proc/stat``; iowait counts as idle)."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])
    return float(total - idle), float(total)


def load1() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


@dataclass(slots=True)
class CpuProbe:
    """CPU used and run-queue waits of named process trees between :meth:`start` and :meth:`finish`."""

    roles: Mapping[str, Sequence[int]]
    """Role name (``sim``, ``router``, ``loadgen``) to root pids."""
    shallow: frozenset[str] = frozenset()
    """Roles counted without their descendants (the load generator: this process, whose children are the
    simulator and the router)."""
    _start: dict[str, tuple[float, float]] = field(default_factory=dict)
    _machine: tuple[float, float] = (0.0, 0.0)
    _t0: float = 0.0

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._start = {role: self._times(role) for role in self.roles}
        self._machine = machine_times()

    def finish(self) -> dict[str, float]:
        wall = max(time.monotonic() - self._t0, 1e-9)
        out: dict[str, float] = {}
        for role in self.roles:
            cpu, wait = self._times(role)
            cpu0, wait0 = self._start.get(role, (cpu, wait))
            out[f"{role}_cpu"] = round((cpu - cpu0) / wall, 4)
            out[f"{role}_wait"] = round((wait - wait0) / wall, 4)
        busy, total = machine_times()
        if total > self._machine[1]:
            out["machine_busy"] = round((busy - self._machine[0]) / (total - self._machine[1]), 4)
        out["load1"] = load1()
        out["wall_s"] = round(wall, 3)
        return out

    def _times(self, role: str) -> tuple[float, float]:
        return tree_times(self.roles[role], descendants=role not in self.shallow)
