"""The line a command prints when it starts compiling kernels (cli/compiling.py)."""
import subprocess
import sys

from numba import njit
from numba.core import event

from approxdarts_np_cli import compiling


def test_the_first_compile_is_announced_once():
    said = []
    listener = compiling.announce(said.append)
    try:
        @njit
        def first(x):
            return x + 1

        @njit
        def second(x):
            return x * 2

        assert said == []          # defining a kernel compiles nothing
        assert first(1) == 2
        assert said == [compiling.MESSAGE]
        assert second(2) == 4 and first(3) == 4
        assert said == [compiling.MESSAGE]
    finally:
        event.unregister("numba:compile", listener)


def test_the_command_line_registers_it(tmp_path):
    """The entry point announces compiles: a command that compiles a fresh kernel (here
    `multipliers show` on an empty Numba cache, which compiles the error-metric kernel) prints the line on
    stderr before anything else it prints there."""
    code = ("import sys; sys.argv = ['approxdarts-np', 'multipliers', 'show', 'mul8u_2P7'];"
            "from approxdarts_np_cli.launch import main; main()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"NUMBA_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin",
                               "HOME": str(tmp_path)}, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines()[0] == compiling.MESSAGE
