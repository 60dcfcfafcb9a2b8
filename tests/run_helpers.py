"""What the run tests share: a real Ctrl-C at a chosen step, metrics compared without their times, and how close
the state of a search split over replicas must be to the same search in one process."""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np


def ctrl_c_at(step: int, epoch: int | None = None):
    """A progress callback that sends this process a real SIGINT once ``step`` steps of ``epoch`` (any) are done."""
    def progress(event):
        if event["event"] == "step" and event["step"] == step and (epoch is None or event["epoch"] == epoch):
            os.kill(os.getpid(), signal.SIGINT)
    return progress


def metrics_without_times(out: Path) -> list[dict]:
    """The lines of a run's metrics.jsonl without ``elapsed_s`` (the one field a resume may change)."""
    return [{k: v for k, v in json.loads(line).items() if k != "elapsed_s"}
            for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def copy_run(runs: Path, kind: str, tmp_path: Path) -> Path:
    """A copy of the run folder ``runs/kind`` under ``tmp_path`` (cases may damage it)."""
    dest = tmp_path / kind
    shutil.copytree(runs / kind, dest)
    return dest


def one_error_line(result, *fragments) -> str:
    """The one ``error:`` line of a CLI result that exited with code 2, after checking there is no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ‖difference‖ / ‖values‖ after the steps, per kind. The float search differs from one process only by
# the order of float additions: about 1e-9 after one step, which later steps amplify unevenly (a ReLU or
# max-pool decision that flips; Adam turning the sign of a near-zero α gradient into a step of ±lr on α
# entries of size ~1e-3): after three steps 7e-9 to 1e-5 on the weights and 4e-8 to 2e-6 on the running
# statistics in the cases of tests/test_replicas.py, so the bounds leave a factor of 10. Second order
# divides float32 differences by 2ε of its finite difference. In 8 bit one step is compared: a zero point
# that moves by one code when a range differs in its last bit changes every code of a tensor (and so,
# with an approximate table, the products), so later steps of two bit-different runs drift apart as two
# thread counts' do. Every wrong split tried (tests/test_replicas.py) misses these by 25x or more.
FLOAT = {"alpha": 5e-3, "weights": 1e-4, "running": 1e-5}
SECOND_ORDER = {"alpha": 5e-2, "weights": 1e-4, "running": 1e-5}
ONE_8BIT_STEP = {"alpha": 1e-5, "weights": 1e-6, "running": 1e-6}


def _kind(name: str) -> str:
    if name.startswith(("alphas", "betas")):
        return "alpha"
    return "running" if "running" in name else "weights"


def relative_errors(ref: dict, got: dict) -> dict[str, float]:
    """‖difference‖ / ‖values‖ of two models' state dicts, per kind: "alpha" (α and β), "weights", "running"."""
    sums: dict = {}
    assert ref.keys() == got.keys()
    for name in ref:
        a, b = np.asarray(ref[name], np.float64), np.asarray(got[name], np.float64)
        diff, size = sums.setdefault(_kind(name), [0.0, 0.0])
        sums[_kind(name)] = [diff + float(((a - b) ** 2).sum()), size + float((a ** 2).sum())]
    return {kind: (d / s) ** 0.5 for kind, (d, s) in sums.items()}


def within(errors: dict, bounds: dict) -> bool:
    return all(errors[kind] <= bounds[kind] for kind in bounds)
