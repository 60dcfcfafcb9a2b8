"""Rendering of the library's progress events with rich."""
from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from approxdarts_np_cli.launch import raise_pending


class EpochProgress:
    """A progress bar over all steps of a run, with the latest loss/accuracy; one line per finished epoch.

    Use as a context manager and pass the instance as the ``progress`` callback.
    """

    def __init__(self, console: Console, what: str = "search"):
        self.console = console
        self.what = what
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TextColumn("ETA"),
                            TimeRemainingColumn(), console=console, transient=False)
        self.task = None

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def __call__(self, event: dict) -> None:
        kind = event["event"]
        if kind == "start":
            raise_pending()  # a Ctrl-C during start-up that a compile callback swallowed
            total = event["epochs"] * event["steps_per_epoch"]
            done = event["epoch"] * event["steps_per_epoch"] + event["step"]
            self.steps_per_epoch = event["steps_per_epoch"]
            self.epochs = event["epochs"]
            self.task = self.bar.add_task(self.what, total=total, completed=done, status="")
            if done:
                self.console.print(f"resuming at epoch {event['epoch'] + 1}, step {event['step']}")
        elif kind == "step":
            done = event["epoch"] * self.steps_per_epoch + event["step"]
            status = (f"epoch {event['epoch'] + 1}/{self.epochs} step {event['step']}/{self.steps_per_epoch} "
                      f"loss {event['train_loss']:.3f} acc {100 * event['train_acc']:.1f}%")
            self.bar.update(self.task, completed=done, status=status)
        elif kind == "stopping":
            self.bar.console.print("stopping after the current step to save a checkpoint "
                                   "(Ctrl-C again abandons the step)", highlight=False)
        elif kind == "epoch":
            parts = [f"epoch {event['epoch']}/{self.epochs}"]
            for key, label in (("train_loss", "train loss"), ("train_acc", "train acc"),
                               ("val_loss", "val loss"), ("val_acc", "val acc"),
                               ("test_loss", "test loss"), ("test_acc", "test acc")):
                if key in event:
                    value = event[key]
                    parts.append(f"{label} {100 * value:.2f}%" if key.endswith("acc") else f"{label} {value:.4f}")
            parts.append(f"{event.get('elapsed_s', 0):.0f} s")
            self.bar.console.print("  ".join(parts))
            if "genotype" in event:
                self.bar.console.print(f"  genotype: {event['genotype']}", markup=False, soft_wrap=True)
