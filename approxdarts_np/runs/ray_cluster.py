"""Ray for the commands that use it (sweeps, a search over several workers): importing it, starting or
joining a cluster, checking an address, one line per remote error, and Ray's console lines left out.

Ray is an optional extra (``pip install -e ".[sweep]"``); :func:`import_ray` imports it and names the
install command when it is missing.
"""
from __future__ import annotations

import logging
import re
import socket

from approxdarts_np.errors import UserError
from approxdarts_np.runs.sweep_trials import short_repr

_ADDRESS = re.compile(r"(?:ray://)?(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]):(\d{1,5})")


def import_ray(needed_by: str, tune: bool = False):
    """The ``ray`` module (with Ray Tune when ``tune``); UserError naming the install command when Ray
    is missing."""
    try:
        import ray  # optional extra ".[sweep]": Ray is imported only where it is used
        if tune:
            from ray import tune as _  # noqa: F401  (the extra installs ray[tune])
    except ImportError:
        raise UserError(f'{needed_by} needs Ray: pip install -e ".[sweep]"') from None
    return ray


def start_ray(ray, address: str | None) -> bool:
    """Start a local Ray or join the cluster at ``address`` unless Ray runs in this process; whether it started."""
    if ray.is_initialized():
        return False
    if address is not None:
        check_address(address)
    try:
        if address is not None:
            ray.init(address=address, logging_level="warning", log_to_driver=False)
        else:
            ray.init(include_dashboard=False, logging_level="warning", log_to_driver=False)
    except ConnectionError as exc:
        raise UserError(f"cannot join the Ray cluster at {address}: {exc}") from None
    return True


def check_address_form(address: str | None) -> None:
    """UserError unless ``address`` is None, ``auto``, ``local``, HOST:PORT or ray://HOST:PORT (Ray
    itself answers anything else with a ValueError traceback)."""
    if address is None or address in ("auto", "local"):
        return
    match = _ADDRESS.fullmatch(address)
    if match is None or not 1 <= int(match[1]) <= 65535:
        raise UserError(f"--address must be auto, local, HOST:PORT or ray://HOST:PORT (e.g. 10.0.0.1:6379), "
                        f"got {short_repr(address)}")


def check_address(address: str, timeout_s: float = 5.0) -> None:
    """UserError unless ``host:port`` accepts a connection (Ray itself retries an unreachable address for
    minutes); ``auto`` and other forms without a port are left to Ray."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise UserError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc} (start it with "
                        f"`ray start --head` on that machine)") from None


def error_line(error: BaseException) -> str:
    """One line for a trial's error: a UserError's message, otherwise the exception's type and first line.

    An exception raised inside a trial reaches the driver wrapped in a RayTaskError whose text is the
    remote traceback; its ``cause`` is the exception itself (an ActorDiedError can hold such a RayTaskError
    in turn). Errors without a cause (an ActorDiedError when the trial's process died) give their first line.
    """
    for _ in range(3):
        cause = getattr(error, "cause", None)
        if not isinstance(cause, BaseException):
            break
        error = cause
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if isinstance(error, UserError) and lines:
        return lines[0]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


class _DropRecords(logging.Filter):
    """A logging filter that drops the records whose message starts with one of ``starts``."""

    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


# Ray's console lines that the sweep leaves out (logger, start of the message), each for a reason.
_RAY_LINES_LEFT_OUT = {
    # Ray's default for a local Ray (and for `auto` when a token exists), announced on every start.
    "ray._private.authentication.authentication_token_setup": ("Token authentication is enabled",),
    # After Ctrl-C: Ray's "Resume experiment with: Tuner.restore(...)"; the CLI names `sweep --resume`.
    # After failed trials: the list of trial ids; the CLI names each failed trial and its error.
    "ray.tune.tune": ("Experiment has been interrupted", "Trials did not complete"),
}


def quiet_ray_lines() -> None:
    """Leave Ray's lines in ``_RAY_LINES_LEFT_OUT`` out of the console (once per process)."""
    for name, starts in _RAY_LINES_LEFT_OUT.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropRecords) for f in logger.filters):
            logger.addFilter(_DropRecords(starts))
