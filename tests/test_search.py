"""The search loop end to end: outputs, exact resume after SIGKILL and Ctrl-C, bad input, the CLI."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from approxdarts_np.errors import UserError
from approxdarts_np.io.checkpoint import load_tree
from approxdarts_np.nas.genotypes import Genotype
from approxdarts_np.runs.loop import RunInterrupted
from approxdarts_np.runs.search import SearchConfig, run_search
from approxdarts_np_cli.main import app
from run_helpers import ctrl_c_at, metrics_without_times

TINY = dict(epochs=2, channels=2, layers=3, batch_size=4, max_train_images=24, threads=2, seed=7)


def _config(out, **kw):
    return SearchConfig.quick(output_dir=str(out), **{**TINY, **kw})


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    summary = run_search(_config(out))
    return out, summary


def _alphas(out):
    with h5py.File(out / "alpha.h5", "r") as f:
        return f["alphas_normal"][()], f["alphas_reduce"][()]


def test_search_writes_all_outputs(reference_run):
    out, summary = reference_run
    for name in ("config.json", "metrics.jsonl", "alpha.h5", "genotype.json", "genotype.txt", "checkpoint.h5"):
        assert (out / name).is_file(), name
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    for m in metrics:
        assert 0 <= m["val_acc"] <= 1 and np.isfinite(m["train_loss"]) and m["elapsed_s"] > 0
    g = json.loads((out / "genotype.json").read_text())
    assert len(g["normal"]) == 8 and len(g["reduce"]) == 8 and g["normal_concat"] == [2, 3, 4, 5]
    text = (out / "genotype.txt").read_text().strip()
    assert Genotype.from_darts_string(text) == Genotype.from_dict(g)
    assert summary["genotype"] == g
    with h5py.File(out / "alpha.h5", "r") as f:
        assert f["alphas_normal"].shape == (14, 8)
        assert f["alphas_normal_history"].shape == (2, 14, 8)
        np.testing.assert_array_equal(f["alphas_normal_history"][-1], f["alphas_normal"][()])
    config = json.loads((out / "config.json").read_text())
    assert config["channels"] == 2 and config["resolved"]["threads"] == 2


_KILLER = textwrap.dedent("""
    import os, signal, sys
    from approxdarts_np.runs.search import SearchConfig, run_search
    cfg = SearchConfig.quick(output_dir=sys.argv[1], **{tiny})
    def progress(event):
        if event["event"] == "step" and event["epoch"] == 1 and event["step"] == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    run_search(cfg, progress=progress)
