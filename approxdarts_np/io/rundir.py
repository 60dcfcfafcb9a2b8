"""The output folder of a run (search or training): its files, its lock, and the rules for starting and resuming.

One process owns a run folder at a time. The owner holds an exclusive
``flock`` on ``.lock`` in the folder for as long as it runs; the lock file
names the holder (pid, host, start time) so that a second run can say who
has it. The kernel drops the lock when the process ends, however it ends, so
a lock file left by a killed run never blocks the next one.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from approxdarts_np.errors import UserError
from approxdarts_np.io.checkpoint import WriteError

CHECKPOINT = "checkpoint.h5"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
LOCK = ".lock"


def saved_config(folder: str | Path) -> dict:
    """The config a run saved in ``folder``; UserError when there is no run to resume there."""
    folder = Path(folder)
    if not (folder / CHECKPOINT).is_file() or not (folder / CONFIG).is_file():
        raise UserError(f"{folder} holds no run to resume ({CONFIG} and {CHECKPOINT} expected)")
    try:
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{folder / CONFIG} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise UserError(f"{folder / CONFIG} does not hold a run's settings (expected a JSON object)")
    return config


def refuse_existing_run(folder: str | Path) -> None:
    """UserError when ``folder`` already holds a run (a fresh run must not overwrite it)."""
    folder = Path(folder)
    if (folder / CHECKPOINT).exists() or (folder / CONFIG).exists():
        raise UserError(f"{folder} already holds a run; resume it with --resume {folder} "
                        f"or choose another --output-dir")


class RunFolder:
    """Context manager: create (fresh run) or open (resume) a run folder and hold its lock.

    A fresh run that fails before writing anything but the lock leaves no
    folder behind if it created it.
    """

    def __init__(self, path: str | Path, fresh: bool):
        self.path = Path(path)
        self.fresh = fresh
        self._fd: int | None = None
        self._created = False

    def __enter__(self) -> "RunFolder":
        if self.fresh:
            if self.path.exists() and not self.path.is_dir():
                raise UserError(f"--output-dir {self.path} is a file, not a folder")
            try:
                self._created = not self.path.exists()
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UserError(f"cannot write to the output folder {self.path}: {exc.strerror or exc}") from None
        elif not self.path.is_dir():
            raise UserError(f"{self.path} is not a run folder")
        self._lock()
        try:
            if self.fresh:
                refuse_existing_run(self.path)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _lock(self) -> None:
        lock_path = self.path / LOCK
        while True:
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:
                if self._created:
                    _remove_empty(self.path)
                raise UserError(f"cannot write to the output folder {self.path}: {exc.strerror or exc}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_holder(fd)
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                    raise UserError(f"{self.path} is in use by another run ({holder}); wait for it to "
                                    f"finish or choose another --output-dir") from None
                raise UserError(f"cannot lock the output folder {self.path}: {exc.strerror or exc}") from None
            # The holder before us may have removed the file between our open and our lock: retry then.
            try:
                same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        try:
            os.ftruncate(fd, 0)
            os.write(fd, info.encode())
        except OSError as exc:
            os.close(fd)
            raise WriteError(f"cannot write to the output folder {self.path}: {exc.strerror or exc}") from None
        self._fd = fd

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path / LOCK)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
        if self._created:
            _remove_empty(self.path)


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "holder unknown"


def _remove_empty(folder: Path) -> None:
    try:
        folder.rmdir()  # only succeeds when nothing was written
    except OSError:
        pass


class RunClock:
    """Seconds spent on a run over all its sessions (resumes add to what was saved)."""

    def __init__(self, before: float = 0.0):
        self.start, self.before = time.perf_counter(), float(before)

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.start
