"""Output a person reads: the plots' labels and fronts, lines that fit 80 columns, progress in a log file,
messages that say what is wrong.

The plot tests draw from hand-made points and check the labels through what
was drawn (each name's anchor, text box and leader line read back from the
figure). The command-line tests share one child process that runs search,
train, evaluate and energy with COLUMNS=80 and its output going to files, as in
a log or a cluster job (one process, so the kernels are compiled once).
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
from rich.console import Console
from typer.testing import CliRunner

from approxdarts_np.runs.plots import box_distance, draw_accuracy_energy, mean_references, pareto_front, place_labels
from approxdarts_np_cli.main import app
from approxdarts_np_cli.progress import EpochProgress, LineSchedule
from approxdarts_np_cli.text import plural, wrap_listing, wrap_parts

runner = CliRunner()
WIDTH = 80


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
    """An ``evaluate --arithmetic all``-like table with the crowding of issue #24."""
    rows = [{"arithmetic": "none", "test_acc": 0.716, "energy_pj": 11.15e6},
            {"arithmetic": "exact", "test_acc": 0.712, "energy_pj": 3.601e6}]
    for name, acc, energy in [
            ("1AGV", 0.690, 3.275), ("17KS", 0.692, 3.285),  # close on both axes
            ("14VP", 0.711, 3.570), ("JQQ", 0.7115, 3.576), ("CK5", 0.711, 3.550),  # 14VP ties the cheaper CK5
            ("13QR", 0.610, 3.179), ("QKX", 0.612, 3.201), ("17QU", 0.550, 3.1717), ("17C8", 0.560, 3.1719),
            ("18DU", 0.665, 3.204), ("FTA", 0.685, 3.263), ("12N4", 0.701, 3.327), ("DM1", 0.706, 3.385),
            ("NGR", 0.709, 3.474), ("2HH", 0.7095, 3.503), ("YX7", 0.600, 3.238), ("L40", 0.66, 3.378),
            ("125K", 0.712, 3.596), ("2P7", 0.7125, 3.597), ("KEM", 0.7105, 3.578)]:
        rows.append({"arithmetic": f"mul8u_{name}", "test_acc": acc, "energy_pj": energy * 1e6})
    rows += [{"arithmetic": f"mul8u_{name}", "test_acc": 0.70, "energy_pj": None}
             for name in ("199Z", "96D", "EXZ", "PKY")]
    return rows


def _sweep_rows() -> list[dict]:
    """A sweep's rows: four networks (two exact 8-bit, two approximate) and their own exact/FP32 prices."""
    rows = []
    for multiplier, seed, acc, energy, exact8, fp32 in [
            ("exact", 0, 0.71, 3.60e6, 3.60e6, 11.1e6), ("exact", 1, 0.70, 3.75e6, 3.75e6, 11.6e6),
            ("mul8u_17KS", 0, 0.68, 3.05e6, 3.35e6, 10.2e6), ("mul8u_17KS", 1, 0.70, 3.10e6, 3.40e6, 10.5e6)]:
        short = "exact 8-bit" if multiplier == "exact" else multiplier.removeprefix("mul8u_")
        rows.append({"arithmetic": multiplier, "seed": seed, "accuracy": acc, "energy_pj": energy,
                     "energy_exact8_pj": exact8, "energy_fp32_pj": fp32, "label": f"{short} s{seed}"})
    return rows


def _check_labels(plot, rows) -> None:
    """Every name sits at its own point: anchored there, not over any marker or other name, and either
    clearly nearer its point than any other marker or joined to it by a leader line."""
    point_of = {p[0]: (p[1], p[2]) for p in plot.points}
    expected = {(r.get("label") or r["arithmetic"].replace("mul8u_", "").replace("exact", "exact 8-bit")):
                (r["energy_pj"] / 1e6, 100 * r.get("accuracy", r.get("test_acc"))) for r in rows
                if r["energy_pj"] is not None and r["arithmetic"] != "none"}
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
    without_exact = mean_references([r for r in rows if r["arithmetic"] != "exact"])
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


