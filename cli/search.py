"""`approxdarts-np search`: parse options, build a SearchConfig, run the search, render progress."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from approxdarts_np.runs.search import SearchConfig, run_search
from approxdarts_np_cli._common import user_errors
from approxdarts_np_cli.progress import EpochProgress


class Preset(str, Enum):
    quick = "quick"
    paper = "paper"


@user_errors
def search(
    data_dir: Optional[Path] = typer.Option(None, help="CIFAR-10 folder (python batches); default: the bundled sample."),
    output_dir: Path = typer.Option(Path("runs/search"), help="Folder for config, metrics, α, genotype, checkpoint."),
    preset: Preset = typer.Option(Preset.quick, help="quick: minutes on a CPU; paper: DARTS's settings."),
    epochs: Optional[int] = typer.Option(None, help="Search epochs [quick 4, paper 50]."),
    channels: Optional[int] = typer.Option(None, help="Initial channels C [quick 8, paper 16]."),
    layers: Optional[int] = typer.Option(None, help="Cells [quick 5, paper 8]."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size [quick 32, paper 64]."),
    max_train_images: Optional[int] = typer.Option(
        None, help="Use only the first N training images, 0 = all [quick 2560, paper all]."),
    seed: int = typer.Option(0, help="Seed of weights, α, data order and augmentation."),
    multiplier: str = typer.Option(
        "none", help="none (FP32), exact (8-bit), a bundled table (e.g. mul8u_2P7) or a .bin/.npy path."),
    threads: Optional[int] = typer.Option(None, help="Threads for kernels and BLAS [all cores]."),
    lr: Optional[float] = typer.Option(None, help="Weight learning rate, cosine-annealed [0.025]."),
    lr_min: Optional[float] = typer.Option(None, help="Final weight learning rate [0.001]."),
    momentum: Optional[float] = typer.Option(None, help="SGD momentum [0.9]."),
    weight_decay: Optional[float] = typer.Option(None, help="Weight decay of w [3e-4]."),
    grad_clip: Optional[float] = typer.Option(None, help="Gradient-norm clip of w [5]."),
    arch_lr: Optional[float] = typer.Option(None, help="Adam learning rate of α [3e-4]."),
    arch_weight_decay: Optional[float] = typer.Option(None, help="Weight decay of α [1e-3]."),
    resume: Optional[Path] = typer.Option(None, help="Resume the search saved in this output folder."),
) -> None:
    """Search a cell with first-order DARTS, the searched convolutions using the chosen multiplier."""
    overrides = {k: v for k, v in dict(
        epochs=epochs, channels=channels, layers=layers, batch_size=batch_size, lr=lr, lr_min=lr_min,
        momentum=momentum, weight_decay=weight_decay, grad_clip=grad_clip, arch_lr=arch_lr,
        arch_weight_decay=arch_weight_decay, threads=threads).items() if v is not None}
    if max_train_images is not None:
        overrides["max_train_images"] = max_train_images or None
    base = dict(data_dir=str(data_dir) if data_dir else None, output_dir=str(output_dir), seed=seed,
                multiplier=multiplier)
    make = SearchConfig.paper if preset is Preset.paper else SearchConfig.quick
    config = make(**base, **overrides)
    console = Console()
    console.print(f"search → {resume or output_dir}", highlight=False)
    try:
        with EpochProgress(console, "search") as progress:
            summary = run_search(config, resume=resume, progress=progress)
    except KeyboardInterrupt:
        where = resume or output_dir
        console.print(f"interrupted; checkpoint saved. Continue with: approxdarts-np search --resume {where}",
                      highlight=False)
        raise typer.Exit(code=130) from None
    acc = summary["val_acc"]
    console.print(f"done: {summary['epochs']} epochs in {summary['elapsed_s']:.0f} s, "
                  f"val accuracy {100 * acc:.2f}%" if acc is not None else "done", highlight=False)
    console.print(f"genotype: {summary['genotype_string']}", markup=False, soft_wrap=True)
