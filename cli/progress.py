"""Progress of runs and evaluations: a live bar on a terminal, plain lines anywhere else.

On a terminal a rich bar shows the steps done, the time taken and the time
left, with the latest loss and accuracy on a line of its own below it, so that
neither is cut at 80 columns. A log file, a pipe, nohup or a cluster job cannot
show a live bar; there plain lines are printed instead (:class:`LineSchedule`:
one after the first step, then one whenever both 30 s and 2 % of the work have
passed since the last).
"""
from __future__ import annotations

import time
from datetime import timedelta

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from approxdarts_np_cli.launch import raise_pending
from approxdarts_np_cli.text import wrap_listing, wrap_parts

#: A plain progress line is due when both this many seconds and this share of the work have passed.
LINE_SECONDS = 30.0
LINE_FRACTION = 0.02


class LineSchedule:
    """When the next plain progress line is due.

    The first line comes after the first unit of work (a step, a batch), so that
    a log shows the run has started long before its first epoch ends; after that
    a line comes when both ``seconds`` and ``fraction`` of the total have passed
    since the last one, whichever is rarer.
    """

    def __init__(self, seconds: float = LINE_SECONDS, fraction: float = LINE_FRACTION, clock=time.monotonic):
        self.seconds, self.fraction, self.clock = seconds, fraction, clock
        self.first: tuple[float, int] | None = None  # (time, done) of the first line
        self.last: tuple[float, int] | None = None

    def due(self, done: int, total: int) -> bool:
        """True (and the line counted as printed) when a line for ``done`` of ``total`` units is due."""
        now = self.clock()
        if self.last is None:
            ok = done > 0
        else:
            since, done_then = self.last
            ok = now - since >= self.seconds and done - done_then >= self.fraction * total
        if ok:
            self.last = (now, done)
            self.first = self.first or self.last
        return ok

    def remaining(self, done: int, total: int) -> float | None:
        """Seconds left at the rate since the first line (which includes start-up and compiling), or None."""
        if self.first is None or done <= self.first[1]:
            return None
        since, done_then = self.first
        return (self.clock() - since) / (done - done_then) * (total - done)


def clock_time(seconds: float) -> str:
    """``0:09:12``: hours, minutes and seconds, as rich's bar shows them."""
    return str(timedelta(seconds=int(seconds)))


class _BarAndStatus(Progress):
    """A rich progress bar with each task's ``status`` field on its own line below the bar."""

    def get_renderables(self):
        yield self.make_tasks_table(self.tasks)
        for task in self.tasks:
            status = task.fields.get("status")
            if status:
                yield Text(f"  {status}", no_wrap=True, overflow="ellipsis")


def _run_bar(console: Console) -> Progress:
    return _BarAndStatus(TextColumn("[bold]{task.description}"), BarColumn(bar_width=None), MofNCompleteColumn(),
                         TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                         expand=True, transient=False)


