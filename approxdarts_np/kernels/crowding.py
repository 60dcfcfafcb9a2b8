"""Whether other processes are taking the cores the thread team needs.

The OpenMP workers wait for the next parallel kernel by spinning for a few microseconds and then
sleeping (``GOMP_SPINCOUNT``, set by :mod:`approxdarts_np` at import). A short spin wakes them
for the next kernel almost at once, where a sleeping worker costs tens of microseconds per
parallel call. But a spinning worker takes a core; when another CPU-bound process runs on the
machine, it takes it from the thread that does the work between the kernels.

So the kernels ask :func:`crowded` before waking the team (``kernels._util.parallel_pays``).
It compares, at most every :data:`INTERVAL` seconds, the CPU time the whole machine spent busy
with this process's own CPU time: the rest is other processes' (and, in a virtual machine, the
time the host gave the cores to others, "steal"). When they use more than the cores the team
leaves free, plus half a core, every kernel runs its serial twin on the calling thread (the
workers then stay asleep) until the others' use drops below the spare cores plus a quarter of a
core. Results are the same bits either way: a kernel's result depends on the thread count it
is given only.

Only Linux tells the machine's busy time (``/proc/stat``); elsewhere :func:`crowded` is False.
"""
from __future__ import annotations

import os
import time

# Seconds between two looks at the machine; a look costs a file read.
INTERVAL = 0.5
# Others' use, in cores beyond the ones the team leaves free, that makes the kernels go serial,
# and the use below which they go back to the thread team.
CROWDED_ABOVE = 0.5
CLEAR_BELOW = 0.25

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def machine_busy_seconds() -> float | None:
    """CPU seconds all cores of the machine spent busy since boot (None where not known):
    ``/proc/stat``'s user, nice, system, irq, softirq and steal time."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != b"cpu":
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / _TICKS


class Crowding:
    """The state behind :func:`crowded`; the clocks and readers are arguments for tests."""

    def __init__(self, busy=machine_busy_seconds, own=time.process_time, wall=time.monotonic,
                 cores=None):
        self.busy, self.own, self.wall = busy, own, wall
        self.cores = cores
        self.state = False
        self.serial_calls = 0      # calls the crowding sent to a serial twin
        self.others = None         # the others' use at the last look, in cores
        self._last = None          # (wall, busy, own) of the last look
        self._next = 0.0

    def _cores(self) -> int:
        if self.cores is None:
            from approxdarts_np.kernels.threads import available_cores
            self.cores = available_cores()
        return self.cores

    def look(self, team: int) -> bool:
        """Update the state from the machine's use since the last look (``team``: the number of
        threads a parallel kernel would run on); returns it."""
        now = self.wall()
        busy = self.busy()
        if busy is None:
            self.state, self._next = False, float("inf")
            return False
        own = self.own()
        if self._last is not None and now > self._last[0]:
            others = ((busy - self._last[1]) - (own - self._last[2])) / (now - self._last[0])
            self.others = others
            spare = max(self._cores() - team, 0)
            if others > spare + CROWDED_ABOVE:
                self.state = True
            elif others < spare + CLEAR_BELOW:
                self.state = False
        self._last = (now, busy, own)
        self._next = now + INTERVAL
        return self.state

    def __call__(self, team: int) -> bool:
        if self.wall() >= self._next:
            self.look(team)
        if self.state:
            self.serial_calls += 1
        return self.state


_CROWDING = Crowding()


def crowded(team: int) -> bool:
    """Whether a kernel about to wake a team of ``team`` threads should run serially instead,
    because other processes use the cores (see the module docstring)."""
    return _CROWDING(team)


def crowding() -> Crowding:
    """The process's crowding state (what benchmarks record)."""
    return _CROWDING
