"""``search --workers N`` on Ray (runs/workers.py): real workers on a local Ray and on a two-node cluster.

* Two workers equal one process within the bounds of tests/run_helpers.py (the float search), and two runs
  with two workers are equal bit for bit: checkpoints and metrics.
* A run of two workers resumes with one, and a run of one process with two.
* A worker killed with SIGKILL in the middle of a step is replaced, the step is run again, and the epoch
  ends bit for bit on the state of the uninterrupted run.
* A two-node cluster on loopback (one CPU per node, so one worker on each) runs the same search with
  ``--address``, bit for bit.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from approxdarts_np.io.checkpoint import load_tree
from approxdarts_np.runs.search import SearchConfig, build_searcher, run_search
from approxdarts_np_cli.main import app
from approxdarts_np.runs.workers import WorkerPool
from ray_nodes import Cluster, installed
from run_helpers import FLOAT, metrics_without_times, relative_errors, within

pytest.importorskip("ray", reason='a search over workers needs Ray: pip install -e ".[sweep]"')
pytestmark = pytest.mark.slow

TINY = dict(epochs=1, channels=4, layers=3, batch_size=8, max_train_images=48, threads=1, seed=3)
TINY_ARGS = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]


def _model(folder: Path) -> dict:
    return load_tree(Path(folder) / "checkpoint.h5")["model"]


def assert_same_run(folder: Path, reference: Path) -> None:
    """Checkpointed model and metrics equal bit for bit."""
    got, ref = _model(folder), _model(reference)
    assert got.keys() == ref.keys()
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
    assert metrics_without_times(folder) == metrics_without_times(reference)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A search with two workers and the same search in one process."""
    root = tmp_path_factory.mktemp("workers")
    run_search(SearchConfig.quick(output_dir=str(root / "two"), workers=2, **TINY))
    run_search(SearchConfig.quick(output_dir=str(root / "one"), **TINY))
    return root


def test_two_workers_equal_one_process_and_a_second_run_bit_for_bit(runs, tmp_path):
    errors = relative_errors(_model(runs / "one"), _model(runs / "two"))
    assert within(errors, FLOAT), errors
    result = CliRunner().invoke(app, ["search", "--output-dir", str(tmp_path / "again"), "--workers", "2",
                                      *TINY_ARGS])
    assert result.exit_code == 0, result.output
    assert "done: 1 epoch" in result.output
    assert_same_run(tmp_path / "again", runs / "two")


def test_a_run_resumes_with_another_number_of_workers(runs, tmp_path):
    for started, workers in (("two", 1), ("one", 2)):
        folder = tmp_path / started
        shutil.copytree(runs / started, folder)
        run_search(resume=folder, overrides={"epochs": 2, "workers": workers})
        assert [m["epoch"] for m in metrics_without_times(folder)] == [1, 2]
        assert metrics_without_times(folder)[0] == metrics_without_times(runs / started)[0]


def test_a_worker_killed_mid_step_is_replaced_and_the_run_ends_as_the_uninterrupted_one(runs):
    """SIGKILL to worker 1 during the weight step of step 1 (worker 0 has then already updated α), found by
    the exchanges worker 1 has made; the epoch then ends on the state of the uninterrupted run."""
    import ray

    config = SearchConfig.quick(output_dir="unused", workers=2, **TINY)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False)
    try:
        pool = WorkerPool(ray, config, threads=1)
        pool.begin_epoch(0)
        pool.step(0, 0)
        per_step = pool.counters()[1]["exchanges"]
        victim = pool.workers[1]
        pid = ray.get(victim.pid.remote())
        stepping = threading.Thread(target=pool.step, args=(0, 1))
        stepping.start()
        while ray.get(victim.counters.remote())["exchanges"] < 1.75 * per_step:  # into the weight step
            time.sleep(0.001)
        os.kill(pid, signal.SIGKILL)
        stepping.join(300)
        assert not stepping.is_alive()
        assert pid not in ray.get([w.pid.remote() for w in pool.workers])  # replaced
        for step in range(2, build_searcher(config).steps_per_epoch):
            pool.step(0, step)
        state = pool.state()["model"]
        pool.stop()
    finally:
        ray.shutdown()
    reference = _model(runs / "two")
    for name in reference:
        np.testing.assert_array_equal(state[name], reference[name], err_msg=name)


@pytest.mark.skipif(not Path("/proc/self/environ").is_file(), reason="finds a node's processes in /proc")
def test_a_two_node_cluster_runs_the_search_bit_for_bit(runs, tmp_path):
    root = Path(tempfile.mkdtemp(prefix="adnp-ray-"))  # short: Ray's socket paths must fit in 107 bytes
    cluster = Cluster(root)
    try:
        cluster.start_head()
        cluster.add_node("second")
        done = subprocess.run(
            [installed("approxdarts-np"), "search", "--address", cluster.address, "--workers", "2",
             "--output-dir", str(tmp_path / "cluster"), *TINY_ARGS],
            env=cluster.env, capture_output=True, text=True, timeout=600)
    finally:
        cluster.kill()
        shutil.rmtree(root, ignore_errors=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_same_run(tmp_path / "cluster", runs / "two")
