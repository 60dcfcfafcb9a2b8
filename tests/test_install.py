"""An install the user cannot write to: the package installed by root, run by a user without a home.

Numba's ``cache=True`` needs a writable folder; without one every command died
at import ("cannot cache function ...: no locator available"). The package is
copied into a read-only folder and run as ``nobody`` (through ``setpriv``) with
``HOME=/nonexistent``, or, when the tests do not run as root, as the current
user with the copy made unwritable.
"""
from __future__ import annotations

import os
import shutil
import site
import stat
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import pytest

import approxdarts_np
import approxdarts_np_cli

LAUNCH = "import sys; sys.argv[0] = 'approxdarts-np'; from approxdarts_np_cli.launch import main; main()"
NOBODY = 65534


def _as_user_prefix() -> list[str]:
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: cannot run the command as an unprivileged user")
    return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


def _interpreter(prefix: list[str], env: dict) -> str:
    """This Python, or the system's Python of the same version when the unprivileged user cannot run this one."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (sys.executable, f"/usr/bin/{version}", f"/usr/local/bin/{version}"):
        if not os.path.exists(candidate):
            continue
        probe = subprocess.run(prefix + [candidate, "-c", "import numba, h5py, typer, rich, scipy"],
                               env=env, capture_output=True, cwd="/")
        if probe.returncode == 0:
            return candidate
    pytest.skip("no Python the unprivileged user can run with this environment's packages")


@pytest.fixture(scope="module")
def readonly_install():
    """(command prefix, environment, a folder the running user may write to) for the read-only copy."""
    root = Path(tempfile.mkdtemp(prefix="approxdarts-ro-"))
    try:
        root.chmod(0o755)
        pkg = root / "pkg"
        ignore = shutil.ignore_patterns("__pycache__", "*.nbi", "*.nbc", "*.pyc")
        shutil.copytree(Path(approxdarts_np.__file__).parent, pkg / "approxdarts_np", ignore=ignore)
        shutil.copytree(Path(approxdarts_np_cli.__file__).parent, pkg / "approxdarts_np_cli", ignore=ignore)
        for path in [pkg, *pkg.rglob("*")]:
            path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        work = root / "work"
        work.mkdir()
        prefix = _as_user_prefix()
        if prefix:
            os.chown(work, NOBODY, NOBODY)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent", "TMPDIR": str(work),
               "PYTHONPATH": os.pathsep.join([str(pkg), *site.getsitepackages()]), "OMP_NUM_THREADS": "1"}
        python = _interpreter(prefix, env)
        assert not os.path.exists("/nonexistent")
        yield prefix + [python, "-c", LAUNCH], env, work
    finally:
        for path in [root, *root.rglob("*")]:
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)
        shutil.rmtree(root, ignore_errors=True)


def test_version_from_a_readonly_install(readonly_install):
    command, env, work = readonly_install
    result = subprocess.run(command + ["--version"], env=env, capture_output=True, text=True, cwd="/", timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == version("approxdarts-np")
    notes = result.stderr.strip().splitlines()
    assert len(notes) == 1 and notes[0].startswith("note: Numba cannot cache"), result.stderr
    assert str(work / f"approxdarts-np-{NOBODY if os.geteuid() == 0 else os.getuid()}" / "numba-cache") in notes[0]


@pytest.mark.slow
def test_search_from_a_readonly_install(readonly_install):
    command, env, work = readonly_install
    out = work / "run"
    args = ["search", "--epochs", "1", "--max-train-images", "64", "--channels", "4", "--layers", "3",
            "--batch-size", "16", "--threads", "1", "--output-dir", str(out)]
    result = subprocess.run(command + args, env=env, capture_output=True, text=True, cwd="/", timeout=1800)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert (out / "genotype.json").is_file() and (out / "checkpoint.h5").is_file()
    cache = next(work.glob("approxdarts-np-*")) / "numba-cache"
    assert list(cache.rglob("*.nbi")), "the kernels were not cached in the fallback folder"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700


@pytest.mark.parametrize("planted", ["world-writable", "symlink"])
def test_fallback_cache_refuses_a_folder_others_could_plant(tmp_path, monkeypatch, planted):
    """Numba's cache files are pickles: a shared folder someone else could write must not be used."""
    from numba.core import config

    from approxdarts_np import kernel_cache

    monkeypatch.setattr(kernel_cache, "_in_tree_writable", lambda: False)
    monkeypatch.setattr(kernel_cache, "_user_wide_writable", lambda: False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    shared = tmp_path / f"approxdarts-np-{os.getuid()}"
    if planted == "world-writable":
        (shared / "numba-cache").mkdir(parents=True)
        (shared / "numba-cache").chmod(0o777)
    else:
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        shared.mkdir(mode=0o700)
        (shared / "numba-cache").symlink_to(tmp_path / "elsewhere")
    try:
        note = kernel_cache.choose_cache_dir()
        chosen = Path(os.environ["NUMBA_CACHE_DIR"])
        assert "compiling them anew" in note and str(chosen) in note
        assert chosen.parent == tmp_path and chosen.name.startswith("approxdarts-np-numba-")
        assert stat.S_IMODE(chosen.stat().st_mode) == 0o700
    finally:
        monkeypatch.undo()
        config.reload_config()


def test_fallback_cache_not_used_when_numba_has_a_folder(monkeypatch):
    from approxdarts_np import kernel_cache

    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setattr(kernel_cache, "_in_tree_writable", lambda: True)
    assert kernel_cache.choose_cache_dir() is None and "NUMBA_CACHE_DIR" not in os.environ
    monkeypatch.setenv("NUMBA_CACHE_DIR", "/somewhere")
    monkeypatch.setattr(kernel_cache, "_in_tree_writable", lambda: False)
    assert kernel_cache.choose_cache_dir() is None and os.environ["NUMBA_CACHE_DIR"] == "/somewhere"
