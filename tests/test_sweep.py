"""Sweeps on Ray: the Pareto front, option checks before any trial, a 2 × 2 grid, a killed trial's retry, a
failed trial's one line and its rerun, a trial folder brought back from Tune's copy, and the console output
(only the sweep's own lines, within 80 columns).

The in-process Ray tests share one local Ray (2 CPUs, no dashboard) started once for the module; the tests
of the command's console output run the installed command, which starts its own. All use tiny trials
(2 channels, 3 cells, batch 4, 16 training images, one kernel thread).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from approxdarts_np.errors import UserError
from approxdarts_np.io.rundir import RunFolder
from approxdarts_np.runs.plots import pareto_front, plot_accuracy_energy
from approxdarts_np.runs.sweep import error_line, run_sweep
from approxdarts_np.runs.sweep_results import format_count, format_mean_std, summarise
from approxdarts_np.runs.sweep_trials import SweepConfig, restore_trial, run_trial, trial_name
from approxdarts_np_cli.main import app
from approxdarts_np_cli.sweep import _print_summary

runner = CliRunner()
TINY = {"epochs": 1, "channels": 2, "layers": 3, "batch_size": 4, "max_train_images": 16}
TINY_ARGS = ["--epochs", "1", "--channels", "2", "--layers", "3", "--batch-size", "4", "--max-train-images", "16",
             "--cpus-per-trial", "1"]


# ----------------------------------------------------------------- Pareto front
# (energy, accuracy) sets with their fronts worked out by hand.
FRONT_CASES = [
    # a staircase with two dominated points inside it
    ([(1.0, 0.50), (2.0, 0.70), (3.0, 0.90), (2.5, 0.60), (3.5, 0.85)], [0, 1, 2]),
    # equal energy, lower accuracy: dominated (a tie is resolved as dominated)
    ([(1.0, 0.50), (1.0, 0.40), (2.0, 0.45)], [0]),
    # equal accuracy, higher energy: dominated
    ([(1.0, 0.50), (2.0, 0.50), (0.5, 0.30)], [0, 2]),
    # identical points: only the first
    ([(1.0, 0.5), (1.0, 0.5), (0.5, 0.4)], [0, 2]),
    # one point better on both counts dominates all others
    ([(3.0, 0.2), (0.1, 0.99), (2.0, 0.5), (1.0, 0.3)], [1]),
    # the cheapest point is always on the front, as is the most accurate
    ([(5.0, 0.95), (0.2, 0.10), (2.0, 0.60), (2.1, 0.55)], [0, 1, 2]),
    ([(1.0, 0.5)], [0]),
]


def check_front(front) -> None:
    for points, expected in FRONT_CASES:
        assert front(points) == expected, points


def test_pareto_front_of_hand_made_points():
    check_front(pareto_front)


@pytest.mark.parametrize("wrong", [
    # dominated only by a point better on both counts (keeps ties)
    lambda pts: [i for i, (e, a) in enumerate(pts) if not any(a2 > a and e2 < e for e2, a2 in pts)],
    # identical points both kept
    lambda pts: [i for i, (e, a) in enumerate(pts) if not any(a2 >= a and e2 <= e and (e2, a2) != (e, a)
                                                              for e2, a2 in pts)],
    # energy and accuracy swapped in the comparison (keeps the worst)
    lambda pts: [i for i, (e, a) in enumerate(pts) if not any(a2 < a and e2 > e for e2, a2 in pts)],
    # accuracy alone
    lambda pts: [i for i, (e, a) in enumerate(pts) if a == max(p[1] for p in pts)],
    # sorted by energy instead of input order
    lambda pts: sorted(pareto_front(pts), key=lambda i: pts[i][0]),
])
def test_the_front_check_catches_wrong_fronts(wrong):
    with pytest.raises(AssertionError):
        check_front(wrong)


def test_the_plot_labels_only_the_front_and_keeps_fp32_off_the_points(tmp_path):
    rows = [{"arithmetic": "none", "test_acc": 0.95, "energy_pj": 20e6},  # a reference line, not a point
            {"arithmetic": "exact", "test_acc": 0.90, "energy_pj": 1.0e6},
            {"arithmetic": "mul8u_A", "test_acc": 0.80, "energy_pj": 0.5e6},
            {"arithmetic": "mul8u_B", "test_acc": 0.70, "energy_pj": 0.6e6},  # dominated by A
            {"arithmetic": "mul8u_C", "test_acc": 0.85, "energy_pj": 0.7e6},
            {"arithmetic": "mul8u_D", "test_acc": 0.99, "energy_pj": None}]  # no energy: left out
    labels = plot_accuracy_energy(rows, tmp_path / "plot.png")
    assert labels == ["A", "C", "exact 8-bit"]
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_summary_is_mean_and_sample_std_over_seeds():
    rows = [{"arithmetic": "exact", "val_acc": 0.2, "test_acc": 0.1, "energy_pj": 1e6, "parameters": 10, "wall_s": 1},
            {"arithmetic": "exact", "val_acc": 0.4, "test_acc": 0.3, "energy_pj": 3e6, "parameters": 30, "wall_s": 3},
            {"arithmetic": "mul8u_2P7", "val_acc": 0.5, "test_acc": None, "energy_pj": 2e6, "parameters": 20,
             "wall_s": 2}]
    exact, approx = summarise(rows)
    assert exact["trials"] == 2 and exact["val_acc_mean"] == pytest.approx(0.3)
    assert exact["val_acc_std"] == pytest.approx(0.02 ** 0.5)  # sample std of 0.2, 0.4
    assert exact["energy_pj_std"] == pytest.approx(2 ** 0.5 * 1e6)  # sample std (n - 1) of 1e6, 3e6
    assert approx["trials"] == 1 and approx["val_acc_std"] is None and approx["test_acc_mean"] is None


def test_summary_groups_by_multiplier_and_lambda():
    """Trials of one multiplier at two λ are two rows of the summary, each over its own seeds."""
    rows = [{"arithmetic": "exact+mul8u_2P7", "energy_weight": w, "seed": s, "val_acc": acc, "test_acc": None,
             "energy_pj": energy, "parameters": 10, "wall_s": 1}
            for w, s, acc, energy in [(0.0, 0, 0.5, 4e6), (0.0, 1, 0.7, 6e6), (1.0, 0, 0.2, 1e6), (1.0, 1, 0.4, 3e6)]]
    rows.append({"arithmetic": "exact", "energy_weight": None, "seed": 0, "val_acc": 0.9, "test_acc": None,
                 "energy_pj": 9e6, "parameters": 10, "wall_s": 1})
    summary = summarise(rows)
    assert [(s["arithmetic"], s["energy_weight"], s["trials"]) for s in summary] == [
        ("exact+mul8u_2P7", 0.0, 2), ("exact+mul8u_2P7", 1.0, 2), ("exact", None, 1)]
    assert summary[0]["val_acc_mean"] == pytest.approx(0.6) and summary[1]["val_acc_mean"] == pytest.approx(0.3)
    assert summary[0]["energy_pj_mean"] == pytest.approx(5e6) and summary[1]["energy_pj_mean"] == pytest.approx(2e6)


# ----------------------------------------------------------------- options: exit 2 before any trial
@pytest.mark.parametrize("args, message", [
    (["--multipliers", "exact,mul8u_NOSUCH"], "NOSUCH"),
    (["--multipliers", ","], "--multipliers"),
    (["--seeds", "0,x"], "--seeds"),
    (["--seeds", "0,0"], "repeats"),
    (["--seeds", "-1"], "--seed"),
    (["--stage", "evaluate"], "--stage"),
    (["--stage", "train"], "--genotype"),
    (["--preset", "huge"], "--preset"),
    (["--channels", "0"], "--channels"),
    (["--layers", "2"], "--layers"),
    (["--cpus-per-trial", "0"], "--cpus-per-trial"),
    (["--cpus-per-trial", "4096"], "--cpus-per-trial"),
    (["--max-failures", "-1"], "--max-failures"),
    (["--energy-weights", "0,x"], "--energy-weights"),
    (["--energy-weights", "-1"], "--energy-weight"),
    (["--energy-weights", "1", "--stage", "train", "--genotype", "DARTS_V2"], "--energy-weights"),
    (["--multipliers", "exact+none"], "'none'"),
    (["--multipliers", "exact+mul8u_NOSUCH"], "NOSUCH"),
    (["--address", "127.0.0.1:1"], "cannot reach the Ray cluster"),
])
def test_bad_option_exits_2_before_any_trial(tmp_path, args, message):
    out = tmp_path / "sweep"
    result = runner.invoke(app, ["sweep", "--output-dir", str(out)] + TINY_ARGS + args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output
    assert not out.exists()  # nothing written, no Ray started for it


@pytest.mark.parametrize("args, message", [
    (["--multipliers", "mul8u_17KS,17KS"], "--multipliers mul8u_17KS and 17KS name the same multiplier"),
    (["--multipliers", "exact+2P7,exact+mul8u_2P7"], "name the same multiplier (exact+mul8u_2P7)"),
    (["--multipliers", "none,fp32"], "name the same multiplier (none)"),
    (["--data-dir", "/nonexistent"], "CIFAR-10 folder /nonexistent does not exist"),
    (["--address", "garbage"], "--address must be auto, local, HOST:PORT or ray://HOST:PORT"),
    (["--address", ""], "--address must be"),
    (["--address", "10.0.0.1:99999"], "--address must be"),
    (["--address", "ray://:6379"], "--address must be"),
])
def test_the_whole_grid_is_checked_before_ray_starts(tmp_path, monkeypatch, args, message):
    import approxdarts_np.runs.sweep as sweep_module

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was imported before the settings were checked")

    monkeypatch.setattr(sweep_module, "import_ray", no_ray)
    out = tmp_path / "sweep"
    result = runner.invoke(app, ["sweep", "--output-dir", str(out)] + TINY_ARGS + args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output
    assert not out.exists()


def test_data_dir_without_batches_is_checked_before_ray(tmp_path, monkeypatch):
    import approxdarts_np.runs.sweep as sweep_module

    monkeypatch.setattr(sweep_module, "import_ray", lambda *a, **k: (_ for _ in ()).throw(AssertionError("Ray imported")))
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["sweep", "--output-dir", str(tmp_path / "out"), "--data-dir",
                                 str(tmp_path / "empty")] + TINY_ARGS)
    assert result.exit_code == 2 and "holds none of the python-version batch files" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("setting, value", [
    ("seeds", ["zero"]), ("seeds", 0), ("multipliers", "exact"), ("multipliers", [1]),
    ("energy_weights", [True]), ("max_failures", 1.5), ("cpus_per_trial", "1"), ("stage", 3),
    ("run_options", {"epochs": "1"}), ("run_options", {"colour": 1}), ("run_options", []), ("genotype", "DARTS_V2"),
])
def test_resume_of_a_sweep_whose_saved_settings_have_wrong_types(tmp_path, monkeypatch, setting, value):
    import approxdarts_np.runs.sweep as sweep_module

    monkeypatch.setattr(sweep_module, "import_ray", lambda *a, **k: (_ for _ in ()).throw(AssertionError("Ray imported")))
    saved = SweepConfig(run_options=dict(TINY), cpus_per_trial=1).to_dict()
    saved[setting] = value
    (tmp_path / "sweep.json").write_text(json.dumps(saved))
    (tmp_path / "tune").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    result = runner.invoke(app, ["sweep", "--resume", str(tmp_path)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and f"setting {setting!r} has the wrong type" in lines[0], result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_resume_refuses_other_settings_and_folders_without_a_sweep(tmp_path):
    result = runner.invoke(app, ["sweep", "--resume", str(tmp_path), "--seeds", "3"])
    assert result.exit_code == 2 and "--seeds" in result.output
    result = runner.invoke(app, ["sweep", "--resume", str(tmp_path)])
    assert result.exit_code == 2 and "no sweep to resume" in result.output


def test_without_ray_one_line_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray → ImportError
    out = tmp_path / "sweep"
    result = runner.invoke(app, ["sweep", "--output-dir", str(out), "--multipliers", "exact"] + TINY_ARGS)
    assert result.exit_code == 2
    assert result.output.strip() == 'error: the sweep needs Ray: pip install -e ".[sweep]"'
    assert not out.exists()


def test_trial_folder_names():
    assert trial_name("mul8u_17KS", 1) == "mul8u_17KS-seed1"
    assert trial_name("exact+mul8u_2P7", 0, 0.5) == "exact+mul8u_2P7-seed0-lambda0.5"
    assert trial_name("tables/my table.bin", 0) == "my_table-seed0"
    with pytest.raises(UserError, match="share a trial folder"):
        SweepConfig(multipliers=["a/mul.bin", "b/mul.npy"], run_options=dict(TINY)).validate()


def test_a_trials_error_is_one_line():
    exceptions = pytest.importorskip("ray.exceptions", reason="Ray's own exception types")
    traceback = "Traceback (most recent call last):\n  File \"sweep.py\", line 1\nUserError: the folder is busy"
    raised = exceptions.RayTaskError("train", traceback, UserError("the folder is busy\nsecond line"))
    assert error_line(raised.as_instanceof_cause()) == "the folder is busy"
    raised = exceptions.RayTaskError("train", traceback, ValueError("bad value\nmore"))
    assert error_line(raised.as_instanceof_cause()) == "ValueError: bad value"
    assert error_line(exceptions.ActorDiedError()) == \
        "ActorDiedError: The actor died unexpectedly before finishing this task."


# ----------------------------------------------------------------- a trial folder brought back from Tune's copy
_RESUME_FILES = ("config.json", "checkpoint.h5", "alpha.h5", "genotype.json", "genotype.txt")


def _run_files(folder: Path, epochs: int, tag: str, checkpoint: bool = True) -> None:
    """A run folder as restore_trial reads it: the files that resume a run, ``epochs`` lines of metrics,
    each file's text naming ``tag``; without ``checkpoint`` a run killed while it was being set up."""
    folder.mkdir(parents=True)
    for name in _RESUME_FILES if checkpoint else ("config.json",):
        (folder / name).write_text(f"{tag}: {name}\n")
    (folder / "metrics.jsonl").write_text("".join(f'{{"epoch": {e + 1}, "run": "{tag}"}}\n' for e in range(epochs)))


