"""`approxdarts-np train`: parse options, build a TrainConfig, train the network of a genotype, render progress."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from approxdarts_np.errors import UserError
from approxdarts_np.nas.genotypes import read_genotype
from approxdarts_np.runs.train import TrainConfig, run_train
from approxdarts_np_cli._common import Preset, default_help, given, run_with_interrupts, user_errors
from approxdarts_np_cli.progress import EpochProgress
from approxdarts_np_cli.text import plural

Q, P = TrainConfig.quick(), TrainConfig.paper()


@user_errors
def train(
    genotype: Optional[str] = typer.Option(None, help="genotype.json, a .txt with the DARTS string, or DARTS_V2 "
                                                      "(required unless --resume)."),
    data_dir: Optional[Path] = typer.Option(None, help="CIFAR-10 folder; default: the bundled sample."),
    output_dir: Optional[Path] = typer.Option(None, help=default_help(
        "Folder for config, metrics and checkpoint.", Q.output_dir)),
    preset: Optional[Preset] = typer.Option(None, help=default_help(
        "quick: minutes on a CPU; paper: DARTS's settings.", "quick")),
    epochs: Optional[int] = typer.Option(None, help=default_help("Epochs.", Q.epochs, P.epochs)),
    channels: Optional[int] = typer.Option(None, help=default_help("Initial channels.", Q.channels, P.channels)),
    layers: Optional[int] = typer.Option(None, help=default_help("Cells.", Q.layers, P.layers)),
    batch_size: Optional[int] = typer.Option(None, help=default_help("Batch size.", Q.batch_size, P.batch_size)),
    max_train_images: Optional[int] = typer.Option(None, help=default_help(
        "Use only the first N training images, 0 = all.", Q.max_train_images, P.max_train_images)),
    seed: Optional[int] = typer.Option(None, help=default_help(
        "Seed of weights, data order, augmentation and drop-path.", Q.seed)),
    arithmetic: Optional[str] = typer.Option(None, "--arithmetic", "--multiplier", help=default_help(
        "Arithmetic of the searched convs: genotype (the multiplier the genotype names for each op, FP32 where "
        "none), none, exact, a bundled table or a .bin/.npy path (quantisation-aware training).", Q.arithmetic)),
    threads: Optional[int] = typer.Option(None, help=default_help("Threads of the kernels.", "all cores")),
    lr: Optional[float] = typer.Option(None, help=default_help("Learning rate, cosine-annealed.", Q.lr)),
    lr_min: Optional[float] = typer.Option(None, help=default_help("Final learning rate.", Q.lr_min)),
    momentum: Optional[float] = typer.Option(None, help=default_help("SGD momentum.", Q.momentum)),
    weight_decay: Optional[float] = typer.Option(None, help=default_help("Weight decay.", Q.weight_decay)),
    grad_clip: Optional[float] = typer.Option(None, help=default_help("Gradient-norm clip.", Q.grad_clip)),
    auxiliary_weight: Optional[float] = typer.Option(None, help=default_help(
        "Auxiliary loss weight, 0 = no head.", Q.auxiliary_weight)),
    drop_path: Optional[float] = typer.Option(None, help=default_help("Final drop-path probability.", Q.drop_path)),
    cutout: Optional[int] = typer.Option(None, help=default_help("Cutout length, 0 = off.", Q.cutout)),
    resume: Optional[Path] = typer.Option(None, help=(
        "Continue the training saved in this folder. Only --epochs (to extend it) and --threads may be "
        "given with it; other settings are the saved ones.")),
) -> None:
    """Train the network of a genotype (optionally through a multiplier) and evaluate it each epoch."""
    if genotype is None and resume is None:
        raise UserError("give the network to train with --genotype (a genotype.json, a .txt with the DARTS "
                        "string, or DARTS_V2), or --resume a training folder")
    options = given(
        epochs=epochs, channels=channels, layers=layers, batch_size=batch_size, lr=lr, lr_min=lr_min,
        momentum=momentum, weight_decay=weight_decay, grad_clip=grad_clip, threads=threads,
        auxiliary_weight=auxiliary_weight, drop_path=drop_path, cutout=cutout, seed=seed, arithmetic=arithmetic,
        data_dir=str(data_dir) if data_dir else None, output_dir=str(output_dir) if output_dir else None,
        preset=preset.value if preset else None,
        genotype=read_genotype(genotype).to_dict() if genotype is not None else None)
    if max_train_images is not None:
        options["max_train_images"] = max_train_images or None
    console = Console()
    if resume is not None:
        folder = resume
        if output_dir == resume:
            options.pop("output_dir")
        run = functools.partial(run_train, resume=resume, overrides=options)
    else:
        options.pop("preset", None)
        make = TrainConfig.paper if preset is Preset.paper else TrainConfig.quick
        config = make(**options)
        folder = Path(config.output_dir)
        run = functools.partial(run_train, config)
    with EpochProgress(console, "train", header=f"train → {folder}") as progress:
        summary = run_with_interrupts(functools.partial(run, progress=progress), console,
                                      f"approxdarts-np train --resume {folder}", folder)
    acc = summary["test_acc"]
    console.print(f"done: {plural(summary['epochs'], 'epoch')} in {summary['elapsed_s']:.0f} s"
                  + (f", test accuracy {100 * acc:.2f}%" if acc is not None else ""), highlight=False)
    console.print(f"checkpoint: {summary['checkpoint']}", highlight=False, markup=False)
