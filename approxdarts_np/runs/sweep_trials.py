"""A sweep's settings, its grid of trials, and one trial: run, folder, Tune checkpoint, Ray trainable.

Each trial is an ordinary run: it calls :func:`~approxdarts_np.runs.search.run_search`
and :func:`~approxdarts_np.runs.train.run_train` exactly as the CLI commands
do, in run folders under the sweep's folder
(``<output-dir>/<arithmetic>-seed<k>[-lambda<λ>]/``: search/ and train/ run folders, row.json).

A grid value of ``--multipliers`` joined with ``+`` (``exact+mul8u_2P7+mul8u_17KS``)
is one multiplier-aware trial: the search chooses among those multipliers per
searched op, and the training and evaluation use the multipliers its genotype
names. ``--energy-weights`` adds λ (the search's ``energy_weight``) as a grid axis.

After every epoch a trial reports its metrics to Tune together with a Tune
checkpoint holding the files needed to resume its run folders; a restarted
trial resumes from the newest checkpoint — the folder's own, or the Tune copy
when the folder is missing (a restart on another machine).
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from approxdarts_np.approx.arithmetic import GENOTYPE, arithmetic_from_spec, is_fp32
from approxdarts_np.data.cifar import check_data_dir
from approxdarts_np.errors import UserError
from approxdarts_np.io.checkpoint import write_json
from approxdarts_np.io.rundir import CHECKPOINT, CONFIG, METRICS
from approxdarts_np.nas.genotypes import DARTS_V2, Genotype, read_genotype
from approxdarts_np.runs.config import available_cores, genotype_setting, setting
from approxdarts_np.runs.report import evaluate_checkpoint, network_energy
from approxdarts_np.runs.search import SearchConfig, run_search
from approxdarts_np.runs.train import TrainConfig, run_train

STAGES = ("search", "train", "both")
ROW_FILE = "row.json"
# Files of a run folder that a Tune checkpoint carries (enough to resume the run and read its result).
_RUN_FILES = (CONFIG, CHECKPOINT, METRICS, "genotype.json", "genotype.txt", "alpha.h5")
# Settings passed through to every search and training run (None: the preset's default).
PASSED_THROUGH = ("epochs", "channels", "layers", "batch_size", "max_train_images", "data_dir")


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


def trial_value(params: dict) -> str:
    """A trial's grid value (an arithmetic spec) from its Tune parameters; a sweep saved before the parameter
    was renamed names it ``multiplier``."""
    return params["arithmetic"] if "arithmetic" in params else params["multiplier"]


def short_repr(value) -> str:
    try:
        text = repr(value)
    except ValueError:  # an integer past Python's 4,300-digit printing limit
        return f"a {type(value).__name__} too long to print"
    return text if len(text) <= 80 else text[:77] + "..."


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


@dataclass
class SweepConfig:
    """A sweep: the grid, the stage each trial runs, the settings passed to every run, Ray resources."""

    multipliers: list = setting(
        default_factory=lambda: ["exact"], help="Comma list: none (FP32), exact, table names or paths; a+b+c is one "
        "multiplier-aware search choosing among a, b, c per op.", shown="exact", text=str,
        parse=lambda text: {"multipliers": parse_list(text, "--multipliers")})
    seeds: list = setting(default_factory=lambda: [0], help="Comma list of seeds.", shown="0", text=str,
                          parse=lambda text: {"seeds": parse_list(text, "--seeds", int)})
    energy_weights: list | None = setting(
        None, "Comma list of λ (the search's --energy-weight), a grid axis.", shown="no λ axis: 0", text=str,
        parse=lambda text: {"energy_weights": parse_list(text, "--energy-weights", float)})
    stage: str = setting("both", "search, train (the --genotype), or both: search, train the genotype found, "
                         "evaluate.")
    genotype: dict | None = setting(None, "With --stage train: genotype file, string or DARTS_V2.", shown=False,
                                    text=str, parse=genotype_setting)
    output_dir: str = setting("runs/sweep", "Folder of the sweep: one run folder per trial, results.csv/json, "
                              "pareto.png.")
    preset: str = setting("quick", "quick or paper, for every run.", text=str)
    run_options: dict = field(default_factory=dict)  # PASSED_THROUGH settings the user gave
    cpus_per_trial: int | None = setting(None, "CPUs (and kernel threads) of each trial.",
                                         shown="all cores of this machine: one trial at a time")
    max_failures: int = setting(3, "Restarts of a failed trial from its last checkpoint.")
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
                raise UserError(f"{source}: setting {name!r} has the wrong type: {short_repr(value)}")
        return cls(**d)

    def trial_threads(self) -> int:
        return self.cpus_per_trial if self.cpus_per_trial is not None else available_cores()

    def grid(self) -> list[tuple[str, int, float | None]]:
        """Every trial's (arithmetic, seed, λ), in the order of the results table."""
        weights = self.energy_weights if self.energy_weights is not None else [None]
        return [(m, s, w) for m in self.multipliers for w in weights for s in self.seeds]

    def run_config(self, kind: str, value: str, seed: int, folder: Path, threads: int | None,
                   energy_weight: float | None = None):
        """The SearchConfig or TrainConfig of one trial's ``kind`` run."""
        cls = SearchConfig if kind == "search" else TrainConfig
        make = cls.paper if self.preset == "paper" else cls.quick
        candidates = value.split("+")
        options = dict(self.run_options, arithmetic=value, seed=seed, threads=threads,
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


def trial_name(value: str, seed: int, energy_weight: float | None = None) -> str:
    """The folder of one trial of grid ``value`` (one value of ``--multipliers``: an arithmetic spec, or
    specs joined with ``+``): ``mul8u_17KS-seed0``, ``exact+mul8u_2P7-seed1-lambda0.5``; a table path
    gives its file stem."""
    stems = [Path(m).stem if ("/" in m or "." in m) else m for m in value.split("+")]
    name = "+".join(re.sub(r"[^A-Za-z0-9_]+", "_", stem) for stem in stems) + f"-seed{seed}"
    return name if energy_weight is None else name + f"-lambda{energy_weight:g}"


# ----------------------------------------------------------------- one trial, without Ray
def run_trial(sweep: SweepConfig, value: str, seed: int, threads: int,
              on_epoch: Callable[[str, dict], None] | None = None, energy_weight: float | None = None) -> dict:
    """Run (or continue) the trial of grid ``value`` (as in :func:`trial_name`) and ``seed``: its search
    and/or training and evaluation; its results row (whose ``arithmetic`` column holds ``value``).

    Each run folder that already holds a checkpoint is resumed, so calling this
    again after the process died continues where the run's checkpoint stands.
    ``on_epoch(stage, event)`` is called after every epoch's checkpoint.
    """
    folder = Path(sweep.output_dir) / trial_name(value, seed, energy_weight)
    row = {"arithmetic": value, "seed": seed, "energy_weight": energy_weight, "stage": sweep.stage,
           "val_acc": None, "test_acc": None}
    mode = GENOTYPE if "+" in value else value  # how the trained network computes
    wall = 0.0
    genotype = Genotype.from_dict(sweep.genotype) if sweep.genotype is not None else None
    if sweep.stage in ("search", "both"):
        config = sweep.run_config("search", value, seed, folder / "search", threads, energy_weight)
        summary = _run_or_resume(run_search, config, threads, _stage_progress("search", on_epoch))
        row["val_acc"] = summary["val_acc"]
        wall += summary["elapsed_s"]
        genotype = read_genotype(folder / "search" / "genotype.json")
    if sweep.stage in ("train", "both"):
        config = sweep.run_config("train", value, seed, folder / "train", threads)
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


def _energy_columns(genotype, channels: int, layers: int, value: str) -> dict:
    """Energy per inference (FP32, exact 8-bit, this multiplier) and parameters of the trial's network."""
    columns = {"energy_pj": None, "energy_fp32_pj": None, "energy_exact8_pj": None, "energy_approx_pj": None,
               "parameters": None}
    spec = str(value).lower()
    try:
        report, params = network_energy(genotype, channels, layers, "exact" if is_fp32(spec)
                                        else value)
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


# ----------------------------------------------------------------- the trial as a Ray Tune trainable
def _trainable(params: dict) -> None:
    """Ray Tune function trainable: one trial of the grid, reporting each epoch with a Tune checkpoint.

    Its name is the trainable's name in Tune's saved state and trial folders (the driver passes it to Tune).
    """
    from ray import tune  # optional extra ".[sweep]": Ray is imported only when a sweep runs

    sweep = SweepConfig.from_dict(params["sweep"], source="the trial's sweep settings")
    value, seed, threads = trial_value(params), params["seed"], params["threads"]
    energy_weight = params.get("energy_weight")
    folder = Path(sweep.output_dir) / trial_name(value, seed, energy_weight)
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

    row = run_trial(sweep, value, seed, threads, on_epoch, energy_weight)
    tune.report({"stage": "done", "row_json": json.dumps(row), "resumed": resumed})
