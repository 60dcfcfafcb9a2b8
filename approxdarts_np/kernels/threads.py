"""The thread policy of a run: Numba kernel threads, BLAS at one thread, idle threads that sleep.

One policy for the whole process, set once per run (not per kernel call):

* Numba runs the parallel kernels on ``threads`` threads (default: all cores).
  More threads than cores is refused: the workers would only take turns.
* BLAS is held at one thread. The BLAS calls that matter (the convolutions'
  GEMMs) are made from inside the parallel Numba kernels, one per Numba
  thread; a multithreaded OpenBLAS next to Numba's pool slowed both (see the
  reasons in :mod:`approxdarts_np.kernels.conv`). Holding it once per
  run replaces a ``threadpoolctl`` limit around every kernel call, a fixed
  cost per call that dominated small steps.
* Idle OpenMP workers spin for a few microseconds, then sleep: the package
  sets ``GOMP_SPINCOUNT`` and ``OMP_WAIT_POLICY=passive`` at import unless the
  environment sets either (:mod:`approxdarts_np`). Back-to-back kernels find
  the workers awake; between steps they sleep. While other processes take the
  cores, the kernels run serially and leave the workers asleep
  (:mod:`approxdarts_np.kernels.crowding`), so a run shares the machine with
  other runs.

Results are bit-identical for a fixed thread count (every kernel splits its
work by the thread count only, never by timing); a run records the count it used.

Use :func:`thread_policy` around a run (restores the previous settings on
exit), or :func:`configure_threads` to set the policy for the rest of the
process. :func:`blas_is_single_threaded` lets a kernel check cheaply that it
runs under the policy.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
from typing import Iterator

import numba
from threadpoolctl import ThreadpoolController

from approxdarts_np.errors import UserError


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_threads(threads: int | None) -> int:
    """The Numba thread count for ``threads`` (None: every core Numba may use); UserError if impossible."""
    limit = min(numba.config.NUMBA_NUM_THREADS, available_cores())
    if threads is None:
        return max(1, limit)
    n = int(threads)
    if n < 1:
        raise UserError(f"--threads must be positive, got {threads}")
    cores = available_cores()
    if n > cores:
        raise UserError(f"--threads {n} is more than the {cores} cores of this machine")
    if n > numba.config.NUMBA_NUM_THREADS:
        raise UserError(f"--threads {n} is more than NUMBA_NUM_THREADS={numba.config.NUMBA_NUM_THREADS}")
    return n


@functools.lru_cache(maxsize=1)
def _blas_controller() -> ThreadpoolController:
    """A controller over every BLAS the kernels use, built once per process.

    Numba's ``np.dot`` calls scipy's BLAS, which is loaded on first use; it is
    imported here so that the controller knows that library too.
    """
    importlib.import_module("scipy.linalg.cython_blas")
    return ThreadpoolController()


def _blas_limits() -> list[int]:
    return [lib["num_threads"] for lib in _blas_controller().select(user_api="blas").info()]


def blas_is_single_threaded() -> bool:
    """True when every BLAS the kernels use runs on one thread (the policy is in force)."""
    return all(n == 1 for n in _blas_limits())


def configure_threads(threads: int | None) -> int:
    """Set the policy for the rest of the process: ``threads`` Numba threads, one BLAS thread.

    Returns the Numba thread count (None: all cores). Raises UserError when
    ``threads`` is not positive or exceeds the machine's cores.
    """
    n = resolve_threads(threads)
    numba.set_num_threads(n)
    _blas_controller().limit(limits=1, user_api="blas")
    return n


@contextlib.contextmanager
def thread_policy(threads: int | None) -> Iterator[int]:
    """Run the block under the policy (``threads`` Numba threads, one BLAS thread); restore on exit.

    Yields the Numba thread count. For a run: ``with thread_policy(config.threads) as n: ...``.
    """
    n = resolve_threads(threads)
    previous = numba.get_num_threads()
    limiter = _blas_controller().limit(limits=1, user_api="blas")
    numba.set_num_threads(n)
    try:
        yield n
    finally:
        numba.set_num_threads(previous)
        limiter.restore_original_limits()
