"""Sweeps: a grid of searches and trainings (multiplier × seed × λ) run as Ray Tune trials, with the results table.

Each trial is an ordinary run: it calls :func:`~approxdarts_np.runs.search.run_search`
and :func:`~approxdarts_np.runs.train.run_train` exactly as the CLI commands
do, in run folders under the sweep's folder::

    <output-dir>/sweep.json                the sweep's settings (read by --resume)
    <output-dir>/<multiplier>-seed<k>[-lambda<λ>]/   one trial: search/ and train/ run folders, row.json
    <output-dir>/tune/                     Ray Tune's experiment state and trial checkpoints
    <output-dir>/results.csv, results.json, pareto.png

After every epoch a trial reports its metrics to Tune together with a Tune
checkpoint holding the files needed to resume its run folders. A trial whose
process dies is restarted by Tune (``FailureConfig(max_failures)``) and
resumes its run folder from the newest checkpoint — the folder's own, or the
Tune copy when the folder is missing (a restart on another machine). This is
the only module that imports Ray, and only inside functions.

A grid value of ``--multipliers`` joined with ``+`` (``exact+mul8u_2P7+mul8u_17KS``)
is one multiplier-aware trial: the search chooses among those multipliers per
searched op, and the training and evaluation use the multipliers its genotype
names. ``--energy-weights`` adds λ (the search's ``energy_weight``) as a grid axis.

Tune runs a function trainable in a thread of its worker process, so the run
loop's Ctrl-C/SIGTERM handlers (main thread only) are not installed there: a
signal to a worker ends the worker, and Tune restarts the trial from its checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from approxdarts_np.errors import UserError
from approxdarts_np.io.checkpoint import write_json, write_text
from approxdarts_np.io.rundir import CHECKPOINT, CONFIG, METRICS

STAGES = ("search", "train", "both")
SWEEP_FILE = "sweep.json"
TUNE_NAME = "tune"
ROW_FILE = "row.json"
RAY_MISSING = 'the sweep needs Ray: pip install -e ".[sweep]"'
# Files of a run folder that a Tune checkpoint carries (enough to resume the run and read its result).
_RUN_FILES = (CONFIG, CHECKPOINT, METRICS, "genotype.json", "genotype.txt", "alpha.h5")
# Settings passed through to every search and training run (None: the preset's default).
PASSED_THROUGH = ("epochs", "channels", "layers", "batch_size", "max_train_images", "data_dir")

SweepProgress = Callable[[dict], None]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _list_of(check) -> Callable[[object], bool]:
    return lambda value: isinstance(value, list) and all(check(v) for v in value)


def _or_none(check) -> Callable[[object], bool]:
    return lambda value: value is None or check(value)


_RUN_OPTION_TYPES = {"epochs": _is_int, "channels": _is_int, "layers": _is_int, "batch_size": _is_int,
                     "max_train_images": _or_none(_is_int), "data_dir": _or_none(lambda v: isinstance(v, str))}
# The JSON type of every SweepConfig field, checked when sweep.json is read back.
_SETTING_TYPES = {
    "multipliers": _list_of(lambda v: isinstance(v, str)), "seeds": _list_of(_is_int),
    "energy_weights": _or_none(_list_of(_is_number)), "stage": lambda v: isinstance(v, str),
    "output_dir": lambda v: isinstance(v, str), "preset": lambda v: isinstance(v, str),
    "run_options": lambda v: isinstance(v, dict) and all(
        k in _RUN_OPTION_TYPES and _RUN_OPTION_TYPES[k](x) for k, x in v.items()),
    "genotype": _or_none(lambda v: isinstance(v, dict)), "cpus_per_trial": _or_none(_is_int),
    "max_failures": _is_int, "eval_batch_size": _is_int,
}


def _short(value) -> str:
    try:
        text = repr(value)
    except ValueError:  # an integer past Python's 4,300-digit printing limit
        return f"a {type(value).__name__} too long to print"
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass
class SweepConfig:
    """A sweep: the grid, the stage each trial runs, the settings passed to every run, Ray resources."""

    multipliers: list = field(default_factory=lambda: ["exact"])  # "a+b+c": a multiplier-aware trial
    seeds: list = field(default_factory=lambda: [0])
    energy_weights: list | None = None  # λ axis of the grid (None: no λ, the search's default 0)
    stage: str = "both"
    output_dir: str = "runs/sweep"
    preset: str = "quick"
    run_options: dict = field(default_factory=dict)  # PASSED_THROUGH settings the user gave
    genotype: dict | None = None  # stage "train": the genotype every trial trains
    cpus_per_trial: int | None = None  # None: all cores of this machine (one trial at a time)
    max_failures: int = 3
    eval_batch_size: int = 100

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str) -> "SweepConfig":
        """Rebuild saved settings; UserError naming the setting when one has the wrong type (an edited file)."""
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or set(d) - names:
            raise UserError(f"{source} does not hold this version's sweep settings")
        for name, value in d.items():
            if not _SETTING_TYPES[name](value):
                raise UserError(f"{source}: setting {name!r} has the wrong type: {_short(value)}")
        return cls(**d)

    def trial_threads(self) -> int:
        from approxdarts_np.runs.config import available_cores
        return self.cpus_per_trial if self.cpus_per_trial is not None else available_cores()

    def grid(self) -> list[tuple[str, int, float | None]]:
        """Every trial's (multiplier, seed, λ), in the order of the results table."""
        weights = self.energy_weights if self.energy_weights is not None else [None]
        return [(m, s, w) for m in self.multipliers for w in weights for s in self.seeds]

    def run_config(self, kind: str, multiplier: str, seed: int, folder: Path, threads: int | None,
                   energy_weight: float | None = None):
        """The SearchConfig or TrainConfig of one trial's ``kind`` run."""
        from approxdarts_np.runs.search import SearchConfig
        from approxdarts_np.approx.arithmetic import GENOTYPE
        from approxdarts_np.runs.train import TrainConfig

        cls = SearchConfig if kind == "search" else TrainConfig
        make = cls.paper if self.preset == "paper" else cls.quick
        candidates = multiplier.split("+")
        options = dict(self.run_options, arithmetic=multiplier, seed=seed, threads=threads,
                       output_dir=str(folder))
        if kind == "search":
            if len(candidates) > 1:
                options.update(arithmetic="none", multipliers=",".join(candidates))
            if energy_weight is not None:
                options["energy_weight"] = float(energy_weight)
                if len(candidates) == 1 and energy_weight > 0:
                    # one multiplier leaves no β to move: λ then acts on the ops (docs/design.md §4)
                    options["energy_scope"] = "all"
        else:
            options["genotype"] = self.genotype if self.genotype is not None else {}
            if len(candidates) > 1:
                options["arithmetic"] = GENOTYPE
        return make(**options)

    def validate(self, local: bool = True) -> None:
        """UserError for any setting that cannot run, before Ray starts or any trial runs."""
        from approxdarts_np.approx.arithmetic import arithmetic_from_spec
        from approxdarts_np.data.cifar import check_data_dir
        from approxdarts_np.nas.genotypes import DARTS_V2, Genotype
        from approxdarts_np.runs.config import available_cores

        unknown = sorted(set(self.run_options) - set(PASSED_THROUGH))
        if unknown:
            raise UserError(f"a sweep passes only {', '.join(PASSED_THROUGH)} to its runs, not {', '.join(unknown)}")
        if self.stage not in STAGES:
            raise UserError(f"--stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if self.preset not in ("quick", "paper"):
            raise UserError(f"--preset must be quick or paper, got {self.preset!r}")
        if not self.multipliers:
            raise UserError("--multipliers names no multiplier (give e.g. exact,mul8u_17KS)")
        if not self.seeds:
            raise UserError("--seeds names no seed (give e.g. 0,1)")
        for name, values in (("--multipliers", self.multipliers), ("--seeds", self.seeds)):
            if len(set(values)) != len(values):
                raise UserError(f"{name} repeats a value: {','.join(map(str, values))}")
        if self.energy_weights is not None:
            if not self.energy_weights:
                raise UserError("--energy-weights names no value (give e.g. 0,0.5,1)")
            if len(set(self.energy_weights)) != len(self.energy_weights):
                raise UserError(f"--energy-weights repeats a value: {','.join(map(str, self.energy_weights))}")
            if self.stage == "train":
                raise UserError("--energy-weights acts on the search: use --stage search or both")
        names = [trial_name(m, 0) for m in self.multipliers]
        if len(set(names)) != len(names):
            raise UserError(f"--multipliers {','.join(self.multipliers)}: two of them would share a trial "
                            f"folder name; rename a table file")
        same: dict[tuple, str] = {}
        for spec in self.multipliers:
            parts = []
            for part in spec.split("+"):
                arithmetic = arithmetic_from_spec(part)  # unknown name or bad table: UserError
                parts.append("none" if arithmetic is None else arithmetic.name)
            if tuple(parts) in same:
                raise UserError(f"--multipliers {same[tuple(parts)]} and {spec} name the same multiplier "
                                f"({'+'.join(parts)}); give it once")
            same[tuple(parts)] = spec
        if self.run_options.get("data_dir") is not None:
            check_data_dir(self.run_options["data_dir"])  # on a cluster: the path every machine reads
        if self.cpus_per_trial is not None:
            if self.cpus_per_trial < 1:
                raise UserError(f"--cpus-per-trial must be at least 1, got {self.cpus_per_trial}")
            if local and self.cpus_per_trial > available_cores():
                raise UserError(f"--cpus-per-trial {self.cpus_per_trial} is more than the {available_cores()} "
                                f"cores of this machine")
        if self.max_failures < 0:
            raise UserError(f"--max-failures must be >= 0, got {self.max_failures}")
        if self.eval_batch_size <= 0:
            raise UserError(f"the evaluation batch size must be positive, got {self.eval_batch_size}")
        if self.stage == "train":
            if self.genotype is None:
                raise UserError("--stage train needs --genotype (a genotype.json of a search, or DARTS_V2)")
            Genotype.from_dict(self.genotype)
        threads = self.cpus_per_trial if local else None
        kinds = {"search": ["search"], "train": ["train"], "both": ["search", "train"]}[self.stage]
        for seed in self.seeds:
            if not isinstance(seed, int) or seed < 0:
                raise UserError(f"--seeds must be whole numbers >= 0, got {seed!r}")
        for kind in kinds:
            for spec, seed, weight in self.grid():
                if kind == "train" and "+" in spec:
                    continue  # trains the multipliers the searched genotype names: checked once it exists
                config = self.run_config(kind, spec, seed, Path(self.output_dir), threads, weight)
                if kind == "train" and self.genotype is None:
                    config = config.replace(genotype=DARTS_V2.to_dict())  # the searched one comes later
                config.validate()


def trial_name(multiplier: str, seed: int, energy_weight: float | None = None) -> str:
    """The folder of one trial: ``mul8u_17KS-seed0``, ``exact+mul8u_2P7-seed1-lambda0.5``; a table path
    gives its file stem."""
    stems = [Path(m).stem if ("/" in m or "." in m) else m for m in multiplier.split("+")]
    name = "+".join(re.sub(r"[^A-Za-z0-9_]+", "_", stem) for stem in stems) + f"-seed{seed}"
    return name if energy_weight is None else name + f"-lambda{energy_weight:g}"


# ----------------------------------------------------------------- one trial, without Ray
def run_trial(sweep: SweepConfig, multiplier: str, seed: int, threads: int,
              on_epoch: Callable[[str, dict], None] | None = None, energy_weight: float | None = None) -> dict:
    """Run (or continue) one trial's search and/or training and evaluation; its results row.

    Each run folder that already holds a checkpoint is resumed, so calling this
    again after the process died continues where the run's checkpoint stands.
    ``on_epoch(stage, event)`` is called after every epoch's checkpoint.
    """
    from approxdarts_np.nas.genotypes import Genotype, read_genotype
    from approxdarts_np.runs.report import evaluate_checkpoint
    from approxdarts_np.runs.search import run_search
    from approxdarts_np.approx.arithmetic import GENOTYPE
    from approxdarts_np.runs.train import run_train

    folder = Path(sweep.output_dir) / trial_name(multiplier, seed, energy_weight)
    row = {"multiplier": multiplier, "seed": seed, "energy_weight": energy_weight, "stage": sweep.stage,
           "val_acc": None, "test_acc": None}
    mode = GENOTYPE if "+" in multiplier else multiplier  # how the trained network computes
    wall = 0.0
    genotype = Genotype.from_dict(sweep.genotype) if sweep.genotype is not None else None
    if sweep.stage in ("search", "both"):
        config = sweep.run_config("search", multiplier, seed, folder / "search", threads, energy_weight)
        summary = _run_or_resume(run_search, config, threads, _stage_progress("search", on_epoch))
        row["val_acc"] = summary["val_acc"]
        wall += summary["elapsed_s"]
        genotype = read_genotype(folder / "search" / "genotype.json")
    if sweep.stage in ("train", "both"):
        config = sweep.run_config("train", multiplier, seed, folder / "train", threads)
        config = config.replace(genotype=genotype.to_dict())
        summary = _run_or_resume(run_train, config, threads, _stage_progress("train", on_epoch))
        started = time.perf_counter()
        evaluated = evaluate_checkpoint(folder / "train" / CHECKPOINT, [mode], sweep.run_options.get("data_dir"),
                                        sweep.eval_batch_size)[0]
        row["test_acc"] = evaluated["test_acc"]
        wall += summary["elapsed_s"] + time.perf_counter() - started
    channels, layers = config.channels, config.layers
    row.update(_energy_columns(genotype, channels, layers, mode))
    row.update(wall_s=round(wall, 3), genotype=genotype.to_darts_string(), folder=str(folder))
    write_json(folder / ROW_FILE, row)
    return row


def _energy_columns(genotype, channels: int, layers: int, multiplier: str) -> dict:
    """Energy per inference (FP32, exact 8-bit, this multiplier) and parameters of the trial's network."""
    from approxdarts_np.approx.arithmetic import is_fp32
    from approxdarts_np.runs.report import network_energy

    columns = {"energy_pj": None, "energy_fp32_pj": None, "energy_exact8_pj": None, "energy_approx_pj": None,
               "parameters": None}
    spec = str(multiplier).lower()
    try:
        report, params = network_energy(genotype, channels, layers, "exact" if is_fp32(spec)
                                        else multiplier)
    except UserError:
        report, params = None, None  # a table without a published power: accuracy only
    if report is None:
        _, columns["parameters"] = network_energy(genotype, channels, layers, "exact")
        return columns
    approx = None if spec in ("none", "fp32", "float") else (
        report.energy_exact8_pj if spec == "exact" else report.energy_approx_pj)  # "genotype": per-op priced
    columns.update(energy_pj=report.energy_fp32_pj if approx is None else approx,
                   energy_fp32_pj=report.energy_fp32_pj, energy_exact8_pj=report.energy_exact8_pj,
                   energy_approx_pj=approx, parameters=params)
    return columns


def _stage_progress(stage: str, on_epoch):
    def progress(event: dict) -> None:
        if on_epoch is not None and event["event"] == "epoch":
            on_epoch(stage, event)
    return progress


def _run_or_resume(run, config, threads: int, progress) -> dict:
    """Start the run in ``config.output_dir``, or resume it there when it holds a checkpoint."""
    folder = Path(config.output_dir)
    if (folder / CHECKPOINT).is_file() and (folder / CONFIG).is_file():
        return run(resume=folder, progress=progress, overrides={"threads": threads})
    # A process killed while the run was being set up can leave a config or metrics without a checkpoint.
    for name in (CONFIG, METRICS):
        (folder / name).unlink(missing_ok=True)
    return run(config, progress=progress)


def _epochs_done(folder: Path) -> int:
    try:
        return len((folder / METRICS).read_text(encoding="utf-8").splitlines())
    except OSError:
        return -1


def copy_run_files(source: Path, target: Path) -> None:
    """Copy the files that resume a run (and its results so far) from one run folder to another."""
    target.mkdir(parents=True, exist_ok=True)
    for name in _RUN_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)


