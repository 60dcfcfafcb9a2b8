"""A sweep's results: the rows of its trials as results.csv and results.json, its pareto.png (drawn by
:mod:`approxdarts_np.runs.plots`), and the summary over seeds with its number formats."""
from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path

from approxdarts_np.io.checkpoint import write_json, write_text
from approxdarts_np.runs import plots

ROW_COLUMNS = ("arithmetic", "seed", "energy_weight", "stage", "val_acc", "test_acc", "energy_pj", "energy_fp32_pj",
               "energy_exact8_pj", "energy_approx_pj", "parameters", "wall_s", "resumed", "genotype", "folder")
#: Columns saved under an older name: a trial row written before the rename reads as it was meant.
RENAMED_COLUMNS = {"multiplier": "arithmetic"}


def current_row(row: dict) -> dict:
    """``row`` with its columns under their current names (:data:`RENAMED_COLUMNS`)."""
    return {RENAMED_COLUMNS.get(k, k) if RENAMED_COLUMNS.get(k) not in row else k: v for k, v in row.items()}


def write_rows_and_plot(rows: list[dict], folder: Path) -> dict:
    """The trials' rows as results.csv and results.json, and their pareto.png, in ``folder``; their paths."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(ROW_COLUMNS), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    files = {"csv": folder / "results.csv", "json": folder / "results.json", "plot": folder / "pareto.png"}
    write_text(files["csv"], out.getvalue())
    write_json(files["json"], rows)
    accuracy = "test_acc" if all(r["test_acc"] is not None for r in rows) else "val_acc"
    points = [dict(r, label=f"{short_name(r['arithmetic'])} s{r['seed']}"
                   + ("" if r.get("energy_weight") is None else f" λ{r['energy_weight']:g}"), accuracy=r[accuracy])
              for r in rows]
    # each line the mean of what its label names (the exact 8-bit trials, when there are any)
    references = plots.mean_references(rows)
    plots.plot_accuracy_energy(points, files["plot"], accuracy_label="test accuracy" if accuracy == "test_acc"
                               else "search val accuracy", title=f"Sweep: {len(rows)} trials", references=references)
    return {k: str(v) for k, v in files.items()}


def short_name(spec: str) -> str:
    """An arithmetic spec for a label: FP32, exact 8-bit, or the table names without mul8u_."""
    return "+".join({"none": "FP32", "exact": "exact 8-bit"}.get(m.lower(), m.replace("mul8u_", ""))
                    for m in str(spec).split("+"))


def summarise(rows: list[dict]) -> list[dict]:
    """Per arithmetic (and λ): trials, and mean ± std over seeds of accuracies, energy, parameters, wall time.

    The std is the sample standard deviation (n − 1); None for a single seed.
    """
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["arithmetic"], row.get("energy_weight")), []).append(row)
    summary = []
    for (arithmetic, energy_weight), group in groups.items():
        entry = {"arithmetic": arithmetic, "energy_weight": energy_weight, "trials": len(group)}
        for key in ("val_acc", "test_acc", "energy_pj", "parameters", "wall_s"):
            values = [r[key] for r in group if r.get(key) is not None]
            entry[key + "_mean"] = statistics.fmean(values) if values else None
            entry[key + "_std"] = statistics.stdev(values) if len(values) > 1 else None
        summary.append(entry)
    return summary


def format_mean_std(mean: float | None, std: float | None, scale: float = 1.0, digits: int | None = 2) -> str:
    """``mean±std`` scaled (``mean`` alone without a std, ``n/a`` without a mean), with ``digits`` decimals,
    or with None as many as give the mean three significant digits (the std gets the same decimals)."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    mean *= scale
    if digits is None:
        digits = max(0, 2 - math.floor(math.log10(abs(mean)))) if mean else 0
    text = f"{mean:.{digits}f}"
    return text if std is None else f"{text}±{std * scale:.{digits}f}"


def format_count(mean: float | None, std: float | None) -> str:
    """A count's ``mean±std``, from 10,000 on in thousands or millions: 9512±738, 10.1k±2.3k, 3.35M±0.12M."""
    if mean is None or abs(mean) < 1e4:
        return format_mean_std(mean, std, digits=0)
    unit, size = ("M", 1e6) if abs(mean) >= 1e6 else ("k", 1e3)
    return f"{unit}±".join(format_mean_std(mean, std, 1 / size, digits=None).split("±")) + unit