# ----------------------------------------------------------------- text helpers and progress
def test_plural_and_wrapping():
    assert [plural(1, "epoch"), plural(2, "epoch"), plural(1017, "image")] == ["1 epoch", "2 epochs", "1,017 images"]
    assert wrap_parts(["a" * 30, "b" * 30, "c" * 30], 70) == ["a" * 30 + "  " + "b" * 30, "  " + "c" * 30]
    genotype = "Genotype(normal=[('sep_conv_3x3', 0), ('max_pool_3x3', 1)], normal_concat=range(2, 6))"
    lines = wrap_listing(genotype, 50, first="genotype: ")
    assert lines == ["genotype: Genotype(normal=[('sep_conv_3x3', 0),", "  ('max_pool_3x3', 1)], normal_concat=range(2, 6))"]
    assert " ".join(line.strip() for line in lines) == "genotype: " + genotype


def test_plain_progress_lines_come_after_the_first_step_then_every_30_s_and_2_percent():
    now = [0.0]
    schedule = LineSchedule(clock=lambda: now[0])
    assert not schedule.due(0, 1000)
    assert schedule.due(1, 1000)  # the first step, whatever the time
    now[0] = 100.0
    assert not schedule.due(20, 1000)  # 100 s but only 1.9 % since the last line
    assert schedule.due(21, 1000)
    now[0] = 129.0
    assert not schedule.due(900, 1000)  # 88 % but 29 s
    now[0] = 131.0
    assert schedule.due(900, 1000)
    assert schedule.remaining(900, 1000) == pytest.approx(131.0 / 899 * 100)


def _ansi_free_lines(text: str) -> list[str]:
    return [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", line) for line in text.replace("\r", "\n").split("\n")]


def test_the_terminal_bar_keeps_its_counts_and_times_whole_at_80_columns():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=WIDTH, color_system=None)
    with EpochProgress(console, "search", header="search → runs/search") as progress:
        progress({"event": "start", "epochs": 50, "steps_per_epoch": 390, "epoch": 0, "step": 0, "parameters": 1})
        for step in (1, 65):
            progress({"event": "step", "epoch": 11, "step": step, "train_loss": 1.23456, "train_acc": 0.4567,
                      "elapsed": 12345.0})
        progress({"event": "epoch", "epoch": 12, "train_loss": 1.2345, "train_acc": 0.5520, "val_loss": 1.3,
                  "val_acc": 0.521, "elapsed_s": 12345.0, "genotype": "Genotype(normal=[" + "('sep_conv_3x3', 0), " * 8
                  + "], normal_concat=range(2, 6))"})
    lines = _ansi_free_lines(out.getvalue())
    assert max(map(len, lines)) <= WIDTH, max(lines, key=len)
    assert "…" not in out.getvalue()
    assert any("4355/19500" in line and "ETA" in line for line in lines), lines
    assert any("epoch 12/50 step 65/390" in line for line in lines)


# ----------------------------------------------------------------- the commands at 80 columns, into files
DRIVER = textwrap.dedent("""
    import json, os, sys
    sys.argv = ["approxdarts-np"]
    from approxdarts_np_cli.launch import main
    codes = {}
    for name, args in json.loads(os.environ["COMMANDS"]):
        with open(name + ".out", "w") as out, open(name + ".err", "w") as err:
            sys.stdout.flush(); sys.stderr.flush()
            os.dup2(out.fileno(), 1); os.dup2(err.fileno(), 2)
            sys.argv = ["approxdarts-np", *args]
            try:
                main()
                codes[name] = 0
            except SystemExit as exc:
                codes[name] = exc.code or 0
            sys.stdout.flush(); sys.stderr.flush()
    with open("codes.json", "w") as f:
        json.dump(codes, f)
""")
TINY = ["--epochs", "1", "--channels", "2", "--layers", "3", "--batch-size", "4", "--threads", "1"]


