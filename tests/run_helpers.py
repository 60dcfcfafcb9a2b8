"""What the run tests share: a real Ctrl-C at a chosen step, and metrics compared without their times."""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path


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
