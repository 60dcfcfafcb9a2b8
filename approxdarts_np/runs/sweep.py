"""Sweeps: a grid of searches and trainings (arithmetic × seed × λ) run as Ray Tune trials, with the results table.

This module drives the sweep on Ray: it checks the settings and the cluster's
address, starts (or joins) Ray, runs the grid with Tune, turns Tune's events
into progress events and its errors into one line each, and collects the rows.
The settings, the grid and one trial are :mod:`approxdarts_np.runs.sweep_trials`;
the results files and the summary over seeds :mod:`approxdarts_np.runs.sweep_results`.
The sweep's folder::

    <output-dir>/sweep.json                the sweep's settings (read by --resume)
    <output-dir>/<arithmetic>-seed<k>[-lambda<λ>]/   one trial: search/ and train/ run folders, row.json
    <output-dir>/tune/                     Ray Tune's experiment state and trial checkpoints
    <output-dir>/results.csv, results.json, pareto.png

A trial whose process dies is restarted by Tune (``FailureConfig(max_failures)``)
and resumes from its newest checkpoint. Ray is an optional extra: this module and
the trial's trainable import it, and only inside the functions that need it.

Tune runs a function trainable in a thread of its worker process, so the run
loop's Ctrl-C/SIGTERM handlers (main thread only) are not installed there: a
signal to a worker ends the worker, and Tune restarts the trial from its checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import time
from pathlib import Path
from typing import Callable

from approxdarts_np.errors import UserError
from approxdarts_np.io.checkpoint import write_json
from approxdarts_np.runs.plots import require_matplotlib
from approxdarts_np.runs.sweep_results import current_row, summarise, write_rows_and_plot
from approxdarts_np.runs.ray_cluster import (check_address_form, error_line, import_ray,
                                             quiet_ray_lines, start_ray)
from approxdarts_np.runs.sweep_trials import SweepConfig, _trainable, trial_name, trial_value

SWEEP_FILE = "sweep.json"
TUNE_NAME = "tune"
SweepProgress = Callable[[dict], None]


def run_sweep(sweep: SweepConfig | None = None, resume: str | Path | None = None, address: str | None = None,
              progress: SweepProgress | None = None) -> dict:
    """Run (or continue) a sweep and return its rows, the summary over seeds and the files written.

    Trials that failed more than ``max_failures`` times are listed under
    ``failed`` (trial, its error in one line, Tune's folder of the trial whose
    error.txt holds the traceback), those a stop (Ctrl-C) left running under
    ``unfinished``; ``resume`` runs both again (from their checkpoints) and
    keeps the finished trials' rows.

    ``address`` joins a running Ray cluster (its run folders must then be on a
    file system every machine sees); otherwise a local Ray is started and stopped
    here (or the one already running in this process is used). Bad settings raise
    UserError before Ray starts.
    """
    progress = progress or (lambda event: None)
    check_address_form(address)
    sweep, folder = _saved_sweep(resume) if resume is not None else _new_sweep(sweep)
    sweep.validate(local=address is None)
    require_matplotlib()
    _quiet_tune_console()
    ray = import_ray("the sweep", tune=True)
    quiet_ray_lines()

    started_here = start_ray(ray, address)
    try:
        if resume is None:
            _write_settings(sweep, folder)
        threads = sweep.trial_threads()
        tuner = _tuner(sweep, folder, resume is not None, threads, progress)
        progress({"event": "sweep_start", "output_dir": str(folder), "resumed": resume is not None,
                  "trials": len(sweep.grid()), "cpus_per_trial": threads})
        started = time.perf_counter()
        grid = tuner.fit()
        elapsed = time.perf_counter() - started
    finally:
        if started_here:
            ray.shutdown()
    rows, failed, unfinished = _trial_outcomes(grid, sweep)
    files = write_rows_and_plot(rows, folder) if rows else {}
    return {"rows": rows, "summary": summarise(rows), "failed": failed, "unfinished": unfinished, "files": files,
            "elapsed_s": elapsed, "output_dir": str(folder), "stage": sweep.stage}


def _saved_sweep(resume: str | Path) -> tuple[SweepConfig, Path]:
    """The settings of the sweep saved in the folder ``resume``, and the folder; UserError when it holds none."""
    folder = Path(resume)
    try:
        saved = json.loads((folder / SWEEP_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError(f"{folder} holds no sweep to resume ({SWEEP_FILE} expected)") from None
    sweep = SweepConfig.from_dict(saved, source=str(folder / SWEEP_FILE))
    sweep.output_dir = str(folder.resolve())
    if not (folder / TUNE_NAME).is_dir():
        raise UserError(f"{folder} holds no Ray Tune state to resume ({TUNE_NAME}/ expected)")
    return sweep, folder


def _new_sweep(sweep: SweepConfig) -> tuple[SweepConfig, Path]:
    """``sweep`` with its output folder made absolute, and the folder; UserError when it cannot hold a new sweep."""
    sweep = dataclasses.replace(sweep, output_dir=str(Path(sweep.output_dir).resolve()))
    folder = Path(sweep.output_dir)
    if (folder / SWEEP_FILE).exists():
        raise UserError(f"{folder} already holds a sweep; continue it with --resume {folder} "
                        f"or choose another --output-dir")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--output-dir {folder} is a file, not a folder")
    return sweep, folder


def _write_settings(sweep: SweepConfig, folder: Path) -> None:
    """The sweep's folder and its sweep.json, which --resume reads."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / SWEEP_FILE, sweep.to_dict())
    except OSError as exc:
        raise UserError(f"cannot write to the output folder {folder}: {exc.strerror or exc}") from None


