"""Thread counts of the Numba kernels and of BLAS, set together for a run.

Numba runs the parallel kernels on ``threads`` threads; BLAS is held at one
thread for the whole run. The BLAS calls that matter (the convolutions' GEMMs)
are made from inside the parallel Numba kernels, one per thread, and a
multithreaded OpenBLAS next to Numba's pool slowed both (see the measurements
in :mod:`approxdarts_np.kernels.conv`). Results are bit-identical for a fixed
thread count; a run records the count it used.
"""
from __future__ import annotations

import numba
from threadpoolctl import threadpool_limits


def configure_threads(threads: int | None) -> int:
    """Use ``threads`` Numba threads (None: all cores) and one BLAS thread. Returns the Numba count."""
    n = numba.config.NUMBA_NUM_THREADS if threads is None else int(threads)
    n = max(1, min(n, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    threadpool_limits(limits=1, user_api="blas")
    return n