def _files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


@pytest.mark.parametrize("stage", ["search", "train"])
@pytest.mark.parametrize("folder_epochs, kept", [
    (None, False),  # no folder (the trial restarts on another machine): Tune's copy
    ("set-up", False),  # a config but no checkpoint (killed while it was set up): Tune's copy
    (1, False),  # behind Tune's copy: Tune's copy
    (2, True),  # as far as Tune's copy: the folder's own (its checkpoint may be newer, saved on a stop)
    (3, True),  # ahead of Tune's copy: the folder's own
])
def test_a_trial_folder_behind_tunes_copy_is_replaced_by_it(tmp_path, stage, folder_epochs, kept):
    saved, trial = tmp_path / "tune-checkpoint", tmp_path / "trial"
    _run_files(saved / stage, 2, "tune")
    if folder_epochs is not None:
        _run_files(trial / stage, 0 if folder_epochs == "set-up" else folder_epochs, "folder",
                   checkpoint=folder_epochs != "set-up")
    expected = _files(trial / stage) if kept else _files(saved / stage)
    restore_trial(saved, trial)
    assert _files(trial / stage) == expected
    other = "train" if stage == "search" else "search"
    assert not (trial / other).exists()  # a stage the Tune checkpoint does not hold is left alone


# ----------------------------------------------------------------- the summary table within 80 columns
def _rows(multiplier, weights, seeds, acc, energy_pj, parameters, wall_s) -> list[dict]:
    """Result rows around the given values, each seed's a few per cent off the last."""
    return [{"arithmetic": multiplier, "energy_weight": w, "seed": s, "val_acc": acc * (1 - 0.01 * s),
             "test_acc": acc * (1 - 0.02 * s), "energy_pj": energy_pj * (1 + 0.05 * s),
             "parameters": round(parameters * (1 + 0.1 * s)), "wall_s": wall_s * (1 + 0.05 * s)}
            for w in weights for s in seeds]


