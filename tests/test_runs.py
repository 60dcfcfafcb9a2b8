"""The run loop's promises, each asserted as a fact: which data half trains what, write failures, the folder lock,
file modes, resume overrides, divergence, and real Ctrl-Cs at many moments (slow)."""
from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import approxdarts_np.io.checkpoint as checkpoint_io
import approxdarts_np.runs.search as search_module
from approxdarts_np.data.cifar import CifarData
from approxdarts_np.errors import DivergedError, UserError
from approxdarts_np.io.checkpoint import WriteError, load_tree
from approxdarts_np.runs.loop import RunInterrupted
from approxdarts_np.runs.search import SearchConfig, run_search
from run_helpers import ctrl_c_at, metrics_without_times

TINY = dict(epochs=2, channels=2, layers=3, batch_size=4, max_train_images=24, threads=1, seed=5)


def _config(out, **kw):
    return SearchConfig.quick(output_dir=str(out), **{**TINY, **kw})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    run_search(_config(out))
    return out


def same_run(out: Path, ref: Path) -> None:
    """α, genotype, every array of the checkpoint, and the metrics apart from times are identical."""
    assert (out / "genotype.txt").read_text() == (ref / "genotype.txt").read_text()
    assert metrics_without_times(out) == metrics_without_times(ref)
    a, b = load_tree(out / "checkpoint.h5"), load_tree(ref / "checkpoint.h5")
    a["position"].pop("elapsed"), b["position"].pop("elapsed")
    a.pop("metrics"), b.pop("metrics")
    a["config"], b["config"] = (json.loads(t["config"]) | {"output_dir": ""} for t in (a, b))
    _assert_trees_equal(a, b, "checkpoint")


