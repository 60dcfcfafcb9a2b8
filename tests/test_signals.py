"""Signals at start-up: Ctrl-C or SIGTERM while the command imports, loads data and builds the network.

Each case starts the installed command as a subprocess, waits until its entry
point has installed its handlers (SIGTERM shows as caught in /proc), sends
the signal after a delay, and checks the house rule: exit 130 (SIGINT) or 143
(SIGTERM), one line saying so, no traceback, and no run folder unless a
checkpoint is really in it.
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

LAUNCH = "import sys; sys.argv[0] = 'approxdarts-np'; from approxdarts_np_cli.launch import main; main()"
# long enough to be still running when the latest signal lands (a run with a filled kernel cache
# starts in about two seconds)
SEARCH = ["search", "--epochs", "8", "--max-train-images", "64", "--channels", "4", "--layers", "3",
          "--batch-size", "16", "--threads", "1"]

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc to see the handlers")


def _command() -> list[str]:
    script = Path(sys.executable).parent / "approxdarts-np"
    return [str(script)] if script.is_file() else [sys.executable, "-c", LAUNCH]


def _catches(pid: int, signum: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(status.split("SigCgt:")[1].split()[0], 16)
    return bool(caught & (1 << (signum - 1)))


def _signal_after_start(args: list[str], signum: int, delay: float):
    proc = subprocess.Popen(_command() + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not _catches(proc.pid, signal.SIGTERM):
        assert proc.poll() is None and time.monotonic() < deadline, "the command never installed its handlers"
        time.sleep(0.002)
    time.sleep(delay)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


@pytest.mark.parametrize("signum, code, line", [(signal.SIGINT, 130, "interrupted (Ctrl-C)"),
                                                (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_signal_during_imports(tmp_path, signum, code, line):
    out = tmp_path / "out"
    rc, stdout, stderr = _signal_after_start(SEARCH + ["--output-dir", str(out)], signum, 0.0)
    assert rc == code, (rc, stderr)
    assert stderr.strip().splitlines() == [line], stderr
    assert not out.exists()


@pytest.mark.parametrize("delay", [0.4, 1.0, 2.0, 3.5])
def test_ctrl_c_while_the_command_starts(tmp_path, delay):
    """Wherever the Ctrl-C lands before the first checkpoint, the answer is one true line and exit 130."""
    out = tmp_path / "out"
    rc, stdout, stderr = _signal_after_start(SEARCH + ["--output-dir", str(out)], signal.SIGINT, delay)
    assert rc == 130, (rc, stderr)
    assert "Traceback" not in stderr + stdout
    said = [ln for ln in (stderr + stdout).splitlines() if "interrupted" in ln or "stopped" in ln or "abandoned" in ln]
    assert len(said) == 1, stdout + stderr
    assert len(stderr.strip().splitlines()) <= 1, stderr
    if (out / "checkpoint.h5").exists():
        assert "checkpoint" in said[0] and "nothing was written" not in said[0]
    else:
        assert said[0] in ("interrupted (Ctrl-C)", f"interrupted before the run started; nothing was written to {out}")
        assert not out.exists()
    if out.exists():
        shutil.rmtree(out)


def test_an_interrupt_a_callback_swallowed_stops_the_run_at_its_start(capsys):
    """Numba compiles through C callbacks; a KeyboardInterrupt raised inside one is dropped by Python. The
    entry point records it, keeps Python from printing it, and raises it again when the run starts."""
    import types

    from rich.console import Console

    from approxdarts_np_cli import launch
    from approxdarts_np_cli.progress import EpochProgress

    launch.PENDING.clear()
    try:
        with pytest.raises(KeyboardInterrupt):
            launch._interrupt(signal.SIGINT, None)
        launch._unraisable(types.SimpleNamespace(exc_value=KeyboardInterrupt(), exc_type=KeyboardInterrupt,
                                                 exc_traceback=None, err_msg=None, object=None))
        assert capsys.readouterr().err == ""
        with EpochProgress(Console(file=None, quiet=True)) as progress, pytest.raises(KeyboardInterrupt):
            progress({"event": "start", "epochs": 1, "steps_per_epoch": 1, "epoch": 0, "step": 0, "parameters": 1})
    finally:
        launch.PENDING.clear()
    with EpochProgress(Console(quiet=True)) as progress:  # nothing pending: the run starts
        progress({"event": "start", "epochs": 1, "steps_per_epoch": 1, "epoch": 0, "step": 0, "parameters": 1})