""")


def test_sigkill_mid_epoch_then_resume_is_bit_identical(reference_run, tmp_path):
    ref_out, ref_summary = reference_run
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", _KILLER.replace("{tiny}", repr(TINY)), str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # epoch 1 finished, epoch 2 not
    summary = run_search(resume=out)
    for ours, ref in zip(_alphas(out), _alphas(ref_out)):
        np.testing.assert_array_equal(ours, ref)
    assert summary["genotype"] == ref_summary["genotype"]
    assert (out / "genotype.txt").read_text() == (ref_out / "genotype.txt").read_text()


def test_ctrl_c_saves_a_checkpoint_and_resume_is_bit_identical(reference_run, tmp_path):
    """A real SIGINT mid-epoch: the loop stops at the next step boundary, saves, and resume matches."""
    ref_out, _ = reference_run
    out = tmp_path / "interrupted"

    progress = ctrl_c_at(2, epoch=0)
    with pytest.raises(RunInterrupted) as info:
        run_search(_config(out), progress=progress)
    assert (info.value.epoch, info.value.step, info.value.exit_code) == (0, 2, 130)
    assert load_tree(out / "checkpoint.h5")["position"]["step"] == 2
    assert (out / "metrics.jsonl").read_text() == ""
    run_search(resume=out)
    for ours, ref in zip(_alphas(out), _alphas(ref_out)):
        np.testing.assert_array_equal(ours, ref)
    assert metrics_without_times(out) == metrics_without_times(ref_out)


@pytest.mark.parametrize("kw, message", [
    (dict(layers=2), "--layers"),
    (dict(channels=0), "--channels"),
    (dict(batch_size=64), "larger than each half"),
    (dict(arithmetic="mul8u_NOPE"), "mul8u_NOPE"),
    (dict(data_dir="/nonexistent/cifar"), "/nonexistent/cifar"),
])
def test_bad_settings_fail_before_writing_anything(tmp_path, kw, message):
    out = tmp_path / "out"
    with pytest.raises(UserError, match=message):
        run_search(_config(out, **kw))
    assert not out.exists()


def test_existing_search_is_not_overwritten(reference_run):
    out, _ = reference_run
    with pytest.raises(UserError, match="already holds a run"):
        run_search(_config(out))


def test_cli_search_end_to_end_and_errors(tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli"
    args = ["search", "--output-dir", str(out), "--epochs", "1", "--channels", "2", "--layers", "3",
            "--batch-size", "4", "--max-train-images", "16", "--threads", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "genotype: Genotype(normal=[" in result.output
    assert (out / "genotype.json").is_file()

    for option in ("--arithmetic", "--multiplier"):  # the option's old spelling is still accepted
        bad = runner.invoke(app, args[:1] + ["--output-dir", str(tmp_path / "x"), option, "nope.bin"])
        assert bad.exit_code == 2
        assert "nope.bin" in bad.output and "Traceback" not in bad.output
        assert not (tmp_path / "x").exists()


def test_a_run_saved_with_the_old_multiplier_setting_resumes_with_its_arithmetic(tmp_path):
    """config.json and checkpoints written before the setting was renamed (``multiplier`` → ``arithmetic``)
    load with the arithmetic they ran with, for a search and a training config."""
    from approxdarts_np.io.checkpoint import save_tree
    from approxdarts_np.runs.config import resolve_run_config
    from approxdarts_np.runs.train import TrainConfig

    out = tmp_path / "old"
    run_search(_config(out, epochs=1, arithmetic="mul8u_2P7"))
    config = json.loads((out / "config.json").read_text())
    old = {("multiplier" if k == "arithmetic" else k): v for k, v in config.items()}
    (out / "config.json").write_text(json.dumps(old))
    tree = load_tree(out / "checkpoint.h5")
    saved = json.loads(tree["config"])
    tree["config"] = json.dumps({("multiplier" if k == "arithmetic" else k): v for k, v in saved.items()})
    save_tree(out / "checkpoint.h5", tree)
    loaded, _ = resolve_run_config(SearchConfig, None, out, {"epochs": 2})
    assert loaded.arithmetic == "mul8u_2P7"
    run_search(resume=out, overrides={"epochs": 2})
    assert len(metrics_without_times(out)) == 2
    assert json.loads((out / "config.json").read_text())["resolved"]["arithmetic"] == "mul8u_2P7"
    assert TrainConfig.from_dict({"multiplier": "exact"}).arithmetic == "exact"
    with pytest.raises(UserError, match="multiplier"):  # both spellings at once: the old one is unknown
        TrainConfig.from_dict({"multiplier": "exact", "arithmetic": "none"})


def test_corrupt_table_file_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x00" * 1000)
    with pytest.raises(UserError, match="bad.bin"):
        run_search(_config(tmp_path / "out", arithmetic=str(bad)))


def test_unwritable_output_dir_is_a_user_error(tmp_path):
    if os.geteuid() == 0:
        target = "/proc/approxdarts-np-cannot-write-here"
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        target = str(locked / "out")
    with pytest.raises(UserError, match="cannot write"):
        run_search(_config(target))


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import approxdarts_np.runs.search as search_module
    from approxdarts_np.errors import DivergedError

    out = tmp_path / "nan"
    real_step = search_module.weight_step
    calls = {"n": 0}

    def poisoned(model, optimizer, images, labels, grad_clip):
        calls["n"] += 1
        if calls["n"] > 3:  # the first epoch (3 steps) is fine, then the loss is NaN
            return float("nan"), 0
        return real_step(model, optimizer, images, labels, grad_clip)

    monkeypatch.setattr(search_module, "weight_step", poisoned)
    with pytest.raises(DivergedError, match=r"train_loss nan\) at epoch 2, step 1; .* from the end of epoch 1 "):
        run_search(_config(out))
    tree = load_tree(out / "checkpoint.h5")
    assert tree["position"]["epoch"] == 1 and tree["position"]["step"] == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
