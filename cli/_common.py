"""What every command shares: one-line user errors (exit 2), interrupts (exit 130)."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, TypeVar

import typer
from rich.console import Console

from approxdarts_np.errors import UserError
from approxdarts_np.io.rundir import CHECKPOINT
from approxdarts_np.runs.loop import RunInterrupted

F = TypeVar("F", bound=Callable)

err_console = Console(stderr=True, highlight=False)


def fail(message: str) -> None:
    """Print one error line and exit with code 2."""
    err_console.print(f"error: {message}", markup=False, soft_wrap=True)
    raise typer.Exit(code=2)


def user_errors(func: F) -> F:
    """Decorate a command so a UserError becomes one line and exit code 2, and a Ctrl-C one line and 130."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UserError as exc:
            fail(str(exc))
        except (KeyboardInterrupt, SystemError) as exc:
            # Outside a run loop (loading data, building the network, the first compile). typer would turn
            # the interrupt into a silent exit 130; Numba can wrap it in a SystemError.
            if isinstance(exc, SystemError) and not isinstance(exc.__context__, KeyboardInterrupt):
                raise
            err_console.print("interrupted (Ctrl-C)", markup=False, soft_wrap=True)
            raise typer.Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


def run_with_interrupts(run: Callable[[], dict], console: Console, resume_hint: str, folder) -> dict:
    """Call ``run``; a stop on a signal prints where the run stands and exits 128 + signal (130 for Ctrl-C)."""
    try:
        return run()
    except RunInterrupted as exc:
        console.print(f"stopped at epoch {exc.epoch + 1}, step {exc.step}; checkpoint saved. "
                      f"Continue with: {resume_hint}", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(code=exc.exit_code) from None
    except (KeyboardInterrupt, SystemError) as exc:
        # A second Ctrl-C abandons the step in progress; Numba can wrap the interrupt in a SystemError.
        if isinstance(exc, SystemError) and not isinstance(exc.__context__, KeyboardInterrupt):
            raise
        if not (Path(folder) / CHECKPOINT).is_file():
            # Ctrl-C while the data loaded or the network was built: the run never began.
            console.print(f"interrupted before the run started; nothing was written to {folder}",
                          highlight=False, markup=False, soft_wrap=True)
        else:
            console.print(f"abandoned the step in progress; the last checkpoint in {folder} is kept. "
                          f"Continue with: {resume_hint}", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(code=130) from None