def restore_trial(saved: Path, folder: Path) -> None:
    """Bring a trial folder back from a Tune checkpoint where the folder is missing or behind it."""
    for stage in ("search", "train"):
        if not (saved / stage / CHECKPOINT).is_file():
            continue
        run_folder = folder / stage
        if not (run_folder / CHECKPOINT).is_file() or _epochs_done(run_folder) < _epochs_done(saved / stage):
            copy_run_files(saved / stage, run_folder)


# ----------------------------------------------------------------- the Ray side
def _trainable(params: dict) -> None:
    """Ray Tune function trainable: one trial of the grid, reporting each epoch with a Tune checkpoint."""
    from ray import tune

    sweep = SweepConfig.from_dict(params["sweep"], source="the trial's sweep settings")
    multiplier, seed, threads = params["multiplier"], params["seed"], params["threads"]
    energy_weight = params.get("energy_weight")
    folder = Path(sweep.output_dir) / trial_name(multiplier, seed, energy_weight)
    saved = tune.get_checkpoint()
    resumed = saved is not None or (folder / "search" / CHECKPOINT).is_file() or (folder / "train" / CHECKPOINT).is_file()
    if saved is not None:
        with saved.as_directory() as directory:
            restore_trial(Path(directory), folder)

    def on_epoch(stage: str, event: dict) -> None:
        metrics = {k: v for k, v in event.items() if isinstance(v, (int, float)) and k != "event"}
        with tempfile.TemporaryDirectory(prefix="approxdarts-np-trial-") as tmp:
            for name in ("search", "train"):
                if (folder / name / CHECKPOINT).is_file():
                    copy_run_files(folder / name, Path(tmp) / name)
            tune.report({"stage": stage, **metrics}, checkpoint=tune.Checkpoint.from_directory(tmp))

    row = run_trial(sweep, multiplier, seed, threads, on_epoch, energy_weight)
    tune.report({"stage": "done", "row_json": json.dumps(row), "resumed": resumed})


