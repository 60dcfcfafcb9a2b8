"""Output a person reads: the plots' labels and fronts.

The plot tests draw from hand-made points and check the labels through what
was drawn (each name's anchor, text box and leader line read back from the
figure).
"""
from __future__ import annotations

import pytest

from approxdarts_np.runs.plots import box_distance, draw_accuracy_energy, mean_references, pareto_front, place_labels


# ----------------------------------------------------------------- the Pareto front
@pytest.mark.parametrize("points, front", [
    # the same accuracy as a cheaper point: dominated (14VP beside CK5)
    ([(3.57, 71.2), (3.55, 71.2), (3.40, 70.0)], [1, 2]),
    # the same energy as a more accurate point: dominated
    ([(3.20, 60.0), (3.20, 61.0), (3.10, 55.0)], [1, 2]),
    # identical points: only the first
    ([(1.0, 0.5), (1.0, 0.5), (0.5, 0.4)], [0, 2]),
    # a staircase with two dominated points inside it, in input order
    ([(2.0, 0.70), (1.0, 0.50), (3.0, 0.90), (2.5, 0.60), (3.5, 0.85)], [0, 1, 2]),
    ([(1.0, 0.5)], [0]),
])
def test_the_front_excludes_tied_and_dominated_points(points, front):
    assert pareto_front(points) == front


# ----------------------------------------------------------------- the plots
def _evaluate_rows() -> list[dict]:
    """An ``evaluate --multiplier all``-like table with the crowding of issue #24."""
    rows = [{"multiplier": "none", "test_acc": 0.716, "energy_pj": 11.15e6},
            {"multiplier": "exact", "test_acc": 0.712, "energy_pj": 3.601e6}]
    for name, acc, energy in [
            ("1AGV", 0.690, 3.275), ("17KS", 0.692, 3.285),  # close on both axes
            ("14VP", 0.711, 3.570), ("JQQ", 0.7115, 3.576), ("CK5", 0.711, 3.550),  # 14VP ties the cheaper CK5
            ("13QR", 0.610, 3.179), ("QKX", 0.612, 3.201), ("17QU", 0.550, 3.1717), ("17C8", 0.560, 3.1719),
            ("18DU", 0.665, 3.204), ("FTA", 0.685, 3.263), ("12N4", 0.701, 3.327), ("DM1", 0.706, 3.385),
            ("NGR", 0.709, 3.474), ("2HH", 0.7095, 3.503), ("YX7", 0.600, 3.238), ("L40", 0.66, 3.378),
            ("125K", 0.712, 3.596), ("2P7", 0.7125, 3.597), ("KEM", 0.7105, 3.578)]:
        rows.append({"multiplier": f"mul8u_{name}", "test_acc": acc, "energy_pj": energy * 1e6})
    rows += [{"multiplier": f"mul8u_{name}", "test_acc": 0.70, "energy_pj": None}
             for name in ("199Z", "96D", "EXZ", "PKY")]
    return rows


def _sweep_rows() -> list[dict]:
    """A sweep's rows: four networks (two exact 8-bit, two approximate) and their own exact/FP32 prices."""
    rows = []
    for multiplier, seed, acc, energy, exact8, fp32 in [
            ("exact", 0, 0.71, 3.60e6, 3.60e6, 11.1e6), ("exact", 1, 0.70, 3.75e6, 3.75e6, 11.6e6),
            ("mul8u_17KS", 0, 0.68, 3.05e6, 3.35e6, 10.2e6), ("mul8u_17KS", 1, 0.70, 3.10e6, 3.40e6, 10.5e6)]:
        short = "exact 8-bit" if multiplier == "exact" else multiplier.removeprefix("mul8u_")
        rows.append({"multiplier": multiplier, "seed": seed, "accuracy": acc, "energy_pj": energy,
                     "energy_exact8_pj": exact8, "energy_fp32_pj": fp32, "label": f"{short} s{seed}"})
    return rows


