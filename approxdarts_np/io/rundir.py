"""The output folder of a run (search or training): its config, checkpoint, and the resume rules."""
from __future__ import annotations

import json
import time
from pathlib import Path

from approxdarts_np.errors import UserError

CHECKPOINT = "checkpoint.h5"
CONFIG = "config.json"


def saved_config(folder: str | Path) -> dict:
    """The config a run saved in ``folder``; UserError when there is no run to resume there."""
    folder = Path(folder)
    if not (folder / CHECKPOINT).is_file() or not (folder / CONFIG).is_file():
        raise UserError(f"{folder} holds no run to resume ({CONFIG} and {CHECKPOINT} expected)")
    try:
        return json.loads((folder / CONFIG).read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{folder / CONFIG} is not valid JSON: {exc}") from None


def refuse_existing_run(folder: str | Path) -> None:
    """UserError when ``folder`` already holds a run (a fresh run must not overwrite it)."""
    folder = Path(folder)
    if (folder / CHECKPOINT).exists():
        raise UserError(f"{folder} already holds a run; resume it with --resume {folder} "
                        f"or choose another --output-dir")


def prepare_output_dir(folder: str | Path) -> Path:
    """Create ``folder`` and check that it is writable; UserError otherwise."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to the output folder {folder}: {exc.strerror or exc}") from None
    return folder


class RunClock:
    """Seconds spent on a run over all its sessions (resumes add to what was saved)."""

    def __init__(self, before: float = 0.0):
        self.start, self.before = time.perf_counter(), float(before)

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.start
