"""Thread counts of the Numba kernels and of BLAS, set together.

Results are bit-identical for a fixed thread count; a run records the count it used.
"""
from __future__ import annotations

import numba
from threadpoolctl import threadpool_limits


def configure_threads(threads: int | None) -> int:
    """Use ``threads`` threads for Numba kernels and BLAS (None: all cores). Returns the count in use."""
    n = numba.config.NUMBA_NUM_THREADS if threads is None else int(threads)
    n = max(1, min(n, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    threadpool_limits(limits=n, user_api="blas")
    return n
