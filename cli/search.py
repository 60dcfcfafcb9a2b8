"""`approxdarts-np search`: parse options, build a SearchConfig, run the search, render progress."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from approxdarts_np.errors import UserError
from approxdarts_np.runs.search import SearchConfig, run_search
from approxdarts_np_cli._common import Preset, default_help, given, run_with_interrupts, user_errors
from approxdarts_np_cli.progress import EpochProgress
from approxdarts_np_cli.text import plural, wrap_listing

Q, P = SearchConfig.quick(), SearchConfig.paper()


def parse_temperature(text: str | None) -> dict:
    """``--gumbel-temperature T`` or ``START:END`` as config fields (UserError for anything else)."""
    if text is None:
        return {}
    parts = text.split(":")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2):
        raise UserError(f"--gumbel-temperature must be a number T or START:END, got {text!r}")
    return {"gumbel_temperature": values[0], "gumbel_temperature_end": values[-1] if len(values) == 2 else None}


@user_errors
def search(
    data_dir: Optional[Path] = typer.Option(None, help="CIFAR-10 folder (python batches); default: the bundled sample."),
    output_dir: Optional[Path] = typer.Option(None, help=default_help(
        "Folder for config, metrics, α, genotype, checkpoint.", Q.output_dir)),
    preset: Optional[Preset] = typer.Option(None, help=default_help(
        "quick: minutes on a CPU; paper: DARTS's settings.", "quick")),
    epochs: Optional[int] = typer.Option(None, help=default_help("Search epochs.", Q.epochs, P.epochs)),
    channels: Optional[int] = typer.Option(None, help=default_help("Initial channels C.", Q.channels, P.channels)),
    layers: Optional[int] = typer.Option(None, help=default_help("Cells.", Q.layers, P.layers)),
    batch_size: Optional[int] = typer.Option(None, help=default_help("Batch size.", Q.batch_size, P.batch_size)),
    max_train_images: Optional[int] = typer.Option(None, help=default_help(
        "Use only the first N training images, 0 = all.", Q.max_train_images, P.max_train_images)),
    seed: Optional[int] = typer.Option(None, help=default_help(
        "Seed of weights, α, data order and augmentation.", Q.seed)),
    arithmetic: Optional[str] = typer.Option(None, "--arithmetic", "--multiplier", help=default_help(
        "Arithmetic of the searched convolutions: none (FP32), exact (8-bit) or an approximate multiplier "
        "(a bundled table, e.g. mul8u_2P7, or a .bin/.npy path).", Q.arithmetic)),
    threads: Optional[int] = typer.Option(None, help=default_help("Threads of the kernels.", "all cores")),
    lr: Optional[float] = typer.Option(None, help=default_help("Weight learning rate, cosine-annealed.", Q.lr)),
    lr_min: Optional[float] = typer.Option(None, help=default_help("Final weight learning rate.", Q.lr_min)),
    momentum: Optional[float] = typer.Option(None, help=default_help("SGD momentum.", Q.momentum)),
    weight_decay: Optional[float] = typer.Option(None, help=default_help("Weight decay of w.", Q.weight_decay)),
    grad_clip: Optional[float] = typer.Option(None, help=default_help("Gradient-norm clip of w.", Q.grad_clip)),
    arch_lr: Optional[float] = typer.Option(None, help=default_help("Adam learning rate of α.", Q.arch_lr)),
    arch_weight_decay: Optional[float] = typer.Option(None, help=default_help(
        "Weight decay of α.", Q.arch_weight_decay)),
    multipliers: Optional[str] = typer.Option(None, help=(
        "Candidate multipliers, comma-separated (e.g. exact,mul8u_2P7,mul8u_17KS): the search also chooses "
        "the multiplier of every searched op (β, straight-through Gumbel).")),
    energy_weight: Optional[float] = typer.Option(None, help=default_help(
        "λ of the energy term λ·E/E_ref in the architecture loss.", Q.energy_weight)),
    energy_target: Optional[float] = typer.Option(None, help=(
        "Expected energy per image (pJ) above which the energy term acts (instead of everywhere).")),
    energy_budget: Optional[float] = typer.Option(None, help=(
        "r in (0, 1]: the searched convolutions may spend at most r times their exact-8-bit multiplication "
        "energy on the 20-cell, 36-channel network. λ is found by dual ascent; the genotype's multipliers "
        "are then allocated within the budget (--allocation). Needs --multipliers.")),
    budget_step: Optional[float] = typer.Option(None, help=default_help(
        "η of the dual ascent λ ← max(0, λ + η·(ratio − r)), per architecture step (ratio: the genotype's "
        "now).", Q.budget_step)),
    energy_scope: Optional[str] = typer.Option(None, help=default_help(
        "What the energy term moves: beta (the multipliers only) or all (the ops too; it then deletes "
        "convolutions).", Q.energy_scope)),
    allocation: Optional[str] = typer.Option(None, help=default_help(
        "How a budget's multipliers are chosen: sensitivity (after the last epoch, each kept op's loss "
        "increase with each candidate is measured and a greedy knapsack fills the budget) or beta (argmax β, "
        "projected into the budget).", Q.allocation)),
    sensitivity_images: Optional[int] = typer.Option(None, help=default_help(
        "Architecture-val images the sensitivities are measured on.", Q.sensitivity_images)),
    max_parameter_free: Optional[int] = typer.Option(None, help=default_help(
        "At most N pools/skips per cell in the genotype; the weakest beyond N become the edge's best conv.",
        Q.max_parameter_free)),
    warmup_epochs: Optional[int] = typer.Option(None, help=default_help(
        "First epochs train the weights only (α and β frozen; multipliers still drawn).",
        "a quarter of --epochs with --multipliers, else 0")),
    beta_lr: Optional[float] = typer.Option(None, help=default_help("Adam learning rate of β.", Q.beta_lr)),
    gumbel_temperature: Optional[str] = typer.Option(None, help=default_help(
        "τ of the Gumbel-softmax over β: T, or START:END (geometric from the first to the last epoch).",
        Q.gumbel_temperature)),
    order: Optional[int] = typer.Option(None, help=default_help(
        "Architecture gradient: 1 = first order, 2 = DARTS's unrolled second order (about 2-3x a step).",
        Q.order)),
    unrolled_lr: Optional[float] = typer.Option(None, help=default_help(
        "ξ of the virtual step with --order 2.", "the current weight learning rate")),
    workers: Optional[int] = typer.Option(None, help=default_help(
        "Split every step over N Ray workers by image (each with --threads threads; pip install -e "
        "\".[sweep]\").", Q.workers)),
    address: Optional[str] = typer.Option(None, help=(
        "With --workers: the Ray cluster to run them on (HOST:PORT or auto); default: a local Ray.")),
    resume: Optional[Path] = typer.Option(None, help=(
        "Continue the search saved in this folder. Only --epochs (to extend it), --threads and --workers may be given "
        "with it; other settings are the saved ones.")),
) -> None:
    """Search a cell with DARTS (first or second order), the searched convolutions using the chosen multiplier."""
    options = given(
        epochs=epochs, channels=channels, layers=layers, batch_size=batch_size, lr=lr, lr_min=lr_min,
        momentum=momentum, weight_decay=weight_decay, grad_clip=grad_clip, arch_lr=arch_lr,
        arch_weight_decay=arch_weight_decay, threads=threads, workers=workers, order=order, unrolled_lr=unrolled_lr, seed=seed,
        multipliers=multipliers, energy_weight=energy_weight, energy_target=energy_target,
        energy_budget=energy_budget, budget_step=budget_step, energy_scope=energy_scope,
        max_parameter_free=max_parameter_free, warmup_epochs=warmup_epochs, beta_lr=beta_lr,
        allocation=allocation, sensitivity_images=sensitivity_images,
        **parse_temperature(gumbel_temperature),
        arithmetic=arithmetic,
        data_dir=str(data_dir) if data_dir else None, output_dir=str(output_dir) if output_dir else None,
        preset=preset.value if preset else None)
    if max_train_images is not None:
        options["max_train_images"] = max_train_images or None
    console = Console()
    if resume is not None:
        folder = resume
        if output_dir == resume:
            options.pop("output_dir")
        run = functools.partial(run_search, resume=resume, overrides=options, address=address)
    else:
        options.pop("preset", None)
        make = SearchConfig.paper if preset is Preset.paper else SearchConfig.quick
        config = make(**options)
        folder = Path(config.output_dir)
        run = functools.partial(run_search, config, address=address)
    with EpochProgress(console, "search", header=f"search → {folder}") as progress:
        summary = run_with_interrupts(functools.partial(run, progress=progress), console,
                                      f"approxdarts-np search --resume {folder}", folder)
    acc = summary["val_acc"]
    console.print(f"done: {plural(summary['epochs'], 'epoch')} in {summary['elapsed_s']:.0f} s"
                  + (f", val accuracy {100 * acc:.2f}%" if acc is not None else ""), highlight=False)
    for line in wrap_listing(summary["genotype_string"], console.width, first="genotype: "):
        console.print(line, highlight=False, markup=False)