def _check_labels(plot, rows) -> None:
    """Every name sits at its own point: anchored there, not over any marker or other name, and either
    clearly nearer its point than any other marker or joined to it by a leader line."""
    point_of = {p[0]: (p[1], p[2]) for p in plot.points}
    expected = {(r.get("label") or r["multiplier"].replace("mul8u_", "").replace("exact", "exact 8-bit")):
                (r["energy_pj"] / 1e6, 100 * r.get("accuracy", r.get("test_acc"))) for r in rows
                if r["energy_pj"] is not None and r["multiplier"] != "none"}
    assert point_of == expected
    r = plot.marker_radius_px
    for k, label in enumerate(plot.labels):
        assert label.anchor == expected[label.text], label
        own = plot.markers_px[plot.points.index((label.text, *point_of[label.text]))]
        assert label.anchor_px == pytest.approx(own, abs=0.01), label
        others = [m for m in plot.markers_px if m != own]
        assert box_distance(label.box, own) >= r, f"{label.text} covers its own marker"
        assert all(box_distance(label.box, m) >= r for m in others), f"{label.text} covers a marker"
        for other in plot.labels[k + 1:]:
            a, b = label.box, other.box
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (label.text, other.text)
        nearest_other = min(box_distance(label.box, m) for m in others)
        assert label.leader or nearest_other >= 2 * box_distance(label.box, own), \
            f"{label.text} is as near another point as its own, without a leader line"


def test_the_evaluate_plot_names_the_front_at_its_own_points(tmp_path):
    rows = _evaluate_rows()
    plot = draw_accuracy_energy(rows, tmp_path / "all.png")
    assert (tmp_path / "all.png").read_bytes()[:4] == b"\x89PNG"
    # 14VP ties the cheaper CK5 and exact 8-bit the cheaper 125K: both dominated
    assert [label.text for label in plot.labels] == [
        "17QU", "17C8", "13QR", "QKX", "18DU", "FTA", "1AGV", "17KS", "12N4", "DM1", "NGR", "2HH", "CK5", "JQQ",
        "125K", "2P7"]
    _check_labels(plot, rows)
    assert plot.omitted == ["199Z", "96D", "EXZ", "PKY"]
    assert "no published power" in plot.caption and all(n in plot.caption for n in plot.omitted)


def test_the_sweep_plot_marks_the_mean_of_what_its_references_name(tmp_path):
    rows = _sweep_rows()
    references = mean_references(rows)
    assert references == [("exact 8-bit trials (mean of 2)", pytest.approx(3.675e6)),
                          ("all 4 trials' networks in FP32 (mean)", pytest.approx(10.85e6))]
    without_exact = mean_references([r for r in rows if r["multiplier"] != "exact"])
    assert without_exact[0] == ("all 2 trials' networks in exact 8-bit (mean)", pytest.approx(3.375e6))
    plot = draw_accuracy_energy(rows, tmp_path / "pareto.png", title="Sweep: 4 trials", references=references)
    assert [label.text for label in plot.labels] == ["17KS s0", "17KS s1", "exact 8-bit s0"]
    _check_labels(plot, rows)
    exact_line = plot.references[0][1]
    assert 3.60 < exact_line < 3.75  # between the two exact 8-bit points it averages


def test_labels_move_off_crowded_points_and_are_then_joined_by_a_line():
    """Eight points 6 px apart on a line: no name fits beside its own point, so each goes to a free spot with
    a leader line, over no marker and no other name."""
    anchors = [(200.0 + 6 * k, 200.0) for k in range(8)]
    spots = place_labels(anchors, [(30.0, 12.0)] * 8, anchors + [(100.0, 100.0)], (0, 0, 400, 400), radius=6.0)
    for k, (box, leader) in enumerate(spots):
        assert leader
        assert all(box_distance(box, m) >= 6.0 for m in anchors)
        for other, _ in spots[k + 1:]:
            assert box[2] <= other[0] or other[2] <= box[0] or box[3] <= other[1] or other[3] <= box[1]
    lone = place_labels([(100.0, 100.0)], [(30.0, 12.0)], anchors + [(100.0, 100.0)], (0, 0, 400, 400), 6.0)
    assert not lone[0][1] and box_distance(lone[0][0], (100.0, 100.0)) < 12  # a free point: right beside it
