"""`approxdarts-np train`: parse options, build a TrainConfig, train the network of a genotype, render progress."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from approxdarts_np.errors import UserError
from approxdarts_np.runs.train import TrainConfig, run_train
from approxdarts_np_cli._common import user_errors
from approxdarts_np_cli.options import config_command, run_with_progress, start_run
from approxdarts_np_cli.text import plural

@user_errors
@config_command(TrainConfig, first=("genotype",))
def train(
    options: dict,
    resume: Optional[Path] = typer.Option(None, help=(
        "Continue the training saved in this folder. Only --epochs (to extend it) and --threads may be "
        "given with it; other settings are the saved ones.")),
) -> None:
    """Train the network of a genotype (optionally through a multiplier) and evaluate it each epoch."""
    if "genotype" not in options and resume is None:
        raise UserError("give the network to train with --genotype (a genotype.json, a .txt with the DARTS "
                        "string, or DARTS_V2), or --resume a training folder")
    console = Console()
    folder, run = start_run(TrainConfig, run_train, options, resume)
    summary = run_with_progress(console, "train", folder, run)
    acc = summary["test_acc"]
    console.print(f"done: {plural(summary['epochs'], 'epoch')} in {summary['elapsed_s']:.0f} s"
                  + (f", test accuracy {100 * acc:.2f}%" if acc is not None else ""), highlight=False)
    console.print(f"checkpoint: {summary['checkpoint']}", highlight=False, markup=False)
