"""The one run loop: start or resume, steps, epoch ends, metrics, checkpoints, interrupts and divergence.

A search and a training run differ only in their *task* (:class:`RunTask`):
what one step does, what an epoch end measures, which state a checkpoint
holds and which result files it writes. Everything else is here, once:

- A fresh run writes ``config.json``, a checkpoint of its initial state and
  an empty ``metrics.jsonl`` before the first step, so a run folder always
  holds a run that ``--resume`` can continue.
- SIGINT (Ctrl-C) and SIGTERM only set a flag (:class:`StopSignals`); the
  loop looks at it between steps, saves a checkpoint of the state it has
  reached (every step either fully in it or not at all) and raises
  :class:`RunInterrupted`. A second Ctrl-C while the step finishes abandons
  it (the last checkpoint stays valid).
- The checkpoint is written before ``metrics.jsonl`` and the task's result
  files, so metrics are never ahead of the checkpoint; on resume they are
  rewritten from the checkpoint.
- A non-finite loss stops the run with :class:`DivergedError`, naming the
  checkpoint that is kept.
- A resume refuses a checkpoint that holds NaN or infinity, or whose saved
  settings differ from ``config.json`` in anything but the settings a resume
  may change (the file checksums of :mod:`approxdarts_np.io.checkpoint`
  catch edits inside the checkpoint itself).
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numba
import numpy as np

from approxdarts_np.errors import DivergedError, UserError
from approxdarts_np.io.checkpoint import load_tree, save_tree, write_json, write_text
from approxdarts_np.io.rundir import CHECKPOINT, CONFIG, METRICS, RunClock, RunFolder
from approxdarts_np.runs.config import RESUME_OVERRIDES
from approxdarts_np.runs.first_run import compile_split

ProgressCallback = Callable[[dict], None]


class RunInterrupted(Exception):
    """The run stopped on a signal after saving a checkpoint at a step boundary."""

    def __init__(self, folder: Path, epoch: int, step: int, signum: int):
        self.folder, self.epoch, self.step, self.signum = folder, epoch, step, signum
        super().__init__(f"interrupted at epoch {epoch + 1}, step {step}; checkpoint saved in {folder}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """Context manager: while active, SIGINT and SIGTERM request a stop instead of raising.

    Only the main thread can own signal handlers; elsewhere (e.g. a worker
    thread of a sweep) this does nothing and the caller stops runs its own way.
    After the first request the previous handlers are back, so a second
    Ctrl-C interrupts at once.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, on_request: Callable[[int], None] | None = None):
        self.on_request = on_request
        self.signum: int | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        self._restore()
        if self.on_request is not None:
            self.on_request(signum)

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()


@dataclass
class LoopState:
    """Where a run stands: the epoch in progress, steps done in it, their sums, finished epochs' metrics."""

    epoch: int = 0
    step: int = 0
    sums: dict = field(default_factory=dict)
    metrics: list = field(default_factory=list)


@dataclass
class StepResult:
    """What one step reports: losses (checked for divergence), sums to accumulate, fields for progress."""

    losses: dict
    sums: dict
    shown: dict = field(default_factory=dict)


class RunTask(Protocol):
    """What a search or a training supplies to the loop."""

    kind: str  # "search" or "train": names the checkpoint format
    config: object  # a RunConfig (to_dict, epochs)
    steps_per_epoch: int

    def parameter_count(self) -> int: ...
    def begin_epoch(self, epoch: int) -> dict: ...
    def step(self, epoch: int, step: int) -> StepResult: ...
    def end_epoch(self, epoch: int, sums: dict, begun: dict) -> dict: ...
    def state_tree(self) -> dict: ...
    def load_state_tree(self, tree: dict) -> None: ...
    def write_results(self, folder: Path) -> None: ...
    def summary(self, metrics: list) -> dict: ...


def checkpoint_format(kind: str) -> str:
    return f"approxdarts-np {kind} checkpoint v1"


KINDS = ("search", "train")


