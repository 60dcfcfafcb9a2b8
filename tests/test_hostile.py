"""Hostile input: every way a user can get a command wrong gives one line on stderr, exit code 2, no traceback,
and leaves nothing half-written.

Each case is a command line (run in-process through typer's CliRunner) plus
what must hold afterwards. Cases that need a run to exist share two tiny runs
made once per module.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from approxdarts_np.errors import UserError
from approxdarts_np.io.rundir import RunFolder
from approxdarts_np.nas.genotypes import DARTS_V2
from approxdarts_np.runs.search import SearchConfig, run_search
from approxdarts_np.runs.train import TrainConfig, run_train
from approxdarts_np_cli.main import app
from run_helpers import copy_run, one_error_line

runner = CliRunner()
SEARCH = ["search", "--epochs", "1", "--channels", "2", "--layers", "3", "--batch-size", "4",
          "--max-train-images", "16", "--threads", "1"]
TRAIN_TINY = dict(epochs=1, channels=2, layers=3, batch_size=4, max_train_images=8, threads=1, seed=1,
                  genotype=DARTS_V2.to_dict())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished tiny search and a finished tiny training (never modified by the cases)."""
    root = tmp_path_factory.mktemp("hostile")
    run_search(SearchConfig.quick(output_dir=str(root / "search"), epochs=1, channels=2, layers=3, batch_size=4,
                                  max_train_images=16, threads=1))
    run_train(TrainConfig.quick(output_dir=str(root / "train"), **TRAIN_TINY))
    return root


def no_temp_files(folder: Path) -> None:
    assert not [p.name for p in folder.rglob("*.tmp")]


# ----------------------------------------------------------------------------- search settings
@pytest.mark.parametrize("args, fragment", [
    (["--layers", "2"], "--layers"),
    (["--channels", "0"], "--channels"),
    (["--channels", "100000"], "memory"),
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "100"], "larger than each half"),
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--lr", "-1"], "--lr"),
    (["--lr-min", "nan"], "--lr-min must be a finite number"),
    (["--momentum", "1"], "--momentum"),
    (["--weight-decay", "-1"], "--weight-decay"),
    (["--grad-clip", "0"], "--grad-clip"),
    (["--arch-lr", "0"], "--arch-lr"),
    (["--arch-weight-decay", "nan"], "--arch-weight-decay"),
    (["--threads", "0"], "--threads"),
    (["--threads", "100000"], "--threads"),
    (["--max-train-images", "1"], "--max-train-images"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2 ** 64)], "--seed must lie between 0 and 2**32 - 1"),
    (["--seed", str(2 ** 32)], "--seed must lie between 0 and 2**32 - 1"),
    (["--order", "3"], "--order"),
    (["--multipliers", ","], "names no multiplier"),
    (["--multipliers", "none,exact"], "'none' (FP32) cannot be one"),
    (["--multipliers", "exact,mul8u_NOPE"], "mul8u_NOPE"),
    (["--arithmetic", "exact", "--multipliers", "exact,mul8u_2P7"], "not both"),
    (["--multipliers", "exact,mul8u_2P7", "--energy-weight", "-1"], "--energy-weight"),
    (["--multipliers", "exact,mul8u_2P7", "--energy-weight", "nan"], "--energy-weight"),
    (["--multipliers", "exact,mul8u_2P7", "--energy-weight", "1", "--energy-target", "0"], "--energy-target"),
    (["--energy-target", "5"], "--energy-target needs an --energy-weight"),
    (["--multipliers", "exact,mul8u_2P7", "--gumbel-temperature", "0"], "--gumbel-temperature"),
    (["--multipliers", "exact,mul8u_2P7", "--order", "2"], "--order 2"),
    (["--order", "2", "--unrolled-lr", "0"], "--unrolled-lr"),
    (["--arithmetic", "mul8u_NOPE"], "mul8u_NOPE"),
    (["--arithmetic", "missing.bin"], "missing.bin"),
    (["--data-dir", "/nonexistent/cifar"], "/nonexistent/cifar"),
])
def test_search_settings(tmp_path, args, fragment):
    out = tmp_path / "out"
    result = runner.invoke(app, SEARCH + ["--output-dir", str(out)] + args)
    one_error_line(result, fragment)
    assert not out.exists()


