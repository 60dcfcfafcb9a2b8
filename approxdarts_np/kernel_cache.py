"""Where Numba keeps the compiled kernels (``cache=True``) when the package folder is not writable.

Numba caches a kernel beside its source file (``__pycache__``) or, when that
folder is not writable, in the user's cache folder (``~/.cache/numba`` or
``$XDG_CACHE_HOME/numba``). When neither works -- a package installed by
root and run by a user without a home, such as ``nobody`` with
``HOME=/nonexistent`` -- Numba refuses to decorate the kernel at all
("cannot cache function ...: no locator available"), so every command would
fail at import. :func:`choose_cache_dir` runs before any kernel module is
imported and, only in that case and only when ``NUMBA_CACHE_DIR`` is unset,
points ``NUMBA_CACHE_DIR`` at a private per-user folder in the temporary
directory (``approxdarts-np-<uid>/numba-cache``, created with mode 0700 and
used only when it is owned by this user and writable by no one else, since
Numba's cache files are pickles). If that folder cannot be used, a fresh
private folder for this process serves, removed at exit: the kernels are then
compiled anew by every process. The returned note says which one was taken.
"""
from __future__ import annotations

import atexit
import os
import shutil
import stat
import tempfile
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def _writable(folder: Path) -> bool:
    """Numba's own test: the folder can be made and a file created in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError:
        return False
    return True


def _private_folder(folder: Path) -> bool:
    """``folder`` exists (or is made) as a real directory of this user that no one else can write."""
    try:
        folder.parent.mkdir(mode=0o700, exist_ok=True)
        folder.mkdir(mode=0o700, exist_ok=True)
        for path in (folder.parent, folder):
            info = path.lstat()
            if not stat.S_ISDIR(info.st_mode) or info.st_mode & 0o022:
                return False
            if hasattr(os, "getuid") and info.st_uid != os.getuid():
                return False
    except OSError:
        return False
    return _writable(folder)


def _in_tree_writable() -> bool:
    """Every package folder can hold a ``__pycache__`` Numba may write to."""
    folders = [PACKAGE] + [p for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()]
    return all(_writable(folder / "__pycache__") for folder in folders)


def _user_wide_writable() -> bool:
    from numba.misc.appdirs import AppDirs  # Numba's own rule for its user-wide cache folder

    return _writable(Path(AppDirs(appname="numba", appauthor=False).user_cache_dir))


def choose_cache_dir() -> str | None:
    """Set ``NUMBA_CACHE_DIR`` when Numba would find no cache folder; a one-line note saying so, else None."""
    if os.environ.get("NUMBA_CACHE_DIR") or _in_tree_writable() or _user_wide_writable():
        return None
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    shared = Path(tempfile.gettempdir()) / f"approxdarts-np-{uid}" / "numba-cache"
    if _private_folder(shared):
        folder, how = shared, "caching them in"
    else:
        try:
            folder = Path(tempfile.mkdtemp(prefix="approxdarts-np-numba-"))
        except OSError:
            return None  # nowhere to write: Numba's own error stands
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        how = f"{shared} is not a private folder of this user, so compiling them anew in every process, in"
    os.environ["NUMBA_CACHE_DIR"] = str(folder)
    from numba.core import config

    config.reload_config()
    return (f"note: Numba cannot cache compiled kernels in {PACKAGE} (not writable) nor in the user's cache "
            f"folder; {how} {folder} (set NUMBA_CACHE_DIR to choose a folder)")
