"""The kernel variant switch and the compile split of a first run (runs/first_run.py)."""
import os
import subprocess
import sys
import time

import numba
import numpy as np
import pytest

from approxdarts_np.kernels import _util, conv, elementwise
from approxdarts_np.kernels.threads import available_cores
from approxdarts_np.runs import first_run
from approxdarts_np.runs.search import SearchConfig, run_search

TINY = dict(epochs=1, channels=2, layers=3, batch_size=4, max_train_images=16, seed=3)


@pytest.fixture(autouse=True)
def by_size():
    yield
    _util.force_variant(None)


def test_forced_variants_override_the_size(uncrowded):
    kernel, twin = conv._patch_products_kernel, conv._patch_products_kernel_serial
    assert _util.pick_kernel(kernel, twin, 10)[0] is twin
    assert _util.pick_kernel(kernel, twin, 10 ** 9)[0] is (kernel if numba.get_num_threads() > 1 else twin)
    assert _util.force_variant("serial") is None
    assert _util.pick_kernel(kernel, twin, 10 ** 9) == (twin, 1)
    assert not _util.parallel_pays(10 ** 9, elementwise.PARALLEL_MIN)
    assert _util.force_variant("parallel") == "serial"
    assert _util.pick_kernel(kernel, twin, 10)[0] is kernel
    assert _util.parallel_pays(1, elementwise.PARALLEL_MIN)
    with pytest.raises(ValueError, match="variant"):
        _util.force_variant("both")