def read_run_checkpoint(path: Path, kind: str, needed_by: str | None = None) -> dict:
    """The tree of a ``kind`` checkpoint; UserError when the file is missing, damaged or of another kind.

    ``needed_by`` names what wants the checkpoint in the message about one of
    another kind (e.g. "evaluate"; default: "this").
    """
    tree = load_tree(path)
    found = tree.get("format")
    if found != checkpoint_format(kind):
        other = next((k for k in KINDS if found == checkpoint_format(k)), None)
        if other is not None:
            raise UserError(f"{path} is a {other} checkpoint; {needed_by or 'this'} needs a {kind} checkpoint")
        if isinstance(found, str) and found.startswith(f"approxdarts-np {kind} checkpoint "):
            raise UserError(f"{path} is an {found}; this version reads {checkpoint_format(kind)}")
        raise UserError(f"{path} is not a {kind} checkpoint of approxdarts-np")
    for key in ("config", "position", "sums", "metrics", "model"):
        if key not in tree:
            raise UserError(f"{path} is damaged: no {key!r} entry")
    bad = _non_finite_entry(tree)
    if bad is not None:
        raise UserError(f"{path} holds non-finite values in {bad}; a run never saves those, so the file "
                        f"was damaged or edited and is not used")
    return tree


def _non_finite_entry(tree, name: str = "") -> str | None:
    """The name of the first float array (weights, optimiser state, α) holding NaN or infinity, else None."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list):
        items = ((str(i), v) for i, v in enumerate(tree))
    else:
        if isinstance(tree, np.ndarray) and tree.dtype.kind in "fc" and not np.isfinite(tree).all():
            return name
        if isinstance(tree, float) and not math.isfinite(tree):
            return name
        return None
    for key, value in items:
        found = _non_finite_entry(value, f"{name}/{key}" if name else str(key))
        if found is not None:
            return found
    return None


def check_config_matches(tree: dict, config, path: Path, config_path: Path) -> None:
    """UserError when the settings ``config`` (from config.json, with the allowed overrides) differ from those
    the checkpoint was written with, other than the ones a resume may change."""
    try:
        saved = json.loads(tree["config"])
    except (TypeError, ValueError):
        raise UserError(f"{path} is damaged: its 'config' entry is not a run's settings") from None
    if not isinstance(saved, dict):
        raise UserError(f"{path} is damaged: its 'config' entry is not a run's settings")
    current = config.to_dict()
    may_differ = set(RESUME_OVERRIDES) | {"output_dir"}  # the folder may have been moved
    differ = [k for k in saved if k not in may_differ and k in current and saved[k] != current[k]]
    if differ:
        shown = ", ".join(f"{k} is {current[k]!r} there but {saved[k]!r} in the checkpoint" for k in differ[:4])
        more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
        raise UserError(f"{config_path} does not match {path}: {shown}{more}; restore {config_path.name} "
                        f"or start a new run")


class RunLoop:
    """Runs a task in a folder from start or from its checkpoint to the configured number of epochs."""

    def __init__(self, task: RunTask, folder: str | Path, progress: ProgressCallback | None = None,
                 split=None):
        self.task = task
        # the compile split the run entered before it built the task (first_run.compile_split),
        # or None: the loop enters its own
        self.split = split
        self.folder = Path(folder)
        self.progress = progress or (lambda event: None)
        self.state = LoopState()
        self.clock = RunClock()
        self.saved_at: tuple[int, int] | None = None  # position of the newest checkpoint on disk

    # ------------------------------------------------------------- entry points
    def start(self, resolved: dict) -> dict:
        """A fresh run: config.json and an initial checkpoint, then the epochs."""
        with RunFolder(self.folder, fresh=True):
            try:
                write_json(self.folder / CONFIG, self.task.config.to_dict() | {"resolved": resolved})
                self._save_checkpoint()
                self._write_epoch_files()
            except BaseException:
                # Nothing resumable was written: leave no half-made run behind.
                for name in (CONFIG, CHECKPOINT, METRICS):
                    (self.folder / name).unlink(missing_ok=True)
                raise
            return self._run()

    def resume(self, resolved: dict | None = None) -> dict:
        """Continue from the folder's checkpoint; the files are first brought in line with it."""
        with RunFolder(self.folder, fresh=False):
            tree = read_run_checkpoint(self.folder / CHECKPOINT, self.task.kind,
                                       needed_by=f"{self.task.kind} --resume")
            check_config_matches(tree, self.task.config, self.folder / CHECKPOINT, self.folder / CONFIG)
            self._load(tree)
            if self.state.epoch > self.task.config.epochs or (
                    self.state.epoch == self.task.config.epochs and self.state.step > 0):
                raise UserError(f"--epochs {self.task.config.epochs} is fewer than the "
                                f"{self.state.epoch} epochs this run has done")
            if resolved is not None:
                write_json(self.folder / CONFIG, self.task.config.to_dict() | {"resolved": resolved})
            self._write_epoch_files()
            return self._run()

    # ------------------------------------------------------------- the loop
    def _run(self) -> dict:
        task, st = self.task, self.state
        epochs = task.config.epochs
        self.progress({"event": "start", "epochs": epochs, "steps_per_epoch": task.steps_per_epoch,
                       "epoch": st.epoch, "step": st.step, "parameters": task.parameter_count()})
        with StopSignals(on_request=lambda signum: self.progress({"event": "stopping", "signal": signum})) as stop, \
                (contextlib.nullcontext(self.split) if self.split is not None
                 else compile_split(task.kind, task.config, numba.get_num_threads())) as split:
            while st.epoch < epochs:
                begun = task.begin_epoch(st.epoch)
                while st.step < task.steps_per_epoch:
                    self._stop_if_requested(stop)
                    split.poll()
                    result = task.step(st.epoch, st.step)
                    bad = {k: v for k, v in result.losses.items() if not math.isfinite(v)}
                    if bad:
                        self._diverged(bad)
                    for key, value in result.sums.items():
                        st.sums[key] = st.sums.get(key, 0) + value
                    st.step += 1
                    self.progress({"event": "step", "epoch": st.epoch, "step": st.step,
                                   "steps_per_epoch": task.steps_per_epoch, **begun, **result.shown,
                                   "elapsed": self.clock.seconds()})
                record = {"epoch": st.epoch + 1, **begun, **task.end_epoch(st.epoch, st.sums, begun),
                          "elapsed_s": self.clock.seconds()}
                st.metrics.append(record)
                st.epoch, st.step, st.sums = st.epoch + 1, 0, {}
                self._save_checkpoint()
                self._write_epoch_files()
                self.progress({"event": "epoch", **record})
                self._stop_if_requested(stop)
            # still under StopSignals: a Ctrl-C while the summary is made (the genotype, a budget's
            # allocation) is a stop at the last checkpoint, not a traceback
            summary = task.summary(st.metrics) | {"epochs": st.epoch, "elapsed_s": self.clock.seconds(),
                                                  "output_dir": str(self.folder)}
            self._stop_if_requested(stop)
        return summary

    def _stop_if_requested(self, stop: StopSignals) -> None:
        if not stop.requested:
            return
        st = self.state
        if self.saved_at != (st.epoch, st.step):
            self._save_checkpoint()
        raise RunInterrupted(self.folder, st.epoch, st.step, stop.signum)

    def _diverged(self, bad: dict) -> None:
        st = self.state
        what = ", ".join(f"{k} {v}" for k, v in bad.items())
        epoch, step = self.saved_at
        where = "its start" if (epoch, step) == (0, 0) else (
            f"the end of epoch {epoch}" if step == 0 else f"epoch {epoch + 1}, step {step}")
        raise DivergedError(f"the loss diverged ({what}) at epoch {st.epoch + 1}, step {st.step + 1}; the run "
                            f"stopped and its checkpoint from {where} is kept in {self.folder}")

    # ------------------------------------------------------------- files
    def _save_checkpoint(self) -> None:
        st = self.state
        save_tree(self.folder / CHECKPOINT, {
            "format": checkpoint_format(self.task.kind),
            "config": json.dumps(self.task.config.to_dict()),
            "position": {"epoch": st.epoch, "step": st.step, "elapsed": self.clock.seconds()},
            "sums": dict(st.sums),
            "metrics": json.dumps(st.metrics),
            **self.task.state_tree(),
        })
        self.saved_at = (st.epoch, st.step)

    def _write_epoch_files(self) -> None:
        write_text(self.folder / METRICS, _metrics_text(self.state.metrics))
        if self.state.metrics:
            self.task.write_results(self.folder)

    def _load(self, tree: dict) -> None:
        path = self.folder / CHECKPOINT
        try:
            pos = tree["position"]
            self.state = LoopState(epoch=int(pos["epoch"]), step=int(pos["step"]), sums=dict(tree["sums"]),
                                   metrics=json.loads(tree["metrics"]))
            self.clock = RunClock(float(pos["elapsed"]))
            self.task.load_state_tree(tree)
        except UserError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path} is damaged or does not match this run's settings: {exc}") from None
        if not 0 <= self.state.step <= self.task.steps_per_epoch or len(self.state.metrics) != self.state.epoch:
            raise UserError(f"{path} does not match this run's settings (position epoch {self.state.epoch}, "
                            f"step {self.state.step} of {self.task.steps_per_epoch})")
        self.saved_at = (self.state.epoch, self.state.step)


def _metrics_text(metrics: list) -> str:
    return "".join(json.dumps(m) + "\n" for m in metrics)
