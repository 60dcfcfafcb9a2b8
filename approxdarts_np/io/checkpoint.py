"""Checkpoints and result files, written atomically (temporary file in the same folder, then rename).

A checkpoint is a nested tree of dicts, lists, arrays, numbers and strings
stored as one HDF5 file: dicts become groups, lists become groups with keys
``0, 1, ...`` and a ``list`` attribute, arrays become datasets, scalars and
strings become attributes. A reader opening the file with ``h5py`` or
``h5dump`` sees the same names.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import h5py
import numpy as np

_LIST = "__list__"
_JSON = "__json__:"


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(temp_path)`` and move the result onto ``path`` only if it succeeded."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_tree(path: str | Path, tree: dict) -> None:
    """Write ``tree`` to the HDF5 file ``path`` atomically."""
    def write(tmp):
        with h5py.File(tmp, "w") as f:
            _write_group(f, tree)
    atomic_write(path, write)


def load_tree(path: str | Path) -> dict:
    """Read a tree written by :func:`save_tree`."""
    with h5py.File(path, "r") as f:
        return _read_group(f)


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
