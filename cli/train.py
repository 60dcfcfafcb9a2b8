"""`approxdarts-np train`, `evaluate` and `energy`: the final network, its accuracy and its energy."""
from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from approxdarts_np.approx.energy import EnergyTable, format_saving
from approxdarts_np.io.checkpoint import write_json, write_text
from approxdarts_np.runs.report import (evaluate_checkpoint, expand_multiplier_specs, network_energy,
                                       plot_accuracy_energy, rows_to_csv)
from approxdarts_np.nas.genotypes import read_genotype
from approxdarts_np.runs.train import TrainConfig, run_train
from approxdarts_np_cli._common import user_errors
from approxdarts_np_cli.progress import EpochProgress


class Preset(str, Enum):
    quick = "quick"
    paper = "paper"


@user_errors
def train(
    genotype: str = typer.Option(..., help="genotype.json, a .txt with the DARTS string, or DARTS_V2."),
    data_dir: Optional[Path] = typer.Option(None, help="CIFAR-10 folder; default: the bundled sample."),
    output_dir: Path = typer.Option(Path("runs/train"), help="Folder for config, metrics and checkpoint."),
    preset: Preset = typer.Option(Preset.quick, help="quick: minutes on a CPU; paper: DARTS's settings."),
    epochs: Optional[int] = typer.Option(None, help="Epochs [quick 2, paper 600]."),
    channels: Optional[int] = typer.Option(None, help="Initial channels [quick 8, paper 36]."),
    layers: Optional[int] = typer.Option(None, help="Cells [quick 6, paper 20]."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size [quick 32, paper 96]."),
    max_train_images: Optional[int] = typer.Option(None, help="Use only the first N training images, 0 = all."),
    seed: int = typer.Option(0, help="Seed of weights, data order, augmentation and drop-path."),
    multiplier: str = typer.Option("none", help="none, exact, a bundled table or a .bin/.npy path (QAT)."),
    threads: Optional[int] = typer.Option(None, help="Threads for kernels and BLAS [all cores]."),
    lr: Optional[float] = typer.Option(None, help="Learning rate, cosine-annealed [0.025]."),
    weight_decay: Optional[float] = typer.Option(None, help="Weight decay [3e-4]."),
    auxiliary_weight: Optional[float] = typer.Option(None, help="Auxiliary loss weight, 0 = no head [0.4]."),
    drop_path: Optional[float] = typer.Option(None, help="Final drop-path probability [0.2]."),
    cutout: Optional[int] = typer.Option(None, help="Cutout length, 0 = off [16]."),
    resume: Optional[Path] = typer.Option(None, help="Resume the training saved in this output folder."),
) -> None:
    """Train the network of a genotype (optionally through a multiplier) and evaluate it each epoch."""
    overrides = {k: v for k, v in dict(
        epochs=epochs, channels=channels, layers=layers, batch_size=batch_size, lr=lr, threads=threads,
        weight_decay=weight_decay, auxiliary_weight=auxiliary_weight, drop_path=drop_path,
        cutout=cutout).items() if v is not None}
    if max_train_images is not None:
        overrides["max_train_images"] = max_train_images or None
    geno = read_genotype(genotype).to_dict() if resume is None else {}
    make = TrainConfig.paper if preset is Preset.paper else TrainConfig.quick
    config = make(genotype=geno, data_dir=str(data_dir) if data_dir else None, output_dir=str(output_dir),
                  seed=seed, multiplier=multiplier, **overrides)
    console = Console()
    console.print(f"train → {resume or output_dir}", highlight=False)
    try:
        with EpochProgress(console, "train") as progress:
            summary = run_train(config, resume=resume, progress=progress)
    except KeyboardInterrupt:
        console.print(f"interrupted; checkpoint saved. Continue with: approxdarts-np train --genotype "
                      f"{genotype} --resume {resume or output_dir}", highlight=False)
        raise typer.Exit(code=130) from None
    console.print(f"done: {summary['epochs']} epochs in {summary['elapsed_s']:.0f} s, test accuracy "
                  f"{100 * summary['test_acc']:.2f}%  checkpoint: {summary['checkpoint']}", highlight=False)


@user_errors
def evaluate(
    checkpoint: Path = typer.Option(..., help="checkpoint.h5 of a training run."),
    multiplier: str = typer.Option("none", help="none, exact, a table name or path, a comma list, or all."),
    data_dir: Optional[Path] = typer.Option(None, help="CIFAR-10 folder; default: the run's."),
    batch_size: int = typer.Option(100, help="Evaluation batch size."),
    output: Optional[Path] = typer.Option(None, help="Write the table here (.csv or .json) [with all: "
                                                     "next to the checkpoint]."),
    plot: Optional[Path] = typer.Option(None, help="PNG of accuracy against energy [with all: next to the "
                                                   "checkpoint]; needs matplotlib."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Test accuracy of a trained network with each multiplier, beside its arithmetic energy."""
    specs = expand_multiplier_specs(multiplier)
    everything = multiplier.strip().lower() == "all"
    console = Console(stderr=as_json)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("evaluate", total=None)

        def progress(event):
            if event["event"] == "multiplier":
                bar.update(task, description=f"{event['name']} ({event['index'] + 1}/{event['total']})",
                           completed=0, total=None)
            else:
                bar.update(task, completed=event["done"], total=event["total"])

        rows = evaluate_checkpoint(checkpoint, specs, str(data_dir) if data_dir else None, batch_size,
                                   progress=progress)
    if everything:
        output = output or checkpoint.parent / "evaluate_all.csv"
        plot = plot or checkpoint.parent / "accuracy_energy.png"
    if output is not None:
        if output.suffix == ".json":
            write_json(output, rows)
        else:
            write_text(output, rows_to_csv(rows))
    if plot is not None:
        plot_accuracy_energy(rows, plot)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"test accuracy ({rows[0]['test_images']} images)")
    for col in ("multiplier", "accuracy", "energy (µJ)", "vs FP32", "vs exact 8-bit"):
        table.add_column(col, justify="left" if col == "multiplier" else "right")
    for r in rows:
        e = r["energy_pj"]
        table.add_row(r["multiplier"], f"{100 * r['test_acc']:.2f} %",
                      f"{e / 1e6:.2f}" if e is not None else "n/a",
                      _pct(r["saving_vs_fp32_pct"]), _pct(r["saving_vs_exact8_pct"]))
    console.print(table)
    for label, path in (("table", output), ("plot", plot)):
        if path is not None:
            console.print(f"{label}: {path}", highlight=False)


def _pct(saving):
    return format_saving(None if saving is None else round(saving, 2))


@user_errors
def energy(
    genotype: str = typer.Option(..., help="genotype.json, a .txt with the DARTS string, or DARTS_V2."),
    multiplier: str = typer.Option("exact", help="Multiplier of the searched convolutions (name or path)."),
    channels: int = typer.Option(36, help="Initial channels."),
    layers: int = typer.Option(20, help="Cells."),
    fp32_mul_pj: float = typer.Option(3.7, help="Energy of an FP32 multiply (pJ)."),
    int8_mul_pj: float = typer.Option(0.2, help="Energy of an exact 8-bit multiply (pJ)."),
    per_layer: bool = typer.Option(False, "--per-layer", help="Print every layer's MACs and multiplier."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Arithmetic energy of one inference: FP32, exact 8-bit and the chosen multiplier, per layer and total."""
    table = EnergyTable(fp32_mul_pj=fp32_mul_pj, int8_mul_pj=int8_mul_pj)
    geno = read_genotype(genotype)
    report, params = network_energy(geno, channels, layers, multiplier, table)
    data = {"genotype": geno.to_darts_string(), "channels": channels, "layers": layers,
            "parameters": params, **report.to_dict(),
            "energy_ratio_exact8_to_fp32": report.energy_exact8_pj / report.energy_fp32_pj,
            "summary": report.summary()}
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    console = Console()
    if per_layer:
        t = Table(title="layers")
        for col in ("layer", "kind", "MACs", "multiplier"):
            t.add_column(col, justify="right" if col == "MACs" else "left")
        for row in report.layers:
            t.add_row(row.name, row.kind, f"{row.macs:,}", row.multiplier or "FP32")
        console.print(t)
    console.print(f"network: {layers} cells, {channels} channels, {params:,} parameters (without auxiliary head)",
                  highlight=False)
    console.print(f"MACs per image: {report.macs:,} ({report.macs_quantised:,} in the 8-bit searched "
                  f"convolutions, {100 * report.macs_quantised / report.macs:.1f} %)", highlight=False)
    t = Table(title="multiplication energy per image")
    t.add_column("arithmetic")
    t.add_column("energy (µJ)", justify="right")
    t.add_row("FP32", f"{report.energy_fp32_pj / 1e6:.3f}")
    t.add_row("exact 8-bit in searched convs", f"{report.energy_exact8_pj / 1e6:.3f}")
    name = next(iter(report.multipliers), "exact")
    t.add_row(f"{name} in searched convs", f"{report.energy_approx_pj / 1e6:.3f}")
    console.print(t)
    console.print(f"savings: {report.summary()}  (exact 8-bit / FP32 = "
                  f"{report.energy_exact8_pj / report.energy_fp32_pj:.3f})", highlight=False)
    console.print("energy per operation:", highlight=False)
    for line in table.sources():
        console.print(f"  {line}", highlight=False, markup=False)
