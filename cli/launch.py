"""The ``approxdarts-np`` entry point: signals and start-up problems as one line, then the typer app.

Importing the commands takes a second or more (NumPy, Numba, the kernels); a
Ctrl-C or SIGTERM in that time would otherwise end in a traceback or a bare
signal exit. From the first line here a SIGINT exits 130 and a SIGTERM 143,
each with one line on stderr; inside a run the run loop takes the signals
over (a checkpoint at the next step boundary). This module imports nothing
heavy at its top so that the handlers are in place before the imports start.
"""
from __future__ import annotations

import signal
import sys


class Terminated(BaseException):
    """SIGTERM arrived outside a run loop (a BaseException so that nothing on the way swallows it)."""


# Signals that arrived before a run loop took them over. An interrupt raised inside a C callback (Numba
# compiling a kernel) cannot propagate and is dropped by Python, so it is also recorded here and acted on
# at the next safe point: the start of a run (progress "start" event) or the end of the command.
PENDING: list[int] = []


def _terminate(signum, frame) -> None:
    PENDING.append(signum)
    raise Terminated()


def _interrupt(signum, frame) -> None:
    PENDING.append(signum)
    raise KeyboardInterrupt()


def _unraisable(info) -> None:
    """Python's hook for exceptions it cannot raise: an interrupt recorded in PENDING is not printed."""
    if isinstance(info.exc_value, (KeyboardInterrupt, Terminated)):
        return
    sys.__unraisablehook__(info)


def raise_pending() -> None:
    """Raise the signal recorded in PENDING, if any (a safe point)."""
    if PENDING:
        raise Terminated() if PENDING[0] == signal.SIGTERM else KeyboardInterrupt()


def _interrupt_of(exc: BaseException) -> BaseException | None:
    """The KeyboardInterrupt or Terminated behind ``exc`` (Numba can wrap one in a SystemError), else None."""
    if isinstance(exc, (KeyboardInterrupt, Terminated)):
        return exc
    if isinstance(exc, SystemError) and isinstance(exc.__context__, (KeyboardInterrupt, Terminated)):
        return exc.__context__
    return None


def _say(line: str, code: int) -> None:
    print(line, file=sys.stderr, flush=True)
    sys.exit(code)


def _option_errors() -> tuple[type, ...]:
    """The exception classes of a bad command line: typer's own (it carries a copy of click since 0.29)
    and click's (older typer)."""
    import typer

    kinds = [typer.TyperException] if hasattr(typer, "TyperException") else []
    try:
        import click
        kinds.append(click.ClickException)
    except ImportError:
        pass
    return tuple(kinds)


def _run(app) -> int | None:
    """Run the typer app; a bad option or value is one line ``error: …`` and exit 2, as every other bad
    input (typer would print a usage box of five lines or more)."""
    from typer import rich_utils

    try:
        code = app(standalone_mode=False)
    except _option_errors() as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            rich_utils.rich_format_error(exc)  # no command given: the help, as typer prints it
            return exc.exit_code
        ctx = getattr(exc, "ctx", None)
        hint = f" (options: {ctx.command_path} --help)" if ctx is not None else ""
        _say(f"error: {exc.format_message()}{hint}", exc.exit_code)
    return code if isinstance(code, int) else 0


def main() -> None:
    """Run the command line; exit 130 on Ctrl-C and 143 on SIGTERM with one line, whenever they come."""
    signal.signal(signal.SIGTERM, _terminate)
    # A shell starts background jobs with SIGINT ignored, and Python then leaves it ignored; the run loop
    # takes SIGINT over in any case, so the start-up answers it the same way wherever it was launched from.
    signal.signal(signal.SIGINT, _interrupt)
    sys.unraisablehook = _unraisable
    try:
        import approxdarts_np
        from approxdarts_np_cli.compiling import announce

        announce()  # one line when kernels compile (first run), so the wait is not taken for a hang
        if approxdarts_np.KERNEL_CACHE_NOTE:
            print(approxdarts_np.KERNEL_CACHE_NOTE, file=sys.stderr, flush=True)
        from approxdarts_np_cli.main import app

        try:
            code = _run(app)
        except SystemExit as exc:
            code = exc.code
        if code in (0, None):
            raise_pending()  # an interrupt a callback swallowed, while the command went on to its end
        sys.exit(code)
    except (KeyboardInterrupt, Terminated, SystemError) as exc:
        what = _interrupt_of(exc)
        if what is None:
            raise
        if isinstance(what, Terminated):
            _say("terminated (SIGTERM)", 128 + signal.SIGTERM)
        _say("interrupted (Ctrl-C)", 128 + signal.SIGINT)
    except RuntimeError as exc:
        if "no locator available" not in str(exc):
            raise
        _say(f"error: Numba found no writable folder to cache compiled kernels in ({exc}); "
             f"set NUMBA_CACHE_DIR to a writable folder", 2)
