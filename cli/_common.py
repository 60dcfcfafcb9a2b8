"""What every command shares: turning user errors into one line and exit code 2."""
from __future__ import annotations

import functools
from typing import Callable, TypeVar

import typer
from rich.console import Console

from approxdarts_np.errors import UserError

F = TypeVar("F", bound=Callable)

err_console = Console(stderr=True, highlight=False)


def fail(message: str) -> None:
    """Print one error line and exit with code 2."""
    err_console.print(f"error: {message}", markup=False, soft_wrap=True)
    raise typer.Exit(code=2)


def user_errors(func: F) -> F:
    """Decorate a command so a UserError becomes one line and exit code 2, no traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UserError as exc:
            fail(str(exc))

    return wrapper  # type: ignore[return-value]
