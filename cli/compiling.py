"""One line on stderr when a command starts compiling kernels (an empty or outdated Numba cache).

Numba compiles each kernel the first time it runs and keeps the machine code in its on-disk
cache; on a first run the first search step waits for that compiling (``docs/results.md``,
"The first run", and ``benchmarks/results/bench_first_run.json``). Numba reports every real
compile (not a load from the cache) as a ``numba:compile`` event; the first one prints the
line below, so a user knows the wait is not a hang.
"""
from __future__ import annotations

import sys
from typing import Callable

from numba.core import event

MESSAGE = "compiling kernels (first run only; the first step can take a minute or two)"


class FirstCompile(event.Listener):
    """Calls ``say(MESSAGE)`` at the first compile it hears of, and never again."""

    def __init__(self, say: Callable[[str], None]):
        self.say = say
        self.said = False

    def on_start(self, ev) -> None:
        if not self.said:
            self.said = True
            self.say(MESSAGE)

    def on_end(self, ev) -> None:
        pass


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def announce(say: Callable[[str], None] = _to_stderr) -> FirstCompile:
    """Register a :class:`FirstCompile` for the rest of the process and return it."""
    listener = FirstCompile(say)
    event.register("numba:compile", listener)
    return listener