SUMMARY_CASES = {
    # the README's quick sweep with a λ axis and a multiplier-aware trial
    "quick with λ": (_rows("exact+mul8u_2P7", [0.0, 0.5], [0, 1], 0.1219, 3.57e6, 10092, 13.0)
                     + _rows("mul8u_17KS", [0.0, 0.5], [0, 1], 0.0859, 3.31e6, 9512, 11.0), "over 2 seeds"),
    # DARTS's settings: millions of parameters, a day and a half per trial
    "paper": (_rows("exact", [None], [0, 1, 2], 0.9712, 103.4e6, 3349322, 129600.0)
              + _rows("mul8u_17KS", [None], [0, 1, 2], 0.9702, 95.4e6, 3049322, 99600.0), "over 3 seeds"),
    # rows over different numbers of seeds (a trial failed): the count in a column
    "uneven": (_rows("exact", [None], [0, 1], 0.12, 3.5e6, 9000, 12.0)
               + _rows("mul8u_17KS", [None], [0], 0.1, 3.3e6, 9000, 12.0), "over seeds"),
    # too wide for 80 columns: the multiplier names fold, the numbers stay whole
    "paper, λ, three multipliers": (_rows("exact+mul8u_2P7+mul8u_17KS", [0.0, 1.0], [0, 1, 2], 0.9712, 103.4e6,
                                          3349322, 129600.0), "over 3 seeds"),
}


