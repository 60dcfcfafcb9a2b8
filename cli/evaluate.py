"""`approxdarts-np evaluate`: test accuracy of a trained network with each multiplier, beside its energy."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from approxdarts_np.approx.energy import format_saving
from approxdarts_np.io.checkpoint import write_json, write_text
from approxdarts_np.runs.plots import plot_accuracy_energy, require_matplotlib
from approxdarts_np.runs.report import check_output_path, evaluate_checkpoint, expand_arithmetic_specs, rows_to_csv
from approxdarts_np_cli._common import user_errors
from approxdarts_np_cli.progress import EvaluationProgress
from approxdarts_np_cli.text import plural


@user_errors
def evaluate(
    checkpoint: Path = typer.Option(..., help="checkpoint.h5 of a training run."),
    arithmetic: Optional[str] = typer.Option(None, "--arithmetic", "--multiplier", help=escape(
        "genotype (its per-op multipliers), none, exact, a table name or path, a comma list, or all "
        "[genotype when the network's genotype names multipliers, else none].")),
    data_dir: Optional[Path] = typer.Option(None, help="CIFAR-10 folder; default: the run's."),
    batch_size: int = typer.Option(100, help="Evaluation batch size."),
    output: Optional[Path] = typer.Option(None, help=escape("Write the table here (.csv or .json) [with all: "
                                                            "evaluate_all.csv next to the checkpoint].")),
    plot: Optional[Path] = typer.Option(None, help=escape("PNG of accuracy against energy [with all: "
                                                          "accuracy_energy.png next to the checkpoint]; "
                                                          "needs matplotlib.")),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Test accuracy of a trained network with each multiplier, beside its arithmetic energy."""
    specs = expand_arithmetic_specs(arithmetic) if arithmetic is not None else None
    everything = arithmetic is not None and arithmetic.strip().lower() == "all"
    if everything:
        output = output or checkpoint.parent / "evaluate_all.csv"
        plot = plot or checkpoint.parent / "accuracy_energy.png"
    # Check where the results go before the (long) evaluation, so that no result is lost.
    for path, suffixes in ((output, (".csv", ".json")), (plot, (".png",))):
        if path is not None:
            check_output_path(path, suffixes)
    if plot is not None:
        require_matplotlib()
    console = Console(stderr=as_json)
    with EvaluationProgress(console) as progress:
        rows = evaluate_checkpoint(checkpoint, specs, str(data_dir) if data_dir else None, batch_size,
                                   progress=progress)
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
    table = Table(title=f"test accuracy ({plural(rows[0]['test_images'], 'image')})")
    for col in ("arithmetic", "accuracy", "energy (µJ)", "vs FP32", "vs exact 8-bit"):
        table.add_column(col, justify="left" if col == "arithmetic" else "right")
    for r in rows:
        e = r["energy_pj"]
        table.add_row(r["arithmetic"], f"{100 * r['test_acc']:.2f} %",
                      f"{e / 1e6:.2f}" if e is not None else "n/a",
                      _pct(r["saving_vs_fp32_pct"]), _pct(r["saving_vs_exact8_pct"]))
    console.print(table)
    for label, path in (("table", output), ("plot", plot)):
        if path is not None:
            console.print(f"{label}: {path}", highlight=False)


def _pct(saving):
    return format_saving(None if saving is None else round(saving, 2))