def _assert_trees_equal(a, b, where):
    if isinstance(a, dict):
        assert sorted(a) == sorted(b), where
        for k in a:
            _assert_trees_equal(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_trees_equal(x, y, f"{where}/{i}")
    else:
        assert a == b, where


# ----------------------------------------------------------------------------- which half trains what
def test_alpha_learns_on_the_architecture_half_and_w_on_the_weight_half(tmp_path, monkeypatch):
    """DARTS's split: the first half of the training images trains w, the second half trains α.

    Labels 0–4 in the first half and 5–9 in the second make the half of every batch visible.
    """
    n = 32
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    labels = np.concatenate([rng.integers(0, 5, n // 2), rng.integers(5, 10, n // 2)]).astype(np.int64)
    data = CifarData(images, labels, images[:4], labels[:4], tuple("abcdefghij"), Path("synthetic"))
    monkeypatch.setattr(search_module, "load_cifar10", lambda folder: data)
    seen = {"arch": [], "weight": []}
    real_arch, real_weight = search_module.architecture_step, search_module.weight_step

    def arch(model, optimizer, images, labels, penalty=None):
        seen["arch"].append(np.array(labels))
        weights = [w.data.copy() for w in model.weights()]
        out = real_arch(model, optimizer, images, labels, penalty=penalty)
        assert all(np.array_equal(w.data, c) for w, c in zip(model.weights(), weights)), "α step changed w"
        return out

    def weight(model, optimizer, images, labels, grad_clip):
        seen["weight"].append(np.array(labels))
        alphas = [a.data.copy() for a in model.arch_parameters()]
        out = real_weight(model, optimizer, images, labels, grad_clip)
        assert all(np.array_equal(a.data, c) for a, c in zip(model.arch_parameters(), alphas)), "w step changed α"
        return out

    monkeypatch.setattr(search_module, "architecture_step", arch)
    monkeypatch.setattr(search_module, "weight_step", weight)
    run_search(_config(tmp_path / "run", max_train_images=n, epochs=1))
    assert len(seen["arch"]) == len(seen["weight"]) == 4
    assert np.concatenate(seen["arch"]).min() >= 5
    assert np.concatenate(seen["weight"]).max() <= 4


# ----------------------------------------------------------------------------- write failures
def _fail_writes(monkeypatch, name: str, after: int):
    """Make every write of ``name`` after the first ``after`` ones fail with ENOSPC (a full disk)."""
    real = checkpoint_io._write_all
    count = {"n": 0}

    def write_all(fd, data):
        target = os.readlink(f"/proc/self/fd/{fd}")
        if Path(target).name.startswith(f".{name}."):
            count["n"] += 1
            if count["n"] > after:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(checkpoint_io, "_write_all", write_all)


def test_full_disk_at_a_checkpoint(reference, tmp_path, monkeypatch):
    out = tmp_path / "full"
    _fail_writes(monkeypatch, "checkpoint.h5", after=2)  # the initial checkpoint and epoch 1's succeed
    with pytest.raises(WriteError, match="No space left on device"):
        run_search(_config(out))
    assert not list(out.glob(".*.tmp")) and not (out / ".lock").exists()
    assert load_tree(out / "checkpoint.h5")["position"]["epoch"] == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # never ahead of the checkpoint
    monkeypatch.undo()
    run_search(resume=out)
    same_run(out, reference)


def test_full_disk_at_the_metrics_keeps_them_behind_the_checkpoint(reference, tmp_path, monkeypatch):
    out = tmp_path / "full"
    _fail_writes(monkeypatch, "metrics.jsonl", after=1)  # the empty file at the start is written
    with pytest.raises(WriteError, match="metrics.jsonl"):
        run_search(_config(out))
    assert not list(out.glob(".*.tmp"))
    assert (out / "metrics.jsonl").read_text() == ""
    assert load_tree(out / "checkpoint.h5")["position"]["epoch"] == 1
    monkeypatch.undo()
    run_search(resume=out)  # the metrics are rewritten from the checkpoint
    same_run(out, reference)


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o002)  # a group-shared folder
    try:
        out = tmp_path / "shared"
        run_search(_config(out, epochs=1))
    finally:
        os.umask(old)
    for name in ("config.json", "checkpoint.h5", "metrics.jsonl", "alpha.h5", "genotype.json", "genotype.txt"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o664, name


# ----------------------------------------------------------------------------- one run per folder
def _hold_lock(out, fresh: bool) -> subprocess.Popen:
    """A process that holds ``out``'s run-folder lock for a minute (returned once the lock is taken)."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from approxdarts_np.io.rundir import RunFolder
        with RunFolder({str(out)!r}, fresh={fresh}):
            print("locked", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_folder_locked_by_another_process_is_refused(tmp_path):
    out = tmp_path / "busy"
    holder = _hold_lock(out, fresh=True)
    try:
        with pytest.raises(UserError, match=f"in use by another run \\(pid {holder.pid} "):
            run_search(_config(out))
    finally:
        holder.kill()
        holder.wait()
    run_search(_config(out, epochs=1))  # the lock dies with its holder


def test_a_resume_takes_the_folder_lock(reference, tmp_path):
    """A resume of a folder another process holds is refused, and changes nothing there."""
    import shutil

    out = tmp_path / "held"
    shutil.copytree(reference, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    holder = _hold_lock(out, fresh=False)
    try:
        with pytest.raises(UserError, match=f"in use by another run \\(pid {holder.pid} "):
            run_search(resume=out, overrides={"epochs": 3})
        after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name in before}
        assert after == before
    finally:
        holder.kill()
        holder.wait()


# ----------------------------------------------------------------------------- resume overrides, divergence
def test_resume_with_more_epochs_extends_a_finished_run(tmp_path):
    out = tmp_path / "run"
    run_search(_config(out, epochs=1))
    summary = run_search(resume=out, overrides={"epochs": 2, "threads": 1, "channels": 2})
    assert summary["epochs"] == 2
    assert [m["epoch"] for m in metrics_without_times(out)] == [1, 2]
    assert json.loads((out / "config.json").read_text())["epochs"] == 2
    with pytest.raises(UserError, match="--channels"):
        run_search(resume=out, overrides={"channels": 4})


def test_divergence_in_the_first_epoch_keeps_the_initial_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(search_module, "weight_step", lambda *a, **k: (float("inf"), 0))
    with pytest.raises(DivergedError, match="at epoch 1, step 1; .* checkpoint from its start is kept"):
        run_search(_config(out))
    tree = load_tree(out / "checkpoint.h5")
    assert (tree["position"]["epoch"], tree["position"]["step"]) == (0, 0)
    monkeypatch.undo()
    run_search(resume=out)  # the promised checkpoint exists and resumes


# ----------------------------------------------------------------------------- real Ctrl-Cs (slow)
_CHILD = textwrap.dedent("""
    import sys
    from approxdarts_np.runs.search import SearchConfig, run_search
    from approxdarts_np.runs.loop import RunInterrupted

    def progress(event):
        if event["event"] in ("step", "epoch", "start"):
            print(event["event"], event.get("epoch"), event.get("step"), flush=True)

    out = sys.argv[1]
    try:
        if sys.argv[2] == "start":
            run_search(SearchConfig.quick(output_dir=out, **{tiny}), progress=progress)
        else:
            run_search(resume=out, progress=progress)
    except RunInterrupted as exc:
        print("interrupted", exc.epoch, exc.step, flush=True)
        sys.exit(exc.exit_code)
    print("finished", flush=True)
""")


SLOW = dict(TINY, epochs=6, max_train_images=48)  # 6 steps per epoch, 36 in all (ten stops never reach the end)


@pytest.mark.slow
def test_real_ctrl_c_at_ten_moments_then_resume_is_bit_identical(tmp_path):
    """SIGINTs sent from outside at ten moments (before the first step, just after a step, mid-step,
    at an epoch end, during the evaluation): every stop exits 130 with a consistent checkpoint, the run
    is resumed after each, and it ends identical to an uninterrupted one (α, genotype, checkpoint,
    metrics apart from times)."""
    ref = tmp_path / "reference"
    run_search(SearchConfig.quick(output_dir=str(ref), **SLOW))
    out = tmp_path / "run"
    script = _CHILD.replace("{tiny}", repr(SLOW))
    # (event of this process to wait for, extra delay in seconds before the signal); "step 6" is the
    # last step of an epoch, so its signal lands in the evaluation or the epoch's checkpoint
    moments = [("start", 0.0), ("step", 0.0), ("step", 0.05), ("last", 0.01), ("start", 0.02),
               ("step", 0.01), ("last", 0.0), ("start", 0.3), ("step", 0.1), ("epoch", 0.0)]
    mode, stops = "start", 0
    for wait_for, delay in moments:
        proc = subprocess.Popen([sys.executable, "-c", script, str(out), mode], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        mode = "resume"
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("finished") or (line.startswith(wait_for) if wait_for != "last"
                                                else line.startswith("step") and line.split()[2] == "6"):
                break
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=300)
        if "finished" in "".join(lines) + rest:
            break
        assert proc.returncode == 130, err
        assert "interrupted" in rest and "Traceback" not in err, err
        stops += 1
        tree = load_tree(out / "checkpoint.h5")
        assert len((out / "metrics.jsonl").read_text().splitlines()) == tree["position"]["epoch"]
        assert not list(out.glob(".*.tmp")) and not (out / ".lock").exists()
    assert stops == len(moments)
    run_search(resume=out)
    same_run(out, ref)


@pytest.mark.slow
def test_cli_ctrl_c_exits_130_and_names_the_resume_command(tmp_path):
    out = tmp_path / "cli"
    args = [sys.executable, "-m", "approxdarts_np_cli.main", "search", "--output-dir", str(out), "--epochs", "50",
            "--channels", "2", "--layers", "3", "--batch-size", "4", "--max-train-images", "48", "--threads", "1"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert f"Continue with: approxdarts-np search --resume {out}" in stdout.replace("\n", "")
    position = load_tree(out / "checkpoint.h5")["position"]
    assert position["epoch"] < 50


def test_second_order_search_stops_and_resumes_bit_identically(tmp_path):
    """--order 2 through the run loop: a Ctrl-C mid-epoch and a resume give the uninterrupted run, and the
    second-order run differs from the first-order one (the unrolled gradient is really used)."""
    cfg = dict(TINY, epochs=1, order=2, arithmetic="exact")
    ref = tmp_path / "reference"
    run_search(SearchConfig.quick(output_dir=str(ref), **cfg))
    out = tmp_path / "run"

    progress = ctrl_c_at(1)
    with pytest.raises(RunInterrupted):
        run_search(SearchConfig.quick(output_dir=str(out), **cfg), progress=progress)
    run_search(resume=out)
    same_run(out, ref)
    first = tmp_path / "first"
    run_search(SearchConfig.quick(output_dir=str(first), **dict(cfg, order=1)))
    a2 = load_tree(ref / "alpha.h5")["alphas_normal"]
    a1 = load_tree(first / "alpha.h5")["alphas_normal"]
    assert not np.array_equal(a1, a2)


def test_a_diverging_training_exits_2_with_its_checkpoint_named(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import approxdarts_np.runs.train as train_module
    from approxdarts_np_cli.main import app

    monkeypatch.setattr(train_module.Trainer, "train_step", lambda self, *a: (float("nan"), 0))
    out = tmp_path / "train"
    result = CliRunner().invoke(app, ["train", "--genotype", "DARTS_V2", "--output-dir", str(out), "--epochs", "1",
                                      "--channels", "2", "--layers", "3", "--batch-size", "4",
                                      "--max-train-images", "8", "--threads", "1"])
    assert result.exit_code == 2
    assert "diverged (train_loss nan) at epoch 1, step 1" in result.stderr
    assert "checkpoint from its start is kept" in result.stderr and (out / "checkpoint.h5").is_file()


def test_a_ctrl_c_while_the_summary_is_made_is_a_stop_not_a_traceback(tmp_path, monkeypatch):
    """A SIGINT after the last epoch's checkpoint, while the run makes its summary (the genotype),
    ends as a stop at that checkpoint; the resume has nothing left to do and gives the summary."""
    real = search_module.Searcher.summary

    def interrupted(self, metrics):
        os.kill(os.getpid(), signal.SIGINT)
        return real(self, metrics)
    monkeypatch.setattr(search_module.Searcher, "summary", interrupted)
    out = tmp_path / "run"
    with pytest.raises(RunInterrupted) as stop:
        run_search(SearchConfig.quick(output_dir=str(out), **dict(TINY, epochs=1)))
    assert stop.value.exit_code == 130 and stop.value.epoch == 1
    monkeypatch.setattr(search_module.Searcher, "summary", real)
    assert run_search(resume=out)["epochs"] == 1