@pytest.mark.parametrize("case", SUMMARY_CASES)
def test_the_summary_table_fits_80_columns_and_keeps_numbers_whole(case):
    rows, over = SUMMARY_CASES[case]
    result = {"rows": rows, "summary": summarise(rows), "stage": "both", "elapsed_s": 1.0, "files": {}}
    console = Console(file=io.StringIO(), width=80)
    _print_summary(console, result)
    text = console.file.getvalue()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80, text
    # the number of seeds: in the title when every row has the same, else in a column
    assert lines[0].strip().endswith(f"mean ± std {over}"), text
    assert ("seeds" in lines[1].split()) == (over == "over seeds"), text
    for s in result["summary"]:
        cells = [format_mean_std(s["val_acc_mean"], s["val_acc_std"], 100),
                 format_mean_std(s["test_acc_mean"], s["test_acc_std"], 100),
                 format_mean_std(s["energy_pj_mean"], s["energy_pj_std"], 1e-6, digits=None),
                 format_count(s["parameters_mean"], s["parameters_std"]),
                 format_mean_std(s["wall_s_mean"], s["wall_s_std"], digits=0)]
        if case != "paper, λ, three multipliers":
            cells.append(s["arithmetic"] + " ")  # the name whole, on the line of its numbers
        assert any(all(cell in line for cell in cells) for line in lines), (cells, text)


