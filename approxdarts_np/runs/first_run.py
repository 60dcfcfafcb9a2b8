"""A run's kernels compile in two processes when Numba's cache does not hold them yet.

Most kernels come in two variants, parallel and serial (:func:`approxdarts_np.kernels._util.
serial_twin`), and a run uses both: the parallel one on large arrays, the serial one on small
ones. On an empty cache a search therefore compiles both before its first step ends, and the
parallel variants take most of that time (``docs/results.md``, "The first run").

:func:`compile_split` shares the work out. When the cache misses the run's kernels, the run
takes the serial variants only (the same bits: a kernel's result depends on the thread count
it is given only) while a second process runs the same kind of run on a few images with the
parallel variants only, into a temporary folder, writing them to the cache. When that process
ends, the run goes back to choosing by size and loads the parallel variants from the cache.
A run on one thread takes the serial variants throughout and never needs the parallel ones.

The second process is started in its own session (a Ctrl-C at the terminal reaches the run,
which then stops it), prints nothing and is stopped when the run ends, however it ends.
``APPROXDARTS_NP_COMPILE_SPLIT=0`` in the environment switches the split off (everything then
compiles in the run, as it needs it).
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from typing import Iterator

from approxdarts_np.kernels._util import force_variant

# Set in the second process, so that it never starts a third.
_CHILD_ENV = "APPROXDARTS_NP_COMPILE_CHILD"
_SWITCH_ENV = "APPROXDARTS_NP_COMPILE_SPLIT"


def kernels_cached() -> bool | None:
    """Whether Numba's cache holds, for this CPU, the parallel forward convolution every run
    compiles: True, False, or None when there is no on-disk cache to share (or it cannot tell)."""
    from approxdarts_np.kernels import conv

    kernel = conv._patch_products_kernel
    try:
        index = kernel._cache._cache_file._load_index()
        magic = kernel.targetctx.codegen().magic_tuple()
    except AttributeError:   # no on-disk cache (Numba's NullCache) or another Numba layout
        return None
    return any(key[1] == magic for key in index)


class _Split:
    """The second process and the variant the run forced while it runs."""

    def __init__(self, process: subprocess.Popen | None, folder: tempfile.TemporaryDirectory | None):
        self.process, self.folder = process, folder

    def poll(self) -> None:
        """Back to choosing by size once the second process has ended."""
        if self.process is not None and self.process.poll() is not None:
            self._end()

    def _end(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(timeout=10)
                if self.process.poll() is None:
                    self.process.kill()
                    self.process.wait()
            self.process = None
            force_variant(None)
        if self.folder is not None:
            self.folder.cleanup()
            self.folder = None


@contextlib.contextmanager
def compile_split(kind: str, config, threads: int) -> Iterator[_Split]:
    """Around a run, from before it builds its network (a search's count of multiply-accumulates
    runs the supernet, which compiles kernels) to its end: split the compiling as the module
    docstring says; call ``poll()`` between steps. ``kind`` is "search" or "train", ``config``
    the run's config, ``threads`` the number of kernel threads the run uses."""
    if os.environ.get(_CHILD_ENV):        # the second process itself: parallel variants only
        yield _Split(None, None)
        return
    if threads <= 1:
        before = force_variant("serial")
        try:
            yield _Split(None, None)
        finally:
            force_variant(before)
        return
    if os.environ.get(_SWITCH_ENV, "1") == "0" or kernels_cached() is not False:
        yield _Split(None, None)
        return
    folder = tempfile.TemporaryDirectory(prefix="approxdarts-np-compile-")
    payload = {"kind": kind, "config": config.to_dict(), "output_dir": folder.name}
    env = dict(os.environ, **{_CHILD_ENV: "1"})
    process = subprocess.Popen([sys.executable, "-m", "approxdarts_np.runs.first_run"],
                               stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=env, start_new_session=True, text=True)
    split = _Split(process, folder)
    try:
        process.stdin.write(json.dumps(payload))
        process.stdin.close()
    except OSError:       # the second process ended at once: nothing to share out
        split._end()
        yield split
        return
    force_variant("serial")
    try:
        yield split
    finally:
        split._end()


def _child(payload: dict) -> None:
    """The second process: the same kind of run on four batches of images, one epoch, parallel
    kernels only (every epoch-end path runs too, so its parallel variants compile as well)."""
    from approxdarts_np.runs.search import SearchConfig, run_search
    from approxdarts_np.runs.train import TrainConfig, run_train

    cls, run = {"search": (SearchConfig, run_search), "train": (TrainConfig, run_train)}[payload["kind"]]
    config = cls.from_dict(payload["config"])
    changes = dict(output_dir=payload["output_dir"], epochs=1, threads=1,
                   max_train_images=4 * config.batch_size)
    if "warmup_epochs" in payload["config"]:
        changes["warmup_epochs"] = 0     # the architecture step's kernels too
    force_variant("parallel")
    run(config.replace(**changes))


if __name__ == "__main__":
    _child(json.loads(sys.stdin.read()))
