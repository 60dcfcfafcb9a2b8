"""Figures of the product, in one place: accuracy against arithmetic energy."""
from __future__ import annotations

from pathlib import Path

from approxdarts_np.errors import UserError


def require_matplotlib():
    """The pyplot module (Agg backend); UserError naming the install command when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("the plot needs matplotlib: pip install -e \".[plot]\" (or pip install matplotlib)") from None
    return plt


def plot_accuracy_energy(rows: list[dict], path: str | Path) -> None:
    """PNG of test accuracy against arithmetic energy per inference, FP32 and exact 8-bit marked.

    Needs matplotlib (``pip install approxdarts-np[plot]``); UserError when it is missing.
    """
    plt = require_matplotlib()
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
