"""`approxdarts-np sweep`: parse options, build a SweepConfig, run the grid on Ray, print the summary."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from approxdarts_np.errors import UserError
from approxdarts_np.runs.config import option_name
from approxdarts_np.runs.search import SearchConfig
from approxdarts_np.runs.sweep import run_sweep
from approxdarts_np.runs.sweep_results import format_count, format_mean_std
from approxdarts_np.runs.sweep_trials import PASSED_THROUGH, SweepConfig
from approxdarts_np.runs.train import TrainConfig
from approxdarts_np_cli._common import user_errors
from approxdarts_np_cli.options import config_command
from approxdarts_np_cli.text import plural, wrap_parts


@user_errors
@config_command(SweepConfig, passed=PASSED_THROUGH, runs={"search": SearchConfig, "train": TrainConfig})
def sweep(
    options: dict,
    address: Optional[str] = typer.Option(None, help=escape(
        "Join this Ray cluster (e.g. 10.0.0.1:6379 or auto) [start a local Ray].")),
    resume: Optional[Path] = typer.Option(None, help="Continue the sweep saved in this folder (only --address "
                                                      "may be given with it)."),
) -> None:
    """Run a grid of searches and trainings (multipliers × seeds × λ) as Ray Tune trials; results, Pareto plot.

    Exit codes:
    0: every trial finished.
    1: the sweep finished but trials failed: one line each names the trial
    and its error, the other trials' results are written, and --resume
    runs the failed trials again.
    2: bad input, found before any trial ran.
    130: stopped by Ctrl-C; --resume continues the unfinished trials.
    """
    console = Console()
    if resume is not None:
        if options.get("output_dir") == str(resume):
            options.pop("output_dir")
        run_options = options.pop("run_options", {})
        others = [*options, *run_options]
        if others:
            raise UserError(f"--resume {resume} continues a sweep with its saved settings; these cannot be "
                            f"given with it: {', '.join(option_name(k) for k in others)}")
        config = None
    else:
        config = SweepConfig(**options)
    result = run_sweep(config, resume=resume, address=address, progress=lambda e: _show(console, e))
    _print_summary(console, result)
    for f in result["failed"]:
        where = f" (traceback: {Path(f['path']) / 'error.txt'})" if f["path"] else ""
        console.print(f"failed: {f['trial']}: {f['error']}{where}", markup=False, highlight=False, soft_wrap=True)
    if result["unfinished"]:
        console.print(f"stopped: {', '.join(result['unfinished'])} not finished", highlight=False, soft_wrap=True)
    if result["failed"] or result["unfinished"]:
        console.print(f"continue with: approxdarts-np sweep --resume {result['output_dir']}", markup=False,
                      highlight=False, soft_wrap=True)
        raise typer.Exit(code=130 if result["unfinished"] else 1)  # unfinished trials: the sweep was stopped


def _show(console: Console, event: dict) -> None:
    kind, trial = event["event"], event.get("trial")
    if kind == "sweep_start":
        console.print(f"sweep → {event['output_dir']}: {plural(event['trials'], 'trial')}, "
                      f"{plural(event['cpus_per_trial'], 'CPU')} each{' (resumed)' if event['resumed'] else ''}",
                      markup=False, highlight=False, soft_wrap=True)
    elif kind == "trial_epoch":
        acc = [f"{k.replace('_', ' ')} {100 * event[k]:.2f}%" for k in ("train_acc", "val_acc") if k in event]
        for line in wrap_parts([f"{trial}: {event['stage']} epoch {event['epoch']}"] + acc, console.width):
            console.print(line, markup=False, highlight=False, soft_wrap=True)
    elif kind == "trial_done":
        console.print(f"{trial}: done", highlight=False)
    elif kind == "trial_retry":
        cause = f" ({event['error']})" if event.get("error") else ""
        console.print(f"{trial}: failed{cause}; restarting from its last checkpoint", markup=False,
                      highlight=False, soft_wrap=True)
    elif kind == "trial_error":
        console.print(f"{trial}: failed", highlight=False)


def _print_summary(console: Console, result: dict) -> None:
    """The summary over seeds as a table that fits 80 columns (a quick sweep with λ; a paper-size one without).

    The number of seeds goes in the title when every row has the same, else in a column. Numbers never
    wrap: in a narrower console the arithmetic names fold instead.
    """
    rows = result["rows"]
    if not rows:
        return
    counts = {s["trials"] for s in result["summary"]}
    same = counts.pop() if len(counts) == 1 else None  # seeds per row, when every row has the same number
    title = f"{plural(len(rows), 'trial')} ({result['stage']})"
    if same is None or same > 1:
        title += f", mean ± std over {'seeds' if same is None else plural(same, 'seed')}"
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
    lambdas = any(s["energy_weight"] is not None for s in result["summary"])
    columns = (["arithmetic"] + (["λ"] if lambdas else []) + (["seeds"] if same is None else [])
               + ["val acc %", "test acc %", "energy µJ", "params", "wall s"])
    for col in columns:
        table.add_column(col, justify="left" if col == "arithmetic" else "right", no_wrap=col != "arithmetic",
                         overflow="fold")
    for s in result["summary"]:
        weight = "" if s["energy_weight"] is None else f"{s['energy_weight']:g}"
        table.add_row(*[escape(s["arithmetic"])] + ([weight] if lambdas else [])
                      + ([str(s["trials"])] if same is None else [])
                      + [format_mean_std(s["val_acc_mean"], s["val_acc_std"], 100),
                         format_mean_std(s["test_acc_mean"], s["test_acc_std"], 100),
                         format_mean_std(s["energy_pj_mean"], s["energy_pj_std"], 1e-6, digits=None),
                         format_count(s["parameters_mean"], s["parameters_std"]),
                         format_mean_std(s["wall_s_mean"], s["wall_s_std"], digits=0)])
    console.print(table)
    console.print(f"{plural(len(rows), 'trial')} in {result['elapsed_s']:.0f} s", highlight=False)
    for label, path in result["files"].items():
        console.print(f"{label}: {path}", markup=False, highlight=False, soft_wrap=True)
