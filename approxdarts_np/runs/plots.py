"""Figures of the product, in one place: accuracy against arithmetic energy, with the Pareto front.

Serves ``evaluate --plot`` (one network, one point per multiplier) and a
sweep's ``pareto.png`` (one point per trial).
"""
from __future__ import annotations

from pathlib import Path

from approxdarts_np.errors import UserError

_FP32 = ("none", "fp32", "float")


def require_matplotlib():
    """The pyplot module (Agg backend); UserError naming the install command when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("the plot needs matplotlib: pip install -e \".[plot]\" (or pip install matplotlib)") from None
    return plt


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated ``(energy, accuracy)`` points, in input order.

    A point is kept when no other point has both higher accuracy and lower energy.
    """
    return [i for i, (energy, acc) in enumerate(points)
            if not any(a > acc and e < energy for e, a in points)]


def plot_accuracy_energy(rows: list[dict], path: str | Path, accuracy_label: str = "test accuracy",
                         title: str = "Accuracy against multiplier energy",
                         references: list[tuple[str, float]] = ()) -> list[str]:
    """PNG of accuracy against arithmetic energy per inference (µJ, linear), the front drawn and labelled.

    Each row needs ``multiplier``, ``energy_pj`` and an accuracy (``accuracy``,
    else ``test_acc``); ``label`` names the point (default: the multiplier).
    Exact 8-bit rows are green diamonds; FP32 rows are horizontal lines with
    their energy in the legend, since their energy (about 18× the exact 8-bit
    one) would squeeze every 8-bit point into one corner of a linear axis. Only
    points on the Pareto front of the 8-bit points get a text label. Rows
    without an energy are left out. ``references`` are ``(label, energy_pj)``
    pairs drawn as vertical lines (e.g. the exact 8-bit and FP32 energy of the
    sweep's networks); one far beyond the points is named in the legend only.
    Needs matplotlib (UserError when missing). Returns the labels written on the
    plot (the front, cheapest first).
    """
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(7.5, 5.6))
    fp32, points = [], []
    for row in rows:
        acc = row.get("accuracy", row.get("test_acc"))
        if row.get("energy_pj") is None or acc is None:
            continue
        name = str(row["multiplier"])
        label = row.get("label") or _short(name)
        entry = (row["energy_pj"] / 1e6, 100 * acc, label, name.lower())
        (fp32 if name.lower() in _FP32 else points).append(entry)
    for i, (energy, acc, label, _) in enumerate(fp32):
        ax.axhline(acc, color="tab:red", linestyle="--", linewidth=1,
                   label=f"FP32 ({energy:.3g} µJ)" if i == 0 else None, zorder=1)
    exact = [p for p in points if p[3] == "exact"]
    approx = [p for p in points if p[3] != "exact"]
    if approx:
        ax.scatter([p[0] for p in approx], [p[1] for p in approx], color="tab:blue", s=22, zorder=2,
                   label="approximate 8-bit")
    if exact:
        ax.scatter([p[0] for p in exact], [p[1] for p in exact], color="tab:green", marker="D", s=50, zorder=3,
                   label="exact 8-bit")
    front = sorted((points[i] for i in pareto_front([(p[0], p[1]) for p in points])), key=lambda p: (p[0], p[1]))
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="tab:orange", linewidth=1.2,
                zorder=1, label="Pareto front")
        ax.scatter([p[0] for p in front], [p[1] for p in front], facecolors="none", edgecolors="tab:orange",
                   s=90, zorder=4)
        for k, (energy, acc, label, _) in enumerate(front):
            # left of the point, alternately above and below, so that neighbours on the staircase
            # do not overlap
            ax.annotate(label, (energy, acc), xytext=(-7, 5 if k % 2 == 0 else -11), textcoords="offset points",
                        fontsize=8, ha="right", zorder=5)
    energies = [p[0] for p in points]
    right = max(energies, default=0.0)
    styles = iter([("tab:green", ":"), ("tab:red", "-."), ("tab:gray", "--")] * 4)
    for label, energy_pj in references:
        color, style = next(styles)
        energy = energy_pj / 1e6
        if points and energy > 1.5 * right:
            ax.plot([], [], color=color, linestyle=style, label=f"{label}: {energy:.3g} µJ (off the axis)")
        else:
            ax.axvline(energy, color=color, linestyle=style, linewidth=1, label=f"{label}: {energy:.3g} µJ")
            energies.append(energy)
    if energies:
        # a linear axis over the points (not from zero): the cluster of good multipliers stays readable;
        # more room on the left, where the front's labels go
        lo, hi = min(energies), max(energies)
        span = hi - lo if hi > lo else 0.1 * hi or 1.0
        ax.set_xlim(lo - 0.15 * span, hi + 0.06 * span)
    ax.margins(y=0.12)
    ax.set_xlabel("arithmetic energy per inference (µJ, multiplications)")
    ax.set_ylabel(f"{accuracy_label} (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return [p[2] for p in front]


def _short(name: str) -> str:
    return {"exact": "exact 8-bit"}.get(name.lower(), name.replace("mul8u_", ""))
