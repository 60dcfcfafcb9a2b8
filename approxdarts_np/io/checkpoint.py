"""Checkpoints and result files, written atomically (temporary file in the same folder, then rename).

A checkpoint is a nested tree of dicts, lists, arrays, numbers and strings
stored as one HDF5 file: dicts become groups, lists become groups with keys
``0, 1, ...`` and a ``list`` attribute, arrays become datasets, scalars and
strings become attributes. A reader opening the file with ``h5py`` or
``h5dump`` sees the same names.

Failure model. Every file is first written in full to ``.NAME.PID.RANDOM.tmp``
beside its target, flushed to disk, then renamed over the target, so a reader
sees either the old or the new file, never half of one. HDF5 files are built
in memory and written with plain ``os.write`` calls: a full disk then raises
an ``OSError`` here (HDF5's own writer has been seen to crash the process on
``ENOSPC``). Any write failure removes the temporary file and raises
:class:`WriteError` (a :class:`~approxdarts_np.errors.UserError`: one line,
exit code 2). Files are created with mode 0666 filtered by the user's umask,
like any file a program creates.
"""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from approxdarts_np.errors import UserError

_LIST = "__list__"
_JSON = "__json__:"


class WriteError(UserError):
    """A result or checkpoint file could not be written (full disk, permissions, missing folder)."""


class ReadError(UserError):
    """A checkpoint or tree file is missing, truncated or not HDF5."""


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename; WriteError (nothing left behind) on failure."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
    except OSError as exc:
        raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    """Make the rename itself durable (best effort: not every file system lets a folder be fsync'ed)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def tree_to_bytes(tree: dict) -> bytes:
    """The HDF5 file image of ``tree`` (built in memory)."""
    name = f"approxdarts-np-{os.getpid()}-{secrets.token_hex(4)}.h5"
    with h5py.File(name, "w", driver="core", backing_store=False) as f:
        _write_group(f, tree)
        f.flush()
        return f.id.get_file_image()


def save_tree(path: str | Path, tree: dict) -> None:
    """Write ``tree`` to the HDF5 file ``path`` atomically."""
    atomic_write_bytes(path, tree_to_bytes(tree))


def load_tree(path: str | Path) -> dict:
    """Read a tree written by :func:`save_tree`; ReadError when the file is missing or not a whole HDF5 file."""
    path = Path(path)
    if not path.is_file():
        raise ReadError(f"{path} does not exist")
    try:
        with h5py.File(path, "r") as f:
            return _read_group(f)
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        reason = "empty file" if path.stat().st_size == 0 else str(exc).splitlines()[0]
        raise ReadError(f"{path} is not a readable checkpoint (truncated or not HDF5: {reason})") from None


def _write_group(group: h5py.Group, tree: dict) -> None:
    for key, value in tree.items():
        key = str(key)
        if isinstance(value, dict):
            _write_group(group.create_group(key), value)
        elif isinstance(value, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in value):
            sub = group.create_group(key)
            sub.attrs[_LIST] = len(value)
            _write_group(sub, {str(i): v for i, v in enumerate(value)})
        elif isinstance(value, np.ndarray):
            group.create_dataset(key, data=value)
        elif isinstance(value, (list, tuple)) and any(isinstance(v, str) for v in value):
            group.attrs[key] = _JSON + json.dumps(list(value))
        elif isinstance(value, (list, tuple)):
            group.create_dataset(key, data=np.asarray(value))
            group[key].attrs[_LIST] = len(value)
        elif value is None:
            group.attrs[key] = "__none__"
        else:
            group.attrs[key] = value


def _read_group(group: h5py.Group):
    out: dict[str, Any] = {}
    for key, value in group.attrs.items():
        if key == _LIST:
            continue
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, str) and value == "__none__":
            value = None
        elif isinstance(value, str) and value.startswith(_JSON):
            value = json.loads(value[len(_JSON):])
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    for key, item in group.items():
        if isinstance(item, h5py.Group):
            out[key] = _read_group(item)
        else:
            arr = item[()]
            out[key] = arr.tolist() if _LIST in item.attrs else arr
    if _LIST in group.attrs:
        return [out[str(i)] for i in range(int(group.attrs[_LIST]))]
    return out