def _quiet_tune_console() -> None:
    """Turn off Tune's own console output, before Ray is imported (a variable the user set stays).

    That output (the experiment box, checkpoint-frequency warnings, each failed trial's traceback) would
    drown the sweep's progress lines; the sweep reports through its progress callback and names every
    failed trial in one line instead (the traceback stays in the trial's error.txt).
    """
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")


def _tuner(sweep: SweepConfig, folder: Path, resumed: bool, threads: int, progress: SweepProgress):
    """The Tune Tuner of the sweep's grid: a new one, or the one saved in ``folder`` when ``resumed``."""
    from ray import tune  # optional extra ".[sweep]": Ray is imported only when a sweep runs

    trainable = tune.with_resources(_trainable, {"cpu": threads})
    if resumed:
        tuner = tune.Tuner.restore(str(folder / TUNE_NAME), trainable, resume_unfinished=True,
                                   resume_errored=True)
        _reattach_progress(tuner, progress)
        return tuner
    param_space = {"arithmetic": tune.grid_search(list(sweep.multipliers)),
                   "seed": tune.grid_search(list(sweep.seeds)),
                   "energy_weight": (tune.grid_search(list(sweep.energy_weights))
                                     if sweep.energy_weights is not None else None),
                   "threads": threads, "sweep": sweep.to_dict()}
    run_config = tune.RunConfig(
        name=TUNE_NAME, storage_path=str(folder), verbose=0,
        failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        callbacks=[_progress_callback(progress)])
    return tune.Tuner(trainable, param_space=param_space, run_config=run_config)


def _trial_outcomes(grid, sweep: SweepConfig) -> tuple[list[dict], list[dict], list[str]]:
    """The rows of the finished trials in grid order, the failed trials, and the names of the unfinished ones."""
    rows, failed, unfinished = [], [], []
    for result in grid:
        metrics = result.metrics or {}
        name = trial_name(trial_value(result.config), result.config["seed"],
                          result.config.get("energy_weight")) if result.config else "?"
        if result.error is not None:
            failed.append({"trial": name, "error": error_line(result.error), "path": result.path})
        elif "row_json" not in metrics:
            unfinished.append(name)  # the sweep was stopped (Ctrl-C) before this trial ended
        else:
            rows.append(current_row(json.loads(metrics["row_json"])) | {"resumed": bool(metrics.get("resumed"))})
    order = {trial: i for i, trial in enumerate(sweep.grid())}
    rows.sort(key=lambda r: order.get((r["arithmetic"], r["seed"], r["energy_weight"]), len(order)))
    return rows, failed, unfinished


def _progress_callback(progress: SweepProgress):
    """A Tune callback that turns trial events into sweep progress events (on the driver).

    Tune pickles its callbacks with the experiment state; the ``progress`` function
    (which may hold a console) is left out of the pickle and set again on resume.
    """
    from ray.tune import Callback  # optional extra ".[sweep]": Ray is imported only when a sweep runs

    class _Events(Callback):
        def __init__(self, progress: SweepProgress):
            self.progress = progress  # an argument, not a closure: the class itself is pickled by value

        def __getstate__(self):
            return {}

        def __setstate__(self, state):
            self.progress = lambda event: None

        def _name(self, trial) -> str:
            return trial_name(trial_value(trial.config), trial.config["seed"], trial.config.get("energy_weight"))

        def on_trial_start(self, iteration, trials, trial, **info):
            self.progress({"event": "trial_start", "trial": self._name(trial)})

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if result.get("stage") in ("search", "train"):
                self.progress({"event": "trial_epoch", "trial": self._name(trial), "stage": result["stage"],
                                   **{k: result[k] for k in ("epoch", "val_acc", "test_acc", "train_acc") if k in result}})

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.progress({"event": "trial_done", "trial": self._name(trial)})

        def on_trial_recover(self, iteration, trials, trial, **info):
            self.progress({"event": "trial_retry", "trial": self._name(trial), "error": _trial_error(trial)})

        def on_trial_error(self, iteration, trials, trial, **info):
            self.progress({"event": "trial_error", "trial": self._name(trial), "error": _trial_error(trial)})

    return _Events(progress)


def _reattach_progress(tuner, progress: SweepProgress) -> None:
    """Give a restored Tuner's progress callback the new ``progress`` function (best effort: private state)."""
    internal = getattr(tuner, "_local_tuner", None)
    run_config = internal.get_run_config() if internal is not None else None
    for callback in (getattr(run_config, "callbacks", None) or []):
        if hasattr(callback, "progress"):
            callback.progress = progress




def _trial_error(trial) -> str | None:
    """The one-line error of a Tune trial that just failed, or None (best effort: a progress line).

    Tune pickles the error into the trial's local folder before it calls the callbacks; its copy in the
    experiment's storage (``Trial.get_pickled_error``) comes later.
    """
    try:
        with open(trial.pickled_error_file, "rb") as f:
            error = pickle.load(f)
    except Exception:  # noqa: BLE001  (no file, an unpicklable error: a progress line must never end the sweep)
        return None
    return error_line(error) if isinstance(error, BaseException) else None


# ----------------------------------------------------------------- results