@pytest.fixture(scope="module")
def transcript(tmp_path_factory):
    """stdout and stderr of search, train, evaluate and energy run with COLUMNS=80 into files (not a
    terminal), in one child process; {name: (exit code, stdout, stderr)} and the folder."""
    root = tmp_path_factory.mktemp("output")
    commands = [
        ("search", ["search", "--output-dir", "s", "--max-train-images", "16", *TINY]),
        ("train", ["train", "--genotype", "s/genotype.json", "--output-dir", "t", "--max-train-images", "8", *TINY]),
        ("evaluate", ["evaluate", "--checkpoint", "t/checkpoint.h5", "--arithmetic", "none", "--batch-size", "500"]),
        ("energy", ["energy", "--genotype", "DARTS_V2", "--per-layer", "--arithmetic", "mul8u_17KS"]),
    ]
    env = {**os.environ, "COLUMNS": str(WIDTH), "COMMANDS": json.dumps(commands)}
    subprocess.run([sys.executable, "-c", DRIVER], cwd=root, env=env, check=True, timeout=600,
                   stdin=subprocess.DEVNULL)
    codes = json.loads((root / "codes.json").read_text())
    return {name: (codes[name], (root / f"{name}.out").read_text(), (root / f"{name}.err").read_text())
            for name, _ in commands}, root


def test_every_line_fits_80_columns(transcript):
    outputs, _ = transcript
    for name, (code, out, err) in outputs.items():
        assert code == 0, (name, out, err)
        lines = (out + err).splitlines()
        wide = [line for line in lines if len(line) > WIDTH]
        assert not wide, (name, wide)
        assert "…" not in out + err, name  # nothing cut to fit
        assert not [line for line in lines if re.fullmatch(r"\s*\d+ s", line)], (name, "a time on its own line")
    # the longest layer names of the 20-cell network, whole on their lines
    assert re.search(r"^cells\.items\.19\.ops\.items\.0\.second\.depthwise ", outputs["energy"][1], re.M)


def test_a_run_into_a_file_prints_progress_before_its_first_epoch_ends(transcript):
    outputs, _ = transcript
    for name in ("search", "train"):
        lines = outputs[name][1].splitlines()
        assert lines[0] == f"{name} → {'s' if name == 'search' else 't'}", lines
        progress = next(i for i, line in enumerate(lines) if line.startswith(f"{name} 1/2 steps"))
        epoch = next(i for i, line in enumerate(lines) if line.startswith("epoch 1/1"))
        assert progress < epoch, lines
        assert any(line.startswith("done: 1 epoch in ") for line in lines), lines
    evaluate = outputs["evaluate"][1]
    assert evaluate.splitlines()[0].startswith("evaluate none (1/1)  batch 1/3"), evaluate


def test_messages_say_what_is_wrong(transcript, tmp_path):
    _, root = transcript
    result = runner.invoke(app, ["evaluate", "--checkpoint", str(root / "s" / "checkpoint.h5")])
    assert result.exit_code == 2
    assert "is a search checkpoint; evaluate needs a train checkpoint" in result.stderr, result.stderr
    # the settings are checked before the folder is announced
    result = runner.invoke(app, ["search", "--output-dir", str(tmp_path / "x"), "--max-train-images", "16",
                                 "--batch-size", "16", "--epochs", "1"])
    assert result.exit_code == 2 and "larger than each half" in result.stderr
    assert "search →" not in result.stdout, result.stdout
    result = runner.invoke(app, ["energy", "--genotype", "DARTS_V2", "--channels", "1", "--layers", "3"])
    assert result.exit_code == 0 and "network: 3 cells, 1 channel, " in result.stdout, result.stdout


def test_data_info_breaks_after_a_long_folder_name(tmp_path, monkeypatch):
    from approxdarts_np.data.cifar import default_data_dir

    folder = tmp_path / ("a-long-folder-name-" * 3) / "cifar10_sample"
    shutil.copytree(default_data_dir(), folder)
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    result = runner.invoke(app, ["data", "info", "--data-dir", str(folder)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[:2] == [f"{folder}:", "  5,085 training and 1,017 test images"], lines
