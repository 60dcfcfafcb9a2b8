"""Ray nodes started with `ray start` on this machine, for the tests that need a real cluster (sweep, workers)."""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

MARK = "APPROXDARTS_TEST_RAY_NODE"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def installed(name: str) -> str:
    script = Path(sys.executable).parent / name
    found = str(script) if script.is_file() else shutil.which(name)
    assert found, f"{name} is not installed next to {sys.executable}"
    return found


class Cluster:
    """Ray nodes started with `ray start` on this machine; every process of node NAME has MARK=<tag>-NAME."""

    def __init__(self, root: Path):
        self.root = root
        self.tag = secrets.token_hex(6)
        self.address = f"127.0.0.1:{_free_port()}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "TUNE_"))}
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0",
                        # the head declares a silent node dead after 3 missed checks of 1 s (default: 5 of 3 s)
                        RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3")

    def node_env(self, name: str) -> dict:
        return dict(self.env, **{MARK: f"{self.tag}-{name}"})

    def start(self, name: str, *args: str) -> None:
        temp = self.root / name
        temp.mkdir()
        command = [installed("ray"), "start", "--num-cpus=1", f"--temp-dir={temp}", "--disable-usage-stats",
                   f"--dashboard-agent-listen-port={_free_port()}", *args]
        done = subprocess.run(command, env=self.node_env(name), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    def start_head(self) -> None:
        port = self.address.rpartition(":")[2]
        self.start("head", "--head", f"--port={port}", "--include-dashboard=false", f"--dashboard-port={_free_port()}")

    def add_node(self, name: str) -> None:
        self.start(name, f"--address={self.address}")

    def pids(self, name: str | None = None) -> set[int]:
        """The processes of node ``name`` (of every node when None)."""
        want = f"{MARK}={self.tag}-{name or ''}".encode()
        found = set()
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                environ = (proc / "environ").read_bytes().split(b"\0")
            except OSError:  # ended meanwhile, or not ours to read
                continue
            if any(var == want if name else var.startswith(want) for var in environ):
                found.add(int(proc.name))
        return found

    def running(self, name: str, title: bytes) -> int | None:
        """A process of node ``name`` whose title (Ray titles a worker after the method it runs, e.g.
        ``ray::ImplicitFunc.train`` for a Tune trial) starts with ``title``, or None."""
        for pid in self.pids(name):
            try:
                if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(title):
                    return pid
            except OSError:
                pass
        return None

    def running_trial(self, name: str) -> int | None:
        """A process of node ``name`` that runs a Tune trial, or None."""
        return self.running(name, b"ray::ImplicitFunc.train")

    def kill(self, name: str | None = None) -> None:
        """SIGKILL every process of node ``name`` (of every node when None) and wait until they are gone."""
        deadline = time.monotonic() + 30
        while pids := self.pids(name):
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            assert time.monotonic() < deadline, f"processes {sorted(pids)} outlived SIGKILL"
            time.sleep(0.05)
