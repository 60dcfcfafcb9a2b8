"""Figures of the product, in one place: accuracy against arithmetic energy, with the Pareto front.

Serves ``evaluate --plot`` (one network, one point per multiplier) and a
sweep's ``pareto.png`` (one point per trial).

Every point on the front is named. The names are placed by
:func:`place_labels`, which works in pixels without drawing anything: each
name goes to the nearest free spot around its own point (clear of every
marker and every other name), and a thin leader line joins it to its point
when it had to move away or another marker is nearer to it.
"""
from __future__ import annotations

import math
import statistics
import textwrap
from dataclasses import dataclass
from pathlib import Path

from approxdarts_np.approx.arithmetic import EXACT, FP32_NAMES, is_fp32
from approxdarts_np.errors import UserError

#: Marker areas (points²) of the scatter: approximate points, exact 8-bit diamonds, the front's rings.
_POINT_AREA, _EXACT_AREA, _RING_AREA = 22, 50, 90
_LABEL_FONT_SIZE = 8


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
    """Indices of the ``(energy, accuracy)`` points on the Pareto front, in input order.

    A point is off the front when another point is at least as good on both
    counts and better on one: lower energy, or higher accuracy. So a point with
    the same accuracy as a cheaper one, or the same energy as a more accurate
    one, is dominated; of identical points only the first is on the front.
    """
    def dominated(i: int) -> bool:
        energy, acc = points[i]
        return any(e <= energy and a >= acc and ((e, a) != (energy, acc) or j < i)
                   for j, (e, a) in enumerate(points) if j != i)

    return [i for i in range(len(points)) if not dominated(i)]


def mean_references(rows: list[dict]) -> list[tuple[str, float]]:
    """Reference energies for a sweep's plot, ``(label, energy_pj)``, each the mean of what its label names.

    For exact 8-bit: the mean energy of the exact 8-bit trials when there are
    any (the line then lies among their points), else the mean of every
    trial's network priced in exact 8-bit (``energy_exact8_pj``). The same for
    FP32 with the FP32 trials and ``energy_fp32_pj``.
    """
    references = []
    for names, key, what in (((EXACT,), "energy_exact8_pj", "exact 8-bit"), (FP32_NAMES, "energy_fp32_pj", "FP32")):
        own = [r["energy_pj"] for r in rows
               if str(r.get("arithmetic")).lower() in names and r.get("energy_pj") is not None]
        if own:
            references.append((f"{what} trials (mean of {len(own)})", statistics.fmean(own)))
            continue
        priced = [r[key] for r in rows if r.get(key) is not None]
        if priced:
            references.append((f"all {len(priced)} trials' networks in {what} (mean)", statistics.fmean(priced)))
    return references


# ----------------------------------------------------------------- label placement
Box = tuple[float, float, float, float]  # (x0, y0, x1, y1), pixels, y upwards
_HIDES = 10  # weight of a text hiding something (a marker, a text, the frame's edge) against a line crossing


@dataclass(frozen=True)
class PlacedLabel:
    """A name on the plot: the point it names, where its text is, and whether a leader line joins them."""

    text: str
    anchor: tuple[float, float]  # the named point: (energy µJ, accuracy %)
    box: Box  # the text's extent in pixels of the figure
    anchor_px: tuple[float, float]  # the named point in pixels of the figure
    leader: bool


def _boxes_overlap(a: Box, b: Box, gap: float = 0.0) -> bool:
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


def box_distance(box: Box, point: tuple[float, float]) -> float:
    """Distance from ``point`` to the nearest point of ``box`` (0 inside it)."""
    dx = max(box[0] - point[0], 0.0, point[0] - box[2])
    dy = max(box[1] - point[1], 0.0, point[1] - box[3])
    return math.hypot(dx, dy)


def _nearest_in_box(box: Box, point: tuple[float, float]) -> tuple[float, float]:
    return min(max(point[0], box[0]), box[2]), min(max(point[1], box[1]), box[3])