def import_ray():
    """The ``ray`` module; UserError naming the install command when Ray is missing."""
    try:
        import ray
        from ray import tune  # noqa: F401  (the extra installs ray[tune])
    except ImportError:
        raise UserError(RAY_MISSING) from None
    return ray


def _progress_callback(progress: SweepProgress):
    """A Tune callback that turns trial events into sweep progress events (on the driver).

    Tune pickles its callbacks with the experiment state; the ``progress`` function
    (which may hold a console) is left out of the pickle and set again on resume.
    """
    from ray.tune import Callback

    class _Events(Callback):
        def __init__(self, progress: SweepProgress):
            self.progress = progress  # an argument, not a closure: the class itself is pickled by value

        def __getstate__(self):
            return {}

        def __setstate__(self, state):
            self.progress = lambda event: None

        def _name(self, trial) -> str:
            return trial_name(trial.config["multiplier"], trial.config["seed"], trial.config.get("energy_weight"))

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
    if resume is not None:
        folder = Path(resume)
        try:
            saved = json.loads((folder / SWEEP_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise UserError(f"{folder} holds no sweep to resume ({SWEEP_FILE} expected)") from None
        sweep = SweepConfig.from_dict(saved, source=str(folder / SWEEP_FILE))
        sweep.output_dir = str(folder.resolve())
        if not (folder / TUNE_NAME).is_dir():
            raise UserError(f"{folder} holds no Ray Tune state to resume ({TUNE_NAME}/ expected)")
    else:
        sweep = dataclasses.replace(sweep, output_dir=str(Path(sweep.output_dir).resolve()))
        folder = Path(sweep.output_dir)
        if (folder / SWEEP_FILE).exists():
            raise UserError(f"{folder} already holds a sweep; continue it with --resume {folder} "
                            f"or choose another --output-dir")
        if folder.exists() and not folder.is_dir():
            raise UserError(f"--output-dir {folder} is a file, not a folder")
    sweep.validate(local=address is None)
    from approxdarts_np.runs.plots import require_matplotlib
    require_matplotlib()
    # Tune's own console output (the experiment box, checkpoint-frequency warnings, each failed trial's
    # traceback) would drown the sweep's progress lines; the sweep reports through its progress callback
    # and names every failed trial in one line instead (the traceback stays in the trial's error.txt).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    ray = import_ray()
    from ray import tune
    quiet_ray_lines()

    started_here = False
    if not ray.is_initialized():
        if address is not None:
            check_address(address)
        try:
            if address is not None:
                ray.init(address=address, logging_level="warning", log_to_driver=False)
            else:
                ray.init(include_dashboard=False, logging_level="warning", log_to_driver=False)
        except ConnectionError as exc:
            raise UserError(f"cannot join the Ray cluster at {address}: {exc}") from None
        started_here = True
    try:
        if resume is None:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                write_json(folder / SWEEP_FILE, sweep.to_dict())
            except OSError as exc:
                raise UserError(f"cannot write to the output folder {folder}: {exc.strerror or exc}") from None
        threads = sweep.trial_threads()
        trainable = tune.with_resources(_trainable, {"cpu": threads})
        if resume is not None:
            tuner = tune.Tuner.restore(str(folder / TUNE_NAME), trainable, resume_unfinished=True,
                                       resume_errored=True)
            _reattach_progress(tuner, progress)
        else:
            param_space = {"multiplier": tune.grid_search(list(sweep.multipliers)),
                           "seed": tune.grid_search(list(sweep.seeds)),
                           "energy_weight": (tune.grid_search(list(sweep.energy_weights))
                                             if sweep.energy_weights is not None else None),
                           "threads": threads, "sweep": sweep.to_dict()}
            run_config = tune.RunConfig(
                name=TUNE_NAME, storage_path=str(folder), verbose=0,
                failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                callbacks=[_progress_callback(progress)])
            tuner = tune.Tuner(trainable, param_space=param_space, run_config=run_config)
        progress({"event": "sweep_start", "output_dir": str(folder), "resumed": resume is not None,
                  "trials": len(sweep.grid()), "cpus_per_trial": threads})
        started = time.perf_counter()
        grid = tuner.fit()
        elapsed = time.perf_counter() - started
    finally:
        if started_here:
            ray.shutdown()
    rows, failed, unfinished = [], [], []
    for result in grid:
        metrics = result.metrics or {}
        name = trial_name(result.config["multiplier"], result.config["seed"],
                          result.config.get("energy_weight")) if result.config else "?"
        if result.error is not None:
            failed.append({"trial": name, "error": error_line(result.error), "path": result.path})
        elif "row_json" not in metrics:
            unfinished.append(name)  # the sweep was stopped (Ctrl-C) before this trial ended
        else:
            rows.append(json.loads(metrics["row_json"]) | {"resumed": bool(metrics.get("resumed"))})
    order = {trial: i for i, trial in enumerate(sweep.grid())}
    rows.sort(key=lambda r: order.get((r["multiplier"], r["seed"], r["energy_weight"]), len(order)))
    files = write_results(rows, folder) if rows else {}
    return {"rows": rows, "summary": summarize(rows), "failed": failed, "unfinished": unfinished, "files": files,
            "elapsed_s": elapsed, "output_dir": str(folder), "stage": sweep.stage}


_ADDRESS = re.compile(r"(?:ray://)?(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]):(\d{1,5})")


def check_address_form(address: str | None) -> None:
    """UserError unless ``address`` is None, ``auto``, ``local``, HOST:PORT or ray://HOST:PORT (Ray
    itself answers anything else with a ValueError traceback)."""
    if address is None or address in ("auto", "local"):
        return
    match = _ADDRESS.fullmatch(address)
    if match is None or not 1 <= int(match[1]) <= 65535:
        raise UserError(f"--address must be auto, local, HOST:PORT or ray://HOST:PORT (e.g. 10.0.0.1:6379), "
                        f"got {_short(address)}")


def check_address(address: str, timeout_s: float = 5.0) -> None:
    """UserError unless ``host:port`` accepts a connection (Ray itself retries an unreachable address for
    minutes); ``auto`` and other forms without a port are left to Ray."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise UserError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc} (start it with "
                        f"`ray start --head` on that machine)") from None


def error_line(error: BaseException) -> str:
    """One line for a trial's error: a UserError's message, otherwise the exception's type and first line.

    An exception raised inside a trial reaches the driver wrapped in a RayTaskError whose text is the
    remote traceback; its ``cause`` is the exception itself (an ActorDiedError can hold such a RayTaskError
    in turn). Errors without a cause (an ActorDiedError when the trial's process died) give their first line.
    """
    for _ in range(3):
        cause = getattr(error, "cause", None)
        if not isinstance(cause, BaseException):
            break
        error = cause
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if isinstance(error, UserError) and lines:
        return lines[0]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _trial_error(trial) -> str | None:
    """The one-line error of a Tune trial that just failed, or None (best effort: a progress line).

    Tune pickles the error into the trial's local folder before it calls the callbacks; its copy in the
    experiment's storage (``Trial.get_pickled_error``) comes later.
    """
    import pickle

    try:
        with open(trial.pickled_error_file, "rb") as f:
            error = pickle.load(f)
    except Exception:  # noqa: BLE001  (no file, an unpicklable error: a progress line must never end the sweep)
        return None
    return error_line(error) if isinstance(error, BaseException) else None


class _DropRecords(logging.Filter):
    """A logging filter that drops the records whose message starts with one of ``starts``."""

    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


# Ray's console lines that the sweep leaves out (logger, start of the message), each for a reason.
_RAY_LINES_LEFT_OUT = {
    # Ray's default for a local Ray (and for `auto` when a token exists), announced on every start.
    "ray._private.authentication.authentication_token_setup": ("Token authentication is enabled",),
    # After Ctrl-C: Ray's "Resume experiment with: Tuner.restore(...)"; the CLI names `sweep --resume`.
    # After failed trials: the list of trial ids; the CLI names each failed trial and its error.
    "ray.tune.tune": ("Experiment has been interrupted", "Trials did not complete"),
}


def quiet_ray_lines() -> None:
    """Leave Ray's lines in ``_RAY_LINES_LEFT_OUT`` out of the console (once per process)."""
    for name, starts in _RAY_LINES_LEFT_OUT.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropRecords) for f in logger.filters):
            logger.addFilter(_DropRecords(starts))


# ----------------------------------------------------------------- results
ROW_COLUMNS = ("multiplier", "seed", "energy_weight", "stage", "val_acc", "test_acc", "energy_pj", "energy_fp32_pj",
               "energy_exact8_pj", "energy_approx_pj", "parameters", "wall_s", "resumed", "genotype", "folder")


def write_results(rows: list[dict], folder: Path) -> dict:
    """results.csv, results.json and pareto.png in ``folder``; their paths."""
    import csv
    import io

    from approxdarts_np.runs.plots import mean_references, plot_accuracy_energy

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(ROW_COLUMNS), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    files = {"csv": folder / "results.csv", "json": folder / "results.json", "plot": folder / "pareto.png"}
    write_text(files["csv"], out.getvalue())
    write_json(files["json"], rows)
    accuracy = "test_acc" if all(r["test_acc"] is not None for r in rows) else "val_acc"
    points = [dict(r, label=f"{short_name(r['multiplier'])} s{r['seed']}"
                   + ("" if r.get("energy_weight") is None else f" λ{r['energy_weight']:g}"), accuracy=r[accuracy])
              for r in rows]
    # each line the mean of what its label names (the exact 8-bit trials, when there are any)
    references = mean_references(rows)
    plot_accuracy_energy(points, files["plot"], accuracy_label="test accuracy" if accuracy == "test_acc"
                         else "search val accuracy", title=f"Sweep: {len(rows)} trials", references=references)
    return {k: str(v) for k, v in files.items()}


def short_name(multiplier: str) -> str:
    return "+".join({"none": "FP32", "exact": "exact 8-bit"}.get(m.lower(), m.replace("mul8u_", ""))
                    for m in str(multiplier).split("+"))


def summarize(rows: list[dict]) -> list[dict]:
    """Per multiplier (and λ): trials, and mean ± std over seeds of accuracies, energy, parameters, wall time.

    The std is the sample standard deviation (n − 1); None for a single seed.
    """
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["multiplier"], row.get("energy_weight")), []).append(row)
    summary = []
    for (multiplier, energy_weight), group in groups.items():
        entry = {"multiplier": multiplier, "energy_weight": energy_weight, "trials": len(group)}
        for key in ("val_acc", "test_acc", "energy_pj", "parameters", "wall_s"):
            values = [r[key] for r in group if r.get(key) is not None]
            entry[key + "_mean"] = statistics.fmean(values) if values else None
            entry[key + "_std"] = statistics.stdev(values) if len(values) > 1 else None
        summary.append(entry)
    return summary


