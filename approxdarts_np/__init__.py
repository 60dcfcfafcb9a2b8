"""approxdarts_np: DARTS architecture search with 8-bit approximate multipliers, in NumPy and Numba.

Importing the package sets one threading default before Numba starts its thread
pool: ``OMP_WAIT_POLICY=passive`` (a variable already set in the environment
wins). Numba's parallel kernels run on GNU OpenMP here, whose idle workers
otherwise spin between kernels; on a machine where other CPU-bound processes
run (parallel trials of a sweep, other users) the spinning workers take the
cores from the threads doing the work (``docs/results.md``, "Threads and
sharing", has the step time with a busy neighbour). The policy changes only how
idle threads wait, not how work is split, so results stay bit-identical for a
fixed thread count. See :mod:`approxdarts_np.kernels.threads`.

It also makes sure Numba has a folder to cache compiled kernels in when the
package folder is not writable (:mod:`approxdarts_np.kernel_cache`);
``KERNEL_CACHE_NOTE`` is then the one-line note the command line prints, else None.
"""
import os

from approxdarts_np.kernel_cache import choose_cache_dir

os.environ.setdefault("OMP_WAIT_POLICY", "passive")
KERNEL_CACHE_NOTE = choose_cache_dir()
