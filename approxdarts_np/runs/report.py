"""Accuracy with each multiplier and the arithmetic energy of a network: the paper's result table."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from approxdarts_np.approx.convolution import arithmetic_from_spec
from approxdarts_np.approx.energy import EnergyReport, EnergyTable, energy_report
from approxdarts_np.approx.multipliers import bundled_names, load_multiplier
from approxdarts_np.data.cifar import load_cifar10
from approxdarts_np.errors import UserError
from approxdarts_np.nas.costs import network_costs
from approxdarts_np.runs.evaluate import evaluate
from approxdarts_np.nas.genotypes import Genotype
from approxdarts_np.nas.model_eval import NetworkCIFAR
from approxdarts_np.runs.train import load_trained_network


def network_energy(genotype: Genotype, channels: int, layers: int, multiplier: str | None = "exact",
                   table: EnergyTable | None = None) -> tuple[EnergyReport, int]:
    """Energy report of the evaluation network of ``genotype`` (one 32×32 image) and its parameter count.

    The parameter count leaves out the auxiliary head (it is not used at inference).
    """
    if layers < 3 or channels <= 0:
        raise UserError("--layers must be at least 3 and --channels positive")
    net = NetworkCIFAR(genotype, channels, 10, layers, auxiliary=False)
    mult = None if multiplier in (None, "none", "exact") else load_multiplier(multiplier)
    report = energy_report(network_costs(net), mult, table)
    params = sum(p.size for p in net.parameters())
    return report, params


def expand_multiplier_specs(spec: str) -> list[str]:
    """``all`` → none, exact and every bundled table; otherwise a comma-separated list."""
    if spec.strip().lower() == "all":
        return ["none", "exact"] + bundled_names()
    return [s.strip() for s in spec.split(",") if s.strip()]


def evaluate_checkpoint(checkpoint: str | Path, multipliers: list[str], data_dir: str | None = None,
                        batch_size: int = 100, table: EnergyTable | None = None,
                        progress=None) -> list[dict]:
    """Test accuracy of a trained network with each multiplier in its searched convolutions.

    Each row also carries the arithmetic energy of one inference in that mode
    (FP32 for ``none``) and the savings against FP32 and exact 8-bit.
    ``progress(event)`` receives ``{"event": "multiplier", "name", "index", "total"}`` and
    ``{"event": "batch", "done", "total"}``.
    """
    model, config = load_trained_network(checkpoint)
    arithmetics = [(spec, arithmetic_from_spec(spec)) for spec in multipliers]  # UserError before work
    data = load_cifar10(data_dir if data_dir is not None else config.data_dir)
    costs = network_costs(model)
    rows = []
    for i, (spec, arithmetic) in enumerate(arithmetics):
        if progress:
            progress({"event": "multiplier", "name": spec, "index": i, "total": len(arithmetics)})
        model.set_multiplier(arithmetic)
        loss, acc = evaluate(model, data.test_x, data.test_y, batch_size,
                             progress=(lambda d, t: progress({"event": "batch", "done": d, "total": t}))
                             if progress else None)
        row = {"multiplier": arithmetic.name if arithmetic else "none", "test_acc": acc, "test_loss": loss,
               "test_images": int(data.test_x.shape[0]), "energy_pj": None, "energy_fp32_pj": None,
               "energy_exact8_pj": None, "saving_vs_fp32_pct": None, "saving_vs_exact8_pct": None}
        try:
            report = energy_report(costs, arithmetic.multiplier if arithmetic else None, table)
        except UserError:
            report = None  # a circuit without a published power: accuracy only
        if report is not None:
            energy = report.energy_fp32_pj if arithmetic is None else report.energy_approx_pj
            row.update(energy_pj=energy, energy_fp32_pj=report.energy_fp32_pj,
                       energy_exact8_pj=report.energy_exact8_pj,
                       saving_vs_fp32_pct=100.0 * (1 - energy / report.energy_fp32_pj),
                       saving_vs_exact8_pct=100.0 * (1 - energy / report.energy_exact8_pj))
        rows.append(row)
    model.set_multiplier(None)
    return rows


def rows_to_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def plot_accuracy_energy(rows: list[dict], path: str | Path) -> None:
    """PNG of test accuracy against arithmetic energy per inference, FP32 and exact 8-bit marked.

    Needs matplotlib (``pip install approxdarts-np[plot]``); UserError when it is missing.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("the plot needs matplotlib: pip install 'approxdarts-np[plot]' "
                        "(or pip install matplotlib)") from None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        if row["energy_pj"] is None:
            continue
        name = row["multiplier"]
        special = {"none": ("FP32", "tab:red", "s"), "exact": ("exact 8-bit", "tab:green", "D")}.get(name)
        energy_uj = row["energy_pj"] / 1e6
        if special:
            ax.scatter(energy_uj, 100 * row["test_acc"], color=special[1], marker=special[2], s=60,
                       label=special[0], zorder=3)
        else:
            ax.scatter(energy_uj, 100 * row["test_acc"], color="tab:blue", s=20, zorder=2)
            ax.annotate(name.replace("mul8u_", ""), (energy_uj, 100 * row["test_acc"]), fontsize=6,
                        xytext=(2, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("arithmetic energy per inference (µJ, multiplications)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy against multiplier energy")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