def format_mean_std(mean: float | None, std: float | None, scale: float = 1.0, digits: int | None = 2) -> str:
    """``mean±std`` scaled (``mean`` alone without a std, ``n/a`` without a mean), with ``digits`` decimals,
    or with None as many as give the mean three significant digits (the std gets the same decimals)."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    mean *= scale
    if digits is None:
        digits = max(0, 2 - math.floor(math.log10(abs(mean)))) if mean else 0
    text = f"{mean:.{digits}f}"
    return text if std is None else f"{text}±{std * scale:.{digits}f}"


def format_count(mean: float | None, std: float | None) -> str:
    """A count's ``mean±std``, from 10,000 on in thousands or millions: 9512±738, 10.1k±2.3k, 3.35M±0.12M."""
    if mean is None or abs(mean) < 1e4:
        return format_mean_std(mean, std, digits=0)
    unit, size = ("M", 1e6) if abs(mean) >= 1e6 else ("k", 1e3)
    return f"{unit}±".join(format_mean_std(mean, std, 1 / size, digits=None).split("±")) + unit


def parse_list(text: str, what: str, kind=str) -> list:
    """``a,b,c`` as a list of ``kind``; UserError naming the option for an empty or malformed list."""
    items = [s.strip() for s in str(text).split(",") if s.strip()]
    if not items:
        raise UserError(f"{what} names nothing (give a comma-separated list)")
    try:
        return [kind(s) for s in items]
    except ValueError:
        raise UserError(f"{what} must be a comma-separated list of {'whole ' if kind is int else ''}numbers, "
                        f"got {text!r}") from None