@pytest.mark.parametrize("command", [SEARCH, ["train", "--genotype", "DARTS_V2", "--max-train-images", "64",
                                                "--channels", "2", "--layers", "3", "--threads", "1"]])
@pytest.mark.parametrize("epochs", [str(2 ** 63 - 1), "10001"])
def test_epochs_beyond_the_bound(tmp_path, monkeypatch, command, epochs):
    from approxdarts_np.runs.loop import RunLoop

    def never(*args, **kwargs):  # without the bound the run would start and not end
        raise AssertionError("the run started")

    monkeypatch.setattr(RunLoop, "start", never)
    out = tmp_path / "out"
    one_error_line(runner.invoke(app, command + ["--output-dir", str(out), "--epochs", epochs]),
                   "--epochs must lie between 1 and 10,000")
    assert not out.exists()


def test_largest_seed_and_epochs_are_accepted():
    from approxdarts_np.runs.config import MAX_EPOCHS, MAX_SEED

    SearchConfig.quick(seed=MAX_SEED, epochs=MAX_EPOCHS, threads=1).validate()
    TrainConfig.quick(seed=MAX_SEED, epochs=MAX_EPOCHS, threads=1, genotype=DARTS_V2.to_dict()).validate()
    assert MAX_SEED == 2 ** 32 - 1


def test_seed_past_python_printing_limit_is_one_line():
    with pytest.raises(UserError, match="an integer of about 5001 digits"):
        SearchConfig.quick(seed=10 ** 5000, threads=1).validate()


def test_search_empty_data_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, SEARCH + ["--output-dir", str(tmp_path / "out"), "--data-dir", str(tmp_path / "empty")])
    one_error_line(result, str(tmp_path / "empty"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("batch, fragment", [
    ({1: 2, b"labels": [0, 1, 2, 3]}, "a key of type int"),
    ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 10 ** 5000]}, "about 5001 digits"),
    ({b"data": np.zeros((4, 3072), np.uint8), b"labels": np.array([9, 0, 1, 2 ** 64 - 1], np.uint64)}, "0..9"),
])
def test_search_malformed_cifar_batch(tmp_path, batch, fragment):
    import pickle

    from approxdarts_np.data.cifar import default_data_dir

    data = tmp_path / "cifar"
    shutil.copytree(default_data_dir(), data)
    (data / "data_batch_5").write_bytes(pickle.dumps(batch))
    out = tmp_path / "out"
    one_error_line(runner.invoke(app, SEARCH + ["--output-dir", str(out), "--data-dir", str(data)]),
                   str(data / "data_batch_5"), fragment)
    assert not out.exists()


@pytest.mark.parametrize("content, name", [
    (b"\x00" * 1000, "short.bin"),
    (b"", "empty.bin"),
    (None, "huge.bin"),  # 3 GB, sparse: must be refused by its size, not read
    (None, "packed.npy"),  # an .npz archive under an .npy name
    (b"\x93NUMPY\x01\x00garbage", "broken.npy"),
])
def test_search_bad_table_files(tmp_path, content, name):
    path = tmp_path / name
    if name == "huge.bin":
        with open(path, "wb") as f:
            f.truncate(3 * 2 ** 30)
    elif name == "packed.npy":
        with open(path, "wb") as f:
            np.savez(f, table=np.zeros((256, 256), np.int64))
    else:
        path.write_bytes(content)
    result = runner.invoke(app, SEARCH + ["--output-dir", str(tmp_path / "out"), "--arithmetic", str(path)])
    one_error_line(result, name)
    assert not (tmp_path / "out").exists()


def test_output_dir_is_a_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    one_error_line(runner.invoke(app, SEARCH + ["--output-dir", str(target)]), str(target))


def test_output_dir_holds_a_run(runs, tmp_path):
    out = copy_run(runs, "search", tmp_path)
    before = (out / "checkpoint.h5").read_bytes()
    one_error_line(runner.invoke(app, SEARCH + ["--output-dir", str(out)]), "already holds a run")
    assert (out / "checkpoint.h5").read_bytes() == before


