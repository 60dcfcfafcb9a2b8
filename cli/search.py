"""`approxdarts-np search`: parse options, build a SearchConfig, run the search, render progress."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from approxdarts_np.runs.search import SearchConfig, run_search
from approxdarts_np_cli._common import user_errors
from approxdarts_np_cli.options import config_command, run_with_progress, start_run
from approxdarts_np_cli.text import plural, wrap_listing

@user_errors
@config_command(SearchConfig)
def search(
    options: dict,
    address: Optional[str] = typer.Option(None, help=(
        "With --workers: the Ray cluster to run them on (HOST:PORT or auto); default: a local Ray.")),
    resume: Optional[Path] = typer.Option(None, help=(
        "Continue the search saved in this folder. Only --epochs (to extend it), --threads and --workers may be given "
        "with it; other settings are the saved ones.")),
) -> None:
    """Search a cell with DARTS (first or second order), the searched convolutions using the chosen multiplier."""
    console = Console()
    folder, run = start_run(SearchConfig, run_search, options, resume, address=address)
    summary = run_with_progress(console, "search", folder, run)
    acc = summary["val_acc"]
    console.print(f"done: {plural(summary['epochs'], 'epoch')} in {summary['elapsed_s']:.0f} s"
                  + (f", val accuracy {100 * acc:.2f}%" if acc is not None else ""), highlight=False)
    for line in wrap_listing(summary["genotype_string"], console.width, first="genotype: "):
        console.print(line, highlight=False, markup=False)