def _segment_distance(p: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
    """Distance from ``p`` to the segment ``a``–``b``."""
    ax, ay = a
    dx, dy = b[0] - ax, b[1] - ay
    length2 = dx * dx + dy * dy
    t = 0.0 if length2 == 0 else max(0.0, min(1.0, ((p[0] - ax) * dx + (p[1] - ay) * dy) / length2))
    return math.hypot(p[0] - ax - t * dx, p[1] - ay - t * dy)


def _segments_cross(a, b, c, d) -> bool:
    """Whether the segments a–b and c–d cross (touching ends do not count)."""
    def side(p, q, r):
        return (q[0] - p[0]) * (r[1] - p[1]) - (q[1] - p[1]) * (r[0] - p[0])
    return side(a, b, c) * side(a, b, d) < 0 and side(c, d, a) * side(c, d, b) < 0


def _segment_hits_box(a, b, box: Box) -> bool:
    """Whether the segment a–b passes through ``box``."""
    if box_distance(box, a) == 0 or box_distance(box, b) == 0:
        return True
    corners = [(box[0], box[1]), (box[2], box[1]), (box[2], box[3]), (box[0], box[3])]
    return any(_segments_cross(a, b, corners[k], corners[(k + 1) % 4]) for k in range(4))


def place_labels(anchors: list[tuple[float, float]], sizes: list[tuple[float, float]],
                 markers: list[tuple[float, float]], frame: Box, radius: float,
                 gap: float = 3.0, rings: int = 16, directions: int = 16) -> list[tuple[Box, bool]]:
    """Where to write each label, in pixels: ``(box, leader)`` per anchor, in order.

    ``anchors`` are the named points, ``sizes`` the ``(width, height)`` of
    their texts, ``markers`` every point drawn (named or not; the anchors are
    among them), each a disc of ``radius``; the boxes stay inside ``frame``.
    Labels are placed one after the other, each at the candidate spot nearest
    its anchor (``directions`` directions, ``rings`` distances) that overlaps
    no marker, no label placed before and no earlier leader line, and whose
    own leader line would pass no other marker. ``leader`` is True when the
    text is not right next to its point, or another marker is not clearly
    farther from it (by at least the text's distance from its own point, or
    half its height); a leader line must then be drawn. When no spot is
    free, the one with the fewest collisions is taken (with a leader line),
    a text over a marker or another text counting as ten line crossings.
    """
    placed: list[tuple[Box, bool]] = []
    leaders: list[tuple[tuple[float, float], tuple[float, float]]] = []
    for anchor, (w, h) in zip(anchors, sizes):
        others = [m for m in markers if m != anchor]
        best = None  # (collisions, cost, box, leader)
        for k, box in _candidate_boxes(anchor, w, h, radius + gap, rings, directions):
            own = box_distance(box, anchor)
            # right next to its point and clearly nearer to it than to any other: no line needed
            leader = own > radius + gap + 0.6 * h or \
                min((box_distance(box, m) for m in others), default=math.inf) < own + max(own, h / 2)
            collisions = _collisions(box, (anchor, _nearest_in_box(box, anchor)) if leader else None,
                                     markers, others, placed, leaders, frame, radius, gap)
            # nearer is better; a spot that needs a leader line costs as much as moving a text height
            cost = own + (h if leader else 0.0) + 0.01 * k
            if best is None or (collisions, cost) < best[:2]:
                best = (collisions, cost, box, leader or collisions > 0)
        _, _, box, leader = best
        placed.append((box, leader))
        if leader:
            leaders.append((anchor, _nearest_in_box(box, anchor)))
    return placed


def _candidate_boxes(anchor, w: float, h: float, start: float, rings: int, directions: int):
    """``(direction index, box)`` of a ``w`` × ``h`` text around ``anchor``: ``directions`` directions at
    ``rings`` distances, from ``start`` outwards in steps of 0.8 text heights."""
    for ring in range(rings):
        distance = start + ring * 0.8 * h
        for k in range(directions):
            theta = 2 * math.pi * k / directions
            cx = anchor[0] + math.cos(theta) * (distance + w / 2)
            cy = anchor[1] + math.sin(theta) * (distance + h / 2)
            yield k, (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


def _collisions(box: Box, segment, markers, others, placed, leaders, frame: Box, radius: float, gap: float) -> int:
    """What a text at ``box`` (and its leader line ``segment``, or None) would hide or cross.

    A text over a marker, another text or the frame's edge counts :data:`_HIDES`;
    a line through a text, past a marker or across another line counts one.
    """
    hides = ((box[0] < frame[0] or box[1] < frame[1] or box[2] > frame[2] or box[3] > frame[3])
             + sum(box_distance(box, m) < radius + gap / 2 for m in markers)
             + sum(_boxes_overlap(box, b, gap) for b, _ in placed))
    crossings = sum(_segment_hits_box(a, b, box) for a, b in leaders)
    if segment is not None:
        crossings += (sum(_segment_distance(m, *segment) < radius for m in others)
                      + sum(_segment_hits_box(*segment, b) for b, _ in placed)
                      + sum(_segments_cross(*segment, a, b) for a, b in leaders))
    return _HIDES * hides + crossings


# ----------------------------------------------------------------- the figure
@dataclass
class AccuracyEnergyPlot:
    """What :func:`draw_accuracy_energy` put on the figure."""

    labels: list[PlacedLabel]  # the front, cheapest first
    points: list[tuple[str, float, float]]  # every point drawn: (label, energy µJ, accuracy %)
    markers_px: list[tuple[float, float]]  # the same points in pixels of the figure
    marker_radius_px: float
    omitted: list[str]  # rows not drawn (no energy or no accuracy)
    caption: str | None
    references: list[tuple[str, float]]  # (legend text, energy µJ) of the reference lines


def plot_accuracy_energy(rows: list[dict], path: str | Path, accuracy_label: str = "test accuracy",
                         title: str = "Accuracy against multiplier energy",
                         references: list[tuple[str, float]] = ()) -> list[str]:
    """PNG of accuracy against arithmetic energy per inference; the labels of the front, cheapest first.

    See :func:`draw_accuracy_energy`, which this calls.
    """
    return [label.text for label in draw_accuracy_energy(rows, path, accuracy_label, title, references).labels]


def draw_accuracy_energy(rows: list[dict], path: str | Path, accuracy_label: str = "test accuracy",
                         title: str = "Accuracy against multiplier energy",
                         references: list[tuple[str, float]] = ()) -> AccuracyEnergyPlot:
    """PNG of accuracy against arithmetic energy per inference (µJ, linear), the front drawn and labelled.

    Each row needs ``arithmetic`` (a spec), ``energy_pj`` and an accuracy (``accuracy``,
    else ``test_acc``); ``label`` names the point (default: the arithmetic).
    Exact 8-bit rows are green diamonds; FP32 rows are horizontal lines with
    their energy in the legend, since their energy (about 18× the exact 8-bit
    one) would squeeze every 8-bit point into one corner of a linear axis. Only
    points on the Pareto front of the 8-bit points (:func:`pareto_front`) are
    named, each tied to its point (:func:`place_labels`). Rows without an
    energy (a circuit with no published power) or an accuracy are left out and
    named in a caption. ``references`` are ``(label, energy_pj)`` pairs drawn
    as vertical lines (e.g. :func:`mean_references`); one far beyond the points
    is named in the legend only. Needs matplotlib (UserError when missing).
    """
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(7.5, 5.6))
    fp32, points, omitted = [], [], {"energy": [], "accuracy": []}
    for row in rows:
        acc = row.get("accuracy", row.get("test_acc"))
        name = str(row["arithmetic"])
        label = row.get("label") or _short(name)
        if row.get("energy_pj") is None or acc is None:
            omitted["energy" if row.get("energy_pj") is None else "accuracy"].append(label)
            continue
        entry = (row["energy_pj"] / 1e6, 100 * acc, label, name.lower())
        (fp32 if is_fp32(name) else points).append(entry)
    for i, (energy, acc, label, _) in enumerate(fp32):
        ax.axhline(acc, color="tab:red", linestyle="--", linewidth=1,
                   label=f"FP32 ({energy:.3g} µJ)" if i == 0 else None, zorder=1)
    exact = [p for p in points if p[3] == "exact"]
    approx = [p for p in points if p[3] != "exact"]
    if approx:
        ax.scatter([p[0] for p in approx], [p[1] for p in approx], color="tab:blue", s=_POINT_AREA, zorder=2,
                   label="approximate 8-bit")
    if exact:
        ax.scatter([p[0] for p in exact], [p[1] for p in exact], color="tab:green", marker="D", s=_EXACT_AREA,
                   zorder=3, label="exact 8-bit")
    front = sorted((points[i] for i in pareto_front([(p[0], p[1]) for p in points])), key=lambda p: (p[0], p[1]))
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="tab:orange", linewidth=1.2,
                zorder=1, label="Pareto front")
        ax.scatter([p[0] for p in front], [p[1] for p in front], facecolors="none", edgecolors="tab:orange",
                   s=_RING_AREA, zorder=4)
    drawn_references = _draw_references(ax, references, [p[0] for p in points])
    ax.margins(y=0.12)
    ax.set_xlabel("arithmetic energy per inference (µJ, multiplications)")
    ax.set_ylabel(f"{accuracy_label} (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8, frameon=False)
    caption = _caption(omitted)
    if caption:
        fig.text(0.5, 0.012, caption, ha="center", va="bottom", fontsize=8)
    fig.tight_layout(rect=(0, 0.025 * (caption.count("\n") + 1) + 0.01 if caption else 0, 1, 1))
    ax.set_xlim(ax.get_xlim())  # the layout is final from here: the labels are placed in its pixels
    ax.set_ylim(ax.get_ylim())
    labels, markers_px, radius = _label_front(fig, ax, front, points)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return AccuracyEnergyPlot(labels=labels, points=[(p[2], p[0], p[1]) for p in points], markers_px=markers_px,
                              marker_radius_px=radius, omitted=omitted["energy"] + omitted["accuracy"],
                              caption=caption, references=drawn_references)


def _draw_references(ax, references, energies: list[float]) -> list[tuple[str, float]]:
    """Vertical reference lines; sets the x range over the points and the lines. Returns what was drawn."""
    energies = list(energies)
    right = max(energies, default=0.0)
    styles = iter([("tab:green", ":"), ("tab:red", "-."), ("tab:gray", "--")] * 4)
    drawn = []
    for label, energy_pj in references:
        color, style = next(styles)
        energy = energy_pj / 1e6
        if energies and energy > 1.5 * right:
            ax.plot([], [], color=color, linestyle=style, label=f"{label}: {energy:.3g} µJ (off the axis)")
        else:
            ax.axvline(energy, color=color, linestyle=style, linewidth=1, label=f"{label}: {energy:.3g} µJ")
            energies.append(energy)
        drawn.append((label, energy))
    if energies:
        # a linear axis over the points (not from zero): the cluster of good multipliers stays readable,
        # with room on both sides for the names
        lo, hi = min(energies), max(energies)
        span = hi - lo if hi > lo else 0.1 * hi or 1.0
        ax.set_xlim(lo - 0.1 * span, hi + 0.1 * span)
    return drawn


def _caption(omitted: dict) -> str:
    """The note naming the rows that are not drawn ('' when every row is)."""
    parts = []
    if omitted["energy"]:
        parts.append(f"Not drawn, no energy (no published power): {', '.join(omitted['energy'])}.")
    if omitted["accuracy"]:
        parts.append(f"Not drawn, no accuracy: {', '.join(omitted['accuracy'])}.")
    return "\n".join(textwrap.fill(p, 110) for p in parts)


def _label_front(fig, ax, front, points):
    """Names the front's points where :func:`place_labels` puts them; (labels, markers in pixels, radius)."""
    renderer = fig.canvas.get_renderer()
    to_px = ax.transData.transform
    px_per_pt = fig.dpi / 72
    radius = math.sqrt(_RING_AREA) / 2 * px_per_pt  # the front's rings are the largest markers
    markers_px = [tuple(map(float, to_px((p[0], p[1])))) for p in points]
    anchors_px = [tuple(map(float, to_px((p[0], p[1])))) for p in front]
    sizes = []
    for p in front:
        probe = ax.text(0, 0, p[2], fontsize=_LABEL_FONT_SIZE)
        extent = probe.get_window_extent(renderer)
        probe.remove()
        sizes.append((extent.width + 2, extent.height + 2))
    frame = tuple(ax.bbox.extents)
    spots = place_labels(anchors_px, sizes, markers_px, frame, radius)
    labels = []
    for p, anchor_px, (box, leader) in zip(front, anchors_px, spots):
        centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
        offset = ((centre[0] - anchor_px[0]) / px_per_pt, (centre[1] - anchor_px[1]) / px_per_pt)
        arrow = dict(arrowstyle="-", color="0.35", linewidth=0.6, shrinkA=1, shrinkB=radius / px_per_pt) \
            if leader else None
        note = ax.annotate(p[2], (p[0], p[1]), xytext=offset, textcoords="offset points", ha="center",
                           va="center", fontsize=_LABEL_FONT_SIZE, zorder=5, arrowprops=arrow)
        labels.append(_drawn_label(note, renderer, to_px))
    return labels, markers_px, radius


def _drawn_label(note, renderer, to_px) -> PlacedLabel:
    """The label as drawn: the annotation's text, point, text extent and leader line, read from the artist."""
    from matplotlib.text import Text

    note.update_positions(renderer)
    extent = Text.get_window_extent(note, renderer)  # the text alone, without the leader line
    anchor = tuple(map(float, note.xy))
    return PlacedLabel(text=note.get_text(), anchor=anchor, box=tuple(map(float, extent.extents)),
                       anchor_px=tuple(map(float, to_px(anchor))), leader=note.arrow_patch is not None)


def _short(name: str) -> str:
    return {"exact": "exact 8-bit"}.get(name.lower(), name.replace("mul8u_", ""))