def test_second_run_into_a_folder_in_use(tmp_path):
    out = tmp_path / "busy"
    with RunFolder(out, fresh=True):
        line = one_error_line(runner.invoke(app, SEARCH + ["--output-dir", str(out)]), "in use by another run")
        assert f"pid {os.getpid()}" in line
    assert not out.exists()  # the holder made it and wrote nothing else


# ----------------------------------------------------------------------------- resume
def test_resume_missing_folder(tmp_path):
    one_error_line(runner.invoke(app, ["search", "--resume", str(tmp_path / "nope")]), "nope")


def test_resume_folder_without_a_run(tmp_path):
    one_error_line(runner.invoke(app, ["search", "--resume", str(tmp_path)]), "holds no run to resume")


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_resume_damaged_checkpoint(runs, tmp_path, damage):
    out = copy_run(runs, "search", tmp_path)
    data = (out / "checkpoint.h5").read_bytes()
    (out / "checkpoint.h5").write_bytes({"empty": b"", "truncated": data[: len(data) // 2],
                                         "garbage": b"not hdf5" * 100}[damage])
    one_error_line(runner.invoke(app, ["search", "--resume", str(out)]), "checkpoint.h5")
    no_temp_files(out)


@pytest.mark.parametrize("config, fragment", [
    ("[1, 2, 3]", "expected a JSON object"),
    ('{"epochs": "four"}', "'epochs' has the wrong type"),
    ('{"epochs": 2, "colour": "blue"}', "colour"),
    ('{"channels": 2.5}', "'channels' has the wrong type"),
    ('{"arch_betas": [0.5]}', "'arch_betas' has the wrong type"),
    ("{not json", "not valid JSON"),
    ("\xff\xfe{", "not valid JSON"),
])
def test_resume_foreign_config(runs, tmp_path, config, fragment):
    out = copy_run(runs, "search", tmp_path)
    (out / "config.json").write_bytes(config.encode("latin-1"))
    one_error_line(runner.invoke(app, ["search", "--resume", str(out)]), fragment)


def test_resume_refuses_changed_settings(runs, tmp_path):
    out = copy_run(runs, "search", tmp_path)
    line = one_error_line(runner.invoke(app, ["search", "--resume", str(out), "--lr", "0.1", "--channels", "4"]),
                          "--lr", "--channels", "cannot change")
    assert "--epochs" in line  # says what may change


def test_resume_with_fewer_epochs_than_done(runs, tmp_path):
    out = copy_run(runs, "search", tmp_path)
    one_error_line(runner.invoke(app, ["search", "--resume", str(out), "--epochs", "0"]), "--epochs")


def test_resume_a_train_folder_as_search(runs, tmp_path):
    out = copy_run(runs, "train", tmp_path)
    one_error_line(runner.invoke(app, ["search", "--resume", str(out)]), str(out))


# ----------------------------------------------------------------------------- train and genotypes
GOOD = DARTS_V2.to_dict()


@pytest.mark.parametrize("name, content, fragment", [
    ("concat.json", json.dumps({**GOOD, "normal_concat": [2, 3, 9]}), "concat"),
    ("empty_concat.json", json.dumps({**GOOD, "reduce_concat": []}), "concat"),
    ("single.json", json.dumps({**GOOD, "normal": GOOD["normal"][:2]}), "normal"),
    ("unknown.txt", DARTS_V2.to_darts_string().replace("dil_conv_3x3", "conv_9x9"), "conv_9x9"),
    ("binary.json", b"\x89PNG\r\n\x1a\n\x00\x00\x00", "binary.json"),
    ("utf16.txt", DARTS_V2.to_darts_string().encode("utf-16"), "utf16.txt"),
    ("list.json", "[1, 2]", "list.json"),
    ("long_index.json", json.dumps(GOOD).replace('"sep_conv_3x3", 0', '"sep_conv_3x3", ' + "9" * 5000, 1),
     "more than 4,300 digits"),
])
def test_train_bad_genotype_files(tmp_path, name, content, fragment):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "out"
    one_error_line(runner.invoke(app, ["train", "--genotype", str(path), "--output-dir", str(out)]), fragment)
    assert not out.exists()


@pytest.mark.parametrize("args, fragment", [
    ([], "--genotype"),
    (["--genotype", "missing.json"], "missing.json"),
    (["--genotype", "DARTS_V2", "--auxiliary-weight", "nan"], "--auxiliary-weight"),
    (["--genotype", "DARTS_V2", "--cutout", "40"], "--cutout"),
    (["--genotype", "DARTS_V2", "--drop-path", "1"], "--drop-path"),
    (["--genotype", "DARTS_V2", "--lr", "inf"], "--lr"),
    (["--genotype", "DARTS_V2", "--channels", "100000"], "memory"),
    (["--genotype", "DARTS_V2", "--batch-size", "5000"], "--batch-size"),
    (["--genotype", "DARTS_V2", "--seed", str(2 ** 64)], "--seed must lie between 0 and 2**32 - 1"),
])
def test_train_settings(tmp_path, args, fragment):
    out = tmp_path / "out"
    result = runner.invoke(app, ["train", "--output-dir", str(out), "--max-train-images", "64", "--epochs", "1",
                                 "--channels", "2", "--layers", "3"] + args)
    one_error_line(result, fragment)
    assert not out.exists()


def test_train_resume_refuses_another_genotype(runs, tmp_path):
    out = copy_run(runs, "train", tmp_path)
    other = DARTS_V2.to_dict()
    other["normal"] = [["sep_conv_5x5", j] for _, j in other["normal"]]
    (tmp_path / "other.json").write_text(json.dumps(other))
    one_error_line(runner.invoke(app, ["train", "--resume", str(out), "--genotype", str(tmp_path / "other.json")]),
                   "--genotype")


# ----------------------------------------------------------------------------- evaluate and energy
@pytest.mark.parametrize("args, fragment", [
    (["--arithmetic", ","], "names no arithmetic"),
    (["--arithmetic", "genotype"], "names no multipliers"),
    (["--arithmetic", "mul8u_NOPE"], "mul8u_NOPE"),
    (["--batch-size", "0"], "--batch-size"),
    (["--output", "/nonexistent/folder/t.csv"], "/nonexistent/folder"),
    (["--output", "table.txt"], ".csv or .json"),
    (["--plot", "/nonexistent/folder/p.png"], "/nonexistent/folder"),
])
def test_evaluate_settings(runs, args, fragment, monkeypatch):
    import approxdarts_np.runs.report as report

    def never(*a, **k):  # the checks come before any evaluation
        raise AssertionError("evaluated before checking the options")

    if "--output" in args or "--plot" in args:
        monkeypatch.setattr(report, "evaluate", never)
    one_error_line(runner.invoke(app, ["evaluate", "--checkpoint", str(runs / "train" / "checkpoint.h5")] + args),
                   fragment)


@pytest.mark.parametrize("damage", ["missing", "empty", "truncated", "search"])
def test_evaluate_bad_checkpoints(runs, tmp_path, damage):
    path = tmp_path / "checkpoint.h5"
    data = (runs / "train" / "checkpoint.h5").read_bytes()
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(data[:len(data) // 3])
    elif damage == "search":
        path = runs / "search" / "checkpoint.h5"
    one_error_line(runner.invoke(app, ["evaluate", "--checkpoint", str(path)]), "checkpoint")


@pytest.mark.parametrize("args, fragment", [
    (["--fp32-mul-pj", "0"], "FP32"),
    (["--int8-mul-pj", "nan"], "8-bit"),
    (["--int8-mul-pj", "-1"], "8-bit"),
    (["--channels", "0"], "--channels"),
    (["--layers", "1"], "--layers"),
    (["--arithmetic", "mul8u_NOPE"], "mul8u_NOPE"),
    (["--genotype", "nope.json"], "nope.json"),
    (["--arithmetic", "genotype"], "names no multipliers"),
])
def test_energy_settings(args, fragment):
    base = ["energy", "--genotype", "DARTS_V2", "--channels", "4", "--layers", "3"]
    one_error_line(runner.invoke(app, base + args), fragment)


def test_multipliers_show_unknown():
    one_error_line(runner.invoke(app, ["multipliers", "show", "mul8u_NOPE"]), "mul8u_NOPE")
