"""approxdarts_np: DARTS architecture search with 8-bit approximate multipliers, in NumPy and Numba.

Importing the package sets how idle threads wait, before Numba starts its thread
pool. Numba's parallel kernels run on GNU OpenMP here. Unless the environment
already sets ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``, the idle workers spin
for ``GOMP_SPINCOUNT=WAKE_SPINS`` turns of a pause loop (microseconds) and then
sleep (``OMP_WAIT_POLICY=passive``):
- a step makes thousands of parallel calls a few tens of microseconds apart,
  and a worker that is still spinning takes the next one at once, where waking
  a sleeping one costs tens of microseconds per call;
- a worker never spins for long, so between steps and during long Python
  stretches it sleeps;
- when other CPU-bound processes run (parallel trials of a sweep, other users),
  even a short spin takes a core from the thread doing the work, so the kernels
  then leave the workers asleep and run serially
  (:mod:`approxdarts_np.kernels.crowding`).
The waiting changes only how idle threads wait, not how work is split, so
results stay bit-identical for a fixed thread count (``docs/results.md``,
"Threads and sharing", has the step times). See
:mod:`approxdarts_np.kernels.threads`.

It also makes sure Numba has a folder to cache compiled kernels in when the
package folder is not writable (:mod:`approxdarts_np.kernel_cache`);
``KERNEL_CACHE_NOTE`` is then the one-line note the command line prints, else None.
"""
import os

from approxdarts_np.kernel_cache import choose_cache_dir

WAKE_SPINS = 3000
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = str(WAKE_SPINS)
os.environ.setdefault("OMP_WAIT_POLICY", "passive")
KERNEL_CACHE_NOTE = choose_cache_dir()