def test_numbers_in_the_summary_table():
    assert format_mean_std(0.1219, 0.0195, 100) == "12.19±1.95"
    assert format_mean_std(3.57e6, 0.12e6, 1e-6, digits=None) == "3.57±0.12"  # three significant digits
    assert format_mean_std(103.4e6, 2.3e6, 1e-6, digits=None) == "103±2"
    assert format_mean_std(0.5, None, 100) == "50.00" and format_mean_std(None, None) == "n/a"
    assert [format_count(*c) for c in [(9512, 738), (10092, 2311), (3349322, 123456), (None, None)]] == [
        "9512±738", "10.1k±2.3k", "3.35M±0.12M", "n/a"]


# ----------------------------------------------------------------- on a local Ray
@pytest.fixture(scope="module")
def local_ray():
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
    yield ray
    ray.shutdown()


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_by_two_grid_writes_four_rows_and_the_plot(local_ray, tmp_path):
    events = []
    config = SweepConfig(multipliers=["exact", "mul8u_2P7"], seeds=[0, 1], stage="both", output_dir=str(tmp_path),
                         run_options=dict(TINY), cpus_per_trial=1)
    result = run_sweep(config, progress=events.append)
    assert result["failed"] == []
    rows = result["rows"]
    assert [(r["arithmetic"], r["seed"]) for r in rows] == [("exact", 0), ("exact", 1), ("mul8u_2P7", 0),
                                                          ("mul8u_2P7", 1)]
    with open(tmp_path / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [(r["arithmetic"], int(r["seed"])) for r in table] == [(r["arithmetic"], r["seed"]) for r in rows]
    assert json.loads((tmp_path / "results.json").read_text()) == rows
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for row in rows:
        folder = tmp_path / trial_name(row["arithmetic"], row["seed"])
        # each trial is a normal pair of run folders with that multiplier and seed
        for stage in ("search", "train"):
            saved = json.loads((folder / stage / "config.json").read_text())
            assert (saved["arithmetic"], saved["seed"], saved["threads"]) == (row["arithmetic"], row["seed"], 1)
        assert row["val_acc"] == _metrics(folder / "search")[-1]["val_acc"]
        assert row["genotype"] == (folder / "search" / "genotype.txt").read_text().strip()
        train_config = json.loads((folder / "train" / "config.json").read_text())
        assert train_config["resolved"]["genotype_string"] == row["genotype"]
        assert 0 <= row["test_acc"] <= 1 and row["wall_s"] > 0 and not row["resumed"]
        assert row["energy_fp32_pj"] > row["energy_exact8_pj"] > 0
        if row["arithmetic"] == "exact":
            assert row["energy_pj"] == row["energy_approx_pj"] == row["energy_exact8_pj"]
        else:
            assert row["energy_pj"] == row["energy_approx_pj"] < row["energy_exact8_pj"]
    exact = result["summary"][0]
    assert exact["trials"] == 2
    assert exact["test_acc_mean"] == pytest.approx((rows[0]["test_acc"] + rows[1]["test_acc"]) / 2)
    done = {e["trial"] for e in events if e["event"] == "trial_done"}
    assert done == {trial_name(r["arithmetic"], r["seed"]) for r in rows}
    assert {(e["trial"], e["stage"]) for e in events if e["event"] == "trial_epoch"} == {
        (name, stage) for name in done for stage in ("search", "train")}
    # a finished sweep resumes to the same rows without running anything again
    again = run_sweep(resume=tmp_path)
    assert [(r["arithmetic"], r["seed"], r["test_acc"]) for r in again["rows"]] == [
        (r["arithmetic"], r["seed"], r["test_acc"]) for r in rows]


@pytest.mark.slow
def test_a_killed_trial_restarts_from_its_checkpoint(local_ray, tmp_path):
    epochs = 4
    config = SweepConfig(multipliers=["mul8u_2P7"], seeds=[3], stage="search", output_dir=str(tmp_path),
                         run_options=dict(TINY, epochs=epochs), cpus_per_trial=1, max_failures=2)
    run_folder = tmp_path / trial_name("mul8u_2P7", 3) / "search"
    events, outcome = [], {}

    def sweep():
        try:
            outcome["result"] = run_sweep(config, progress=events.append)
        except BaseException as exc:  # noqa: BLE001  (re-raised in the test thread)
            outcome["error"] = exc

    thread = threading.Thread(target=sweep)
    thread.start()
    # wait for the first epoch on disk, then kill the process that holds the run folder's lock
    deadline = time.monotonic() + 240
    while not (run_folder / "metrics.jsonl").is_file() or not _metrics(run_folder):
        assert thread.is_alive() and time.monotonic() < deadline, outcome
        time.sleep(0.02)
    before = _metrics(run_folder)
    pid = int((run_folder / ".lock").read_text().split()[1])
    assert pid != os.getpid()
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive()
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["result"]
    assert result["failed"] == [] and len(result["rows"]) == 1
    row = result["rows"][0]
    assert row["resumed"]
    assert any(e["event"] == "trial_retry" for e in events)
    after = _metrics(run_folder)
    assert len(after) == epochs
    # resumed, not restarted: the epochs done before the kill are the same records (same wall clock)
    assert after[:len(before)] == before
    assert row["val_acc"] == after[-1]["val_acc"]
    config_saved = json.loads((run_folder / "config.json").read_text())
    assert config_saved["epochs"] == epochs


@pytest.mark.slow
def test_a_multiplier_aware_trial_searches_with_lambda_and_trains_the_genotype_multipliers(tmp_path):
    # run_trial is the Ray-free body of a trial: a "+" grid value and a λ reach the runs as they would from the CLI
    from approxdarts_np.nas.genotypes import read_genotype
    from approxdarts_np.runs.report import network_energy

    config = SweepConfig(multipliers=["exact+mul8u_2P7"], seeds=[0], energy_weights=[2.0], stage="both",
                         output_dir=str(tmp_path), run_options=dict(TINY))
    config.validate()
    row = run_trial(config, "exact+mul8u_2P7", 0, threads=1, energy_weight=2.0)
    folder = tmp_path / "exact+mul8u_2P7-seed0-lambda2"
    search = json.loads((folder / "search" / "config.json").read_text())
    assert (search["multipliers"], search["arithmetic"], search["energy_weight"]) == ("exact,mul8u_2P7", "none", 2.0)
    train = json.loads((folder / "train" / "config.json").read_text())
    assert train["arithmetic"] == "genotype"
    genotype = read_genotype(folder / "search" / "genotype.json")
    assert genotype.has_multipliers and train["genotype"] == genotype.to_dict()
    report, params = network_energy(genotype, TINY["channels"], TINY["layers"], "genotype")
    assert row["energy_pj"] == row["energy_approx_pj"] == report.energy_approx_pj
    assert (row["energy_weight"], row["parameters"]) == (2.0, params)
    assert json.loads((folder / "row.json").read_text()) == row


class _Shown(logging.Handler):
    """Keeps the records that Ray's loggers let through to their console handler."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _stamps(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_a_failed_trial_is_one_line_the_others_are_kept_and_resume_reruns_only_it(local_ray, tmp_path):
    out = tmp_path / "sweep"
    busy = out / trial_name("mul8u_2P7", 0) / "search"
    shown = _Shown()
    logging.getLogger("ray").addHandler(shown)
    try:
        # another run holds the search folder of one trial: that trial fails inside Ray, the other finishes
        with RunFolder(busy, fresh=True):
            result = runner.invoke(app, ["sweep", "--output-dir", str(out), "--multipliers", "exact,mul8u_2P7",
                                         "--stage", "search", "--max-failures", "0"] + TINY_ARGS)
    finally:
        logging.getLogger("ray").removeHandler(shown)
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    failed = [line for line in lines if line.startswith("failed:")]
    assert len(failed) == 1, result.output
    assert failed[0].startswith(f"failed: mul8u_2P7-seed0: {busy} is in use by another run (pid {os.getpid()} ")
    assert failed[0].endswith("error.txt)") and Path(failed[0].split("(traceback: ")[1][:-1]).is_file()
    assert lines[-1] == f"continue with: approxdarts-np sweep --resume {out}"
    assert "Traceback" not in result.output
    # nor did Ray print the trial's traceback or its list of failed trials
    assert not [r for r in shown.records if r.levelno >= logging.ERROR], [r.getMessage() for r in shown.records]
    # the finished trial's row and files are written
    rows = json.loads((out / "results.json").read_text())
    assert [(r["arithmetic"], r["seed"]) for r in rows] == [("exact", 0)]
    assert json.loads((out / trial_name("exact", 0) / "row.json").read_text()) | {"resumed": False} == rows[0]
    assert not (out / trial_name("mul8u_2P7", 0) / "row.json").exists()
    finished = _stamps(out / trial_name("exact", 0))

    # the folder is free again: --resume runs the failed trial, and only that one
    events = []
    again = run_sweep(resume=out, progress=events.append)
    assert [e["trial"] for e in events if e["event"] == "trial_start"] == ["mul8u_2P7-seed0"]
    assert again["failed"] == [] and again["unfinished"] == []
    assert [(r["arithmetic"], r["seed"]) for r in again["rows"]] == [("exact", 0), ("mul8u_2P7", 0)]
    assert again["rows"][0] == rows[0] and not again["rows"][1]["resumed"]
    assert _stamps(out / trial_name("exact", 0)) == finished
    assert json.loads((out / "results.json").read_text()) == again["rows"]


def _command() -> list[str]:
    """The installed `approxdarts-np` (or its entry point run by this Python)."""
    script = Path(sys.executable).parent / "approxdarts-np"
    launch = "import sys; sys.argv[0] = 'approxdarts-np'; from approxdarts_np_cli.launch import main; main()"
    return [str(script)] if script.is_file() else [sys.executable, "-c", launch]


def _check_lines(stdout: str, out: Path) -> None:
    """Every line within 80 columns, except those naming the sweep's folder, which name it whole."""
    for line in stdout.splitlines():
        assert len(line) <= 80 or str(out) in line, line


@pytest.mark.slow
def test_ctrl_c_and_resume_print_only_the_sweeps_own_lines_within_80_columns(tmp_path):
    # the installed command in a pipe, as in a log: Ray's start, a stop after the first epoch, the resume
    out = tmp_path / "sweep"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "TUNE_"))} | {"COLUMNS": "80"}
    epochs = 3  # a trial waits at each report until Tune takes it: stopped after epoch 1, it cannot finish
    args = ["sweep", "--output-dir", str(out), "--multipliers", "exact", "--seeds", "0", "--energy-weights", "0",
            "--stage", "search", "--channels", "2", "--layers", "3", "--batch-size", "4", "--max-train-images", "16",
            "--cpus-per-trial", "1", "--epochs", str(epochs)]
    sweep = subprocess.Popen(_command() + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        shown = [sweep.stdout.readline()]
        while "search epoch 1" not in shown[-1]:
            assert shown[-1], "the sweep ended before its trial finished an epoch"
            shown.append(sweep.stdout.readline())
        sweep.send_signal(signal.SIGINT)
        stdout, stderr = sweep.communicate(timeout=120)
    finally:
        sweep.kill()
        sweep.wait()
    stdout = "".join(shown) + stdout
    lines = stdout.splitlines()
    assert sweep.returncode == 130, (stdout, stderr)
    assert lines[0] == f"sweep → {out}: 1 trial, 1 CPU each"
    assert lines[-2:] == ["stopped: exact-seed0-lambda0 not finished",
                          f"continue with: approxdarts-np sweep --resume {out}"]
    assert "Tuner.restore" not in stderr and "Token authentication" not in stderr and "Traceback" not in stderr, stderr
    _check_lines(stdout, out)
    run = out / trial_name("exact", 0, 0.0) / "search"
    before = _metrics(run)

    done = subprocess.run(_command() + ["sweep", "--resume", str(out)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert done.stderr == ""  # no token-authentication warning, nothing else of Ray's
    lines = done.stdout.splitlines()
    assert lines[0] == f"sweep → {out}: 1 trial, 1 CPU each (resumed)"
    assert any(line.strip() == "1 trial (search)" for line in lines), done.stdout
    _check_lines(done.stdout, out)
    rows = json.loads((out / "results.json").read_text())
    assert [(r["arithmetic"], r["seed"], r["energy_weight"], r["resumed"]) for r in rows] == [("exact", 0, 0.0, True)]
    after = _metrics(run)
    assert len(after) == epochs and after[:len(before)] == before  # continued from its checkpoint


def test_the_sweep_plot_draws_the_exact_line_at_the_exact_trials_mean(tmp_path, monkeypatch):
    """write_rows_and_plot hands the plot the mean energy of the exact 8-bit trials as the exact line
    (not the mean of every network priced in exact 8-bit)."""
    from approxdarts_np.runs import plots, sweep_results

    seen = {}
    monkeypatch.setattr(plots, "plot_accuracy_energy",
                        lambda points, path, **kw: seen.update(kw) or [])

    def row(mult, seed, energy, exact8):
        return dict(arithmetic=mult, seed=seed, energy_weight=None, stage="train", val_acc=0.3,
                    test_acc=0.3, energy_pj=energy, energy_fp32_pj=10 * exact8,
                    energy_exact8_pj=exact8, energy_approx_pj=energy, parameters=1, wall_s=1.0,
                    resumed=False, genotype={}, folder="x")
    rows = [row("exact", 0, 100.0, 100.0), row("exact", 1, 120.0, 120.0),
            row("mul8u_17KS", 0, 30.0, 300.0), row("mul8u_17KS", 1, 40.0, 400.0)]
    sweep_results.write_rows_and_plot(rows, tmp_path)
    assert any(abs(value - 110.0) < 1e-9 for _, value in seen["references"]), seen["references"]


def test_rows_and_trials_saved_before_the_rename_read_as_arithmetic():
    """A sweep saved when the grid value was called "multiplier" resumes: its rows and Tune parameters."""
    from approxdarts_np.runs.sweep_results import current_row
    from approxdarts_np.runs.sweep_trials import trial_value

    old = {"multiplier": "exact+mul8u_2P7", "seed": 1, "test_acc": 0.5}
    assert current_row(old) == {"arithmetic": "exact+mul8u_2P7", "seed": 1, "test_acc": 0.5}
    assert current_row({"arithmetic": "exact", "seed": 0}) == {"arithmetic": "exact", "seed": 0}
    assert trial_value({"multiplier": "mul8u_17KS", "seed": 0}) == "mul8u_17KS"
    assert trial_value({"arithmetic": "none", "seed": 0}) == "none"