class EpochProgress:
    """A run's progress: a bar over all its steps on a terminal (plain lines elsewhere), one line per epoch.

    Use as a context manager and pass the instance as the ``progress`` callback.
    ``header`` (e.g. ``search → runs/search``) is printed when the run starts,
    that is after its settings, data and folder have been checked.
    """

    def __init__(self, console: Console, what: str = "search", header: str | None = None):
        self.console = console
        self.what = what
        self.header = header
        self.bar = _run_bar(console) if console.is_terminal else None
        self.lines = LineSchedule()
        self.task = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()  # does nothing when the run never started
        return False

    def print(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False)

    def __call__(self, event: dict) -> None:
        kind = event["event"]
        if kind == "start":
            self._start(event)
        elif kind == "step":
            self._step(event)
        elif kind == "stopping":
            self.print("stopping after this step to save a checkpoint (Ctrl-C again abandons the step)")
        elif kind == "epoch":
            self._epoch(event)

    def _start(self, event: dict) -> None:
        raise_pending()  # a Ctrl-C during start-up that a compile callback swallowed
        self.steps_per_epoch = event["steps_per_epoch"]
        self.epochs = event["epochs"]
        self.total = event["epochs"] * event["steps_per_epoch"]
        done = event["epoch"] * event["steps_per_epoch"] + event["step"]
        if self.header:
            self.print(self.header)
        if done:
            self.print(f"resuming at epoch {event['epoch'] + 1}, step {event['step']}")
        if self.bar is not None:
            self.bar.start()
            self.task = self.bar.add_task(self.what, total=self.total, completed=done, status="")

    def _step(self, event: dict) -> None:
        done = event["epoch"] * self.steps_per_epoch + event["step"]
        where = f"epoch {event['epoch'] + 1}/{self.epochs} step {event['step']}/{self.steps_per_epoch}"
        figures = f"loss {event['train_loss']:.3f} acc {100 * event['train_acc']:.1f}%"
        if self.bar is not None:
            self.bar.update(self.task, completed=done, status=f"{where}  {figures}")
        elif self.lines.due(done, self.total):
            left = self.lines.remaining(done, self.total)
            parts = [f"{self.what} {done}/{self.total} steps ({100 * done / self.total:.0f}%)", where, figures,
                     f"{clock_time(event.get('elapsed', 0))} elapsed"]
            if left is not None:
                parts.append(f"ETA {clock_time(left)}")
            for line in wrap_parts(parts, self.console.width):
                self.print(line)

    def _epoch(self, event: dict) -> None:
        parts = [f"epoch {event['epoch']}/{self.epochs}"]
        for split in ("train", "val", "test"):
            if f"{split}_loss" in event:
                parts.append(f"{split} loss {event[f'{split}_loss']:.4f} acc {100 * event[f'{split}_acc']:.2f}%")
        parts.append(f"{event.get('elapsed_s', 0):.0f} s")
        for line in wrap_parts(parts, self.console.width):
            self.print(line)
        if "genotype" in event:
            for line in wrap_listing(event["genotype"], self.console.width, first="  genotype: ", indent="    "):
                self.print(line)


class EvaluationProgress:
    """Progress of ``evaluate``: a transient bar per multiplier on a terminal, plain lines elsewhere.

    Pass the instance as the ``progress`` callback of
    :func:`~approxdarts_np.runs.report.evaluate_checkpoint`.
    """

    def __init__(self, console: Console):
        self.console = console
        self.bar = Progress(console=console, transient=True) if console.is_terminal else None
        self.task = None
        self.lines = LineSchedule()
        self.started = time.monotonic()
        self.name, self.index, self.count = "", 0, 1

    def __enter__(self):
        if self.bar is not None:
            self.bar.start()
            self.task = self.bar.add_task("evaluate", total=None)
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False

    def __call__(self, event: dict) -> None:
        if event["event"] == "arithmetic":
            self.name, self.index, self.count = event["name"], event["index"], event["total"]
            if self.bar is not None:
                self.bar.update(self.task, description=f"{self.name} ({self.index + 1}/{self.count})",
                                completed=0, total=None)
        elif self.bar is not None:
            self.bar.update(self.task, completed=event["done"], total=event["total"])
        else:
            self._line(event["done"], event["total"])

    def _line(self, done: int, batches: int) -> None:
        """A plain line when due; the work is every batch of every multiplier."""
        total = self.count * batches
        overall = self.index * batches + done
        if not self.lines.due(overall, total):
            return
        parts = [f"evaluate {self.name} ({self.index + 1}/{self.count})", f"batch {done}/{batches}",
                 f"{100 * overall / total:.0f}% of all", f"{clock_time(time.monotonic() - self.started)} elapsed"]
        left = self.lines.remaining(overall, total)
        if left is not None:
            parts.append(f"ETA {clock_time(left)}")
        for line in wrap_parts(parts, self.console.width):
            self.console.print(line, highlight=False, markup=False)
