"""A sweep on a real two-node Ray cluster on this machine: the node running the trial dies mid-trial, Tune
retries the trial on the head, and the trial's results equal those of the same trial run locally.

The cluster is two `ray start` nodes of one CPU each, joined over a loopback address, each with its own
temporary folder, sharing an authentication token made for the test. Every process of a node carries a
marker in its environment, so the test kills exactly its own processes: the second node mid-trial, and
every one of them at the end, however the test ends. While the trial starts, a small driver holds the
head's CPU so that the trial can only start on the second node. The second node dies as soon as the trial
runs there, before its run's first checkpoint (that keeps the test short; a retry that resumes from a
checkpoint is test_sweep's killed-trial test).

The local reference is the same trial computed in this process by ``run_trial`` (the function every sweep
trial runs, here without Ray), at the same time as the cluster runs. Results do not depend on the machine,
the process or the thread count, so everything but times and folders must be equal: the row, and every
epoch's metrics.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from approxdarts_np.runs.sweep_trials import SweepConfig, run_trial, trial_name
from ray_nodes import Cluster, installed
from run_helpers import metrics_without_times

pytest.importorskip("ray", reason='the cluster test needs Ray: pip install -e ".[sweep]"')
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path("/proc/self/environ").is_file(), reason="finds a node's processes in /proc")]

TINY = {"epochs": 1, "channels": 2, "layers": 3, "batch_size": 4, "max_train_images": 16}
# A driver that takes the head's only CPU, says so, and keeps it until its stdin closes.
HOLD_A_CPU = """
import sys
import ray
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="error")
@ray.remote(num_cpus=1)
class Hold:
    def ready(self):
        return True
hold = Hold.remote()
ray.get(hold.ready.remote())
print("held", flush=True)
sys.stdin.read()
"""


def test_a_trial_whose_node_dies_is_retried_on_the_head_with_the_same_results(tmp_path):
    root = Path(tempfile.mkdtemp(prefix="adnp-ray-"))  # short: Ray's socket paths must fit in 107 bytes
    cluster = Cluster(root)
    out, local = tmp_path / "cluster", tmp_path / "local"
    reference: dict = {}
    config = SweepConfig(multipliers=["exact"], seeds=[0], stage="search", output_dir=str(local),
                         run_options=dict(TINY), cpus_per_trial=1)

    def compute() -> None:
        try:
            reference["row"] = run_trial(config, "exact", 0, threads=1)
        except BaseException as exc:  # noqa: BLE001  (raised again in the test's thread)
            reference["error"] = exc

    computing = threading.Thread(target=compute)
    processes: list[subprocess.Popen] = []
    try:
        computing.start()
        cluster.start_head()
        holder = subprocess.Popen([sys.executable, "-c", HOLD_A_CPU, cluster.address], env=cluster.node_env("head"),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        processes.append(holder)
        assert holder.stdout.readline().strip() == "held"
        with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
            sweep = subprocess.Popen(
                [installed("approxdarts-np"), "sweep", "--address", cluster.address, "--output-dir", str(out),
                 "--multipliers", "exact", "--seeds", "0", "--stage", "search", "--cpus-per-trial", "1",
                 *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]],
                env=cluster.env, stdout=stdout, stderr=stderr)
        processes.append(sweep)
        cluster.add_node("second")  # the trial waits for it: the head's CPU is held
        deadline = time.monotonic() + 240
        while cluster.running_trial("second") is None:
            assert sweep.poll() is None and time.monotonic() < deadline, (tmp_path / "stdout").read_text()
            time.sleep(0.05)
        assert cluster.running_trial("head") is None
        holder.stdin.close()  # the head's CPU is free for the retry
        holder.wait(timeout=60)
        cluster.kill("second")  # mid-trial: its process has begun the trial
        sweep.wait(timeout=300)
    finally:
        for process in processes:
            process.kill()
            process.wait()
        cluster.kill()
        computing.join()
        shutil.rmtree(root, ignore_errors=True)
    if "error" in reference:
        raise reference["error"]
    shown = (tmp_path / "stdout").read_text()
    assert sweep.returncode == 0, shown + (tmp_path / "stderr").read_text()
    assert "exact-seed0: failed (" in shown and "restarting from its last checkpoint" in shown, shown
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 1, rows
    # equal to the local trial in everything but times and folders
    times = ("wall_s", "folder", "resumed")
    assert {k: v for k, v in rows[0].items() if k not in times} == {
        k: v for k, v in reference["row"].items() if k not in times}
    assert metrics_without_times(out / trial_name("exact", 0) / "search") == metrics_without_times(
        local / trial_name("exact", 0) / "search")