def test_the_variants_give_the_same_bits():
    """What the split relies on: a step's kernels give the same bits, serial or parallel."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 9, 9)).astype(np.float32)
    w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    out = {}
    for variant in ("serial", "parallel"):
        _util.force_variant(variant)
        out[variant] = (conv.conv2d(x, w, padding=1), elementwise.relu_forward(x)[0])
    for a, b in zip(out["serial"], out["parallel"]):
        np.testing.assert_array_equal(a, b)


def test_a_one_thread_run_takes_the_serial_variants(tmp_path):
    seen = []
    run_search(SearchConfig.quick(output_dir=str(tmp_path / "s"), threads=1, **TINY),
               progress=lambda e: seen.append(_util._FORCED[0]) if e["event"] == "step" else None)
    assert seen and set(seen) == {"serial"}
    assert _util._FORCED[0] is None


def test_an_empty_cache_is_told_apart(tmp_path):
    """kernels_cached() is False on an empty cache folder and True once the kernel ran."""
    code = ("from approxdarts_np.runs.first_run import kernels_cached; print(kernels_cached());"
            "import numpy as np; from approxdarts_np.kernels import conv, _util;"
            "_util.force_variant('parallel');"
            "conv.conv2d(np.zeros((1, 1, 4, 4), np.float32), np.zeros((1, 1, 1, 1), np.float32));"
            "print(kernels_cached())")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.stdout.split() == ["False", "True"], done.stderr


def test_a_cold_cache_compiles_the_parallel_kernels_in_a_second_process(tmp_path, monkeypatch):
    """The run takes the serial variants while the second process runs a tiny run of its kind
    with the parallel ones (it ends well, in its own temporary folder); then back to by size."""
    monkeypatch.setattr(first_run, "kernels_cached", lambda: False)
    config = SearchConfig.quick(output_dir=str(tmp_path / "never"), threads=2, **TINY)
    with first_run.compile_split("search", config, threads=2) as split:
        process, folder = split.process, split.folder.name
        assert process is not None and _util._FORCED[0] == "serial"
        deadline = time.monotonic() + 240
        while split.process is not None and time.monotonic() < deadline:
            time.sleep(0.2)
            split.poll()
        assert split.process is None, "the second process did not end"
        assert _util._FORCED[0] is None
    assert process.returncode == 0
    assert not os.path.exists(folder) and not (tmp_path / "never").exists()


def test_the_switch_in_the_environment_turns_the_split_off(tmp_path, monkeypatch):
    monkeypatch.setattr(first_run, "kernels_cached", lambda: False)
    monkeypatch.setenv("APPROXDARTS_NP_COMPILE_SPLIT", "0")
    config = SearchConfig.quick(output_dir=str(tmp_path / "never"), threads=2, **TINY)
    with first_run.compile_split("search", config, threads=2) as split:
        assert split.process is None and _util._FORCED[0] is None


def test_a_run_that_ends_first_stops_the_second_process(tmp_path, monkeypatch):
    monkeypatch.setattr(first_run, "kernels_cached", lambda: False)
    config = SearchConfig.quick(output_dir=str(tmp_path / "never"), threads=2, **TINY)
    with first_run.compile_split("search", config, threads=2) as split:
        process = split.process
    assert process.poll() is not None and _util._FORCED[0] is None


def test_a_second_process_loads_every_variant_from_the_cache(tmp_path):
    """Both variants of a kernel are cached on disk: the second process that runs them compiles
    nothing (the serial twins were once compiled again in every process)."""
    code = ("import numpy as np; from numba.core import event; from approxdarts_np.kernels import "
            "conv, _util\n"
            "seen = []\n"
            "class L(event.Listener):\n"
            "    def on_start(self, ev): seen.append(ev.data['dispatcher'].py_func.__qualname__)\n"
            "    def on_end(self, ev): pass\n"
            "event.register('numba:compile', L())\n"
            "x = np.ones((1, 2, 5, 5), np.float32); w = np.ones((3, 2, 3, 3), np.float32)\n"
            "for variant in ('serial', 'parallel'):\n"
            "    _util.force_variant(variant); conv.conv2d(x, w, padding=1)\n"
            "print(sorted({n for n in seen if n.startswith('_patch_products')}))")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                           timeout=300) for _ in range(2)]
    assert runs[0].stdout.strip() == "['_patch_products_kernel', '_patch_products_kernel_serial']", \
        runs[0].stderr
    assert runs[1].stdout.strip() == "[]", runs[1].stdout


def test_the_second_process_runs_one_small_epoch_on_the_parallel_variants(tmp_path, monkeypatch):
    """What the second process does with its payload (run in this process with the run function
    replaced): one epoch, one thread, a few batches, no warm-up, its own folder, and every kernel
    choice forced to the parallel variant while it runs."""
    from approxdarts_np.runs import search as search_module

    seen = {}

    def fake_run(config):
        seen.update(config=config, forced=_util._FORCED[0])
    monkeypatch.setattr(search_module, "run_search", fake_run)
    config = SearchConfig.quick(output_dir=str(tmp_path / "user"), threads=2,
                                **dict(TINY, epochs=5, warmup_epochs=2))
    first_run._child({"kind": "search", "config": config.to_dict(), "output_dir": str(tmp_path / "c")})
    got = seen["config"]
    assert seen["forced"] == "parallel"
    assert (got.epochs, got.threads, got.warmup_epochs, got.output_dir) == (1, 1, 0, str(tmp_path / "c"))
    assert got.max_train_images == 4 * config.batch_size and got.channels == config.channels


@pytest.mark.skipif(available_cores() < 2, reason="a one-thread run never splits")
def test_a_default_search_on_an_empty_cache_splits_the_compiling(tmp_path):
    """End to end, as the CLI's default search runs: when its first step starts, the second
    process has been started, although the search runs its supernet before the loop (the count
    of multiply-accumulates), which compiles and caches kernels."""
    code = f"""
import contextlib
from approxdarts_np.runs import first_run, loop, search
real, started = first_run.compile_split, []
@contextlib.contextmanager
def spy(*args, **kwargs):
    with real(*args, **kwargs) as split:
        started.append(split.process is not None)
        yield split
search.compile_split = loop.compile_split = spy
def first_step(self, epoch, step):
    print("SPLIT", started, flush=True)
    raise SystemExit(0)
search.Searcher.step = first_step
search.run_search(search.SearchConfig(output_dir={str(tmp_path / "run")!r}, max_train_images=64, epochs=1))
"""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("APPROXDARTS_NP_COMPILE_SPLIT", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=600)
    assert "SPLIT [True]" in done.stdout.split("\n"), done.stdout + done.stderr[-2000:]
