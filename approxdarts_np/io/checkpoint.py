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

Integrity. Every non-empty array is stored with HDF5's Fletcher32 filter (a
flipped bit in its raw data fails the read) and carries a ``sha256``
attribute: the SHA-256 of its dtype, shape and bytes, which an edit through
h5py (that rewrites the Fletcher32 sum) does not update. The root carries
``tree_sha256``, a SHA-256 over every group, dataset name and attribute
(the datasets' ``sha256`` included), so an edited setting or position is
caught too. :func:`load_tree` checks both and raises :class:`ReadError`
naming what does not match. Files written before these checksums existed
have neither attribute and load unchecked.
"""
from __future__ import annotations

import hashlib
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
_SHA = "sha256"  # on every dataset: SHA-256 of its dtype, shape and C-order bytes
_TREE_SHA = "tree_sha256"  # on the root: SHA-256 over all names and attributes (see _TreeDigest)


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
    # libver="latest": the small chunk index of HDF5 1.10, so the checksummed (chunked) datasets cost no space.
    with h5py.File(name, "w", driver="core", backing_store=False, libver="latest") as f:
        digest = _TreeDigest()
        _write_group(f, tree, digest)
        f.attrs[_TREE_SHA] = digest.hexdigest()
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
            digest = _TreeDigest()
            tree = _read_group(f, path, digest)
            stored = f.attrs.get(_TREE_SHA)
            if stored is not None and _text(stored) != digest.hexdigest():
                raise ReadError(f"{path} is damaged: its settings or layout changed after it was written "
                                f"(the file's checksum does not match)")
            return tree
    except ReadError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        reason = "empty file" if path.stat().st_size == 0 else str(exc).splitlines()[0]
        raise ReadError(f"{path} is not a readable checkpoint (truncated or not HDF5: {reason})") from None


def _array_digest(arr: np.ndarray) -> str:
    digest = hashlib.sha256(f"{arr.dtype.str} {arr.shape}\n".encode())
    digest.update(np.ascontiguousarray(arr).tobytes())
    return digest.hexdigest()


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _TreeDigest:
    """SHA-256 over (name, value) entries taken in name order, so that writer and reader agree.

    The writer adds every attribute as it stores it and the reader as it reads it back; the entries are
    groups, attributes of groups (settings, positions, JSON strings) and the attributes of datasets
    (their ``sha256``, which covers their data).
    """

    def __init__(self):
        self._entries: list[tuple[str, bytes]] = []

    def group(self, group: h5py.Group) -> None:
        self._entries.append((group.name, b"group"))

    def attr(self, owner: str, key: str, value) -> None:
        self._entries.append((f"{owner}@{key}", _value_bytes(value)))

    def hexdigest(self) -> str:
        digest = hashlib.sha256()
        for name, payload in sorted(self._entries):
            encoded = name.encode("utf-8", "surrogatepass")
            digest.update(len(encoded).to_bytes(8, "little") + encoded + len(payload).to_bytes(8, "little") + payload)
        return digest.hexdigest()


def _value_bytes(value) -> bytes:
    """An attribute's value as bytes, with its kind so that "1" and 1 differ; as written and as read back."""
    if isinstance(value, str):
        return b"str:" + value.encode("utf-8", "surrogatepass")
    if isinstance(value, bytes):
        return b"bytes:" + bytes(value)
    arr = np.asarray(value)
    return f"array:{arr.dtype.str} {arr.shape}:".encode() + arr.tobytes()


def _create_dataset(group: h5py.Group, key: str, value, digest: _TreeDigest, as_list: int | None = None) -> None:
    """A dataset with a Fletcher32 checksum (chunked; not possible for scalars and empty arrays) and its SHA-256."""
    arr = np.asarray(value)
    dataset = group.create_dataset(key, data=arr, fletcher32=arr.ndim > 0 and arr.size > 0)
    attrs = {_SHA: _array_digest(arr)} if as_list is None else {_SHA: _array_digest(arr), _LIST: as_list}
    for name, attr in attrs.items():
        dataset.attrs[name] = attr
        digest.attr(dataset.name, name, attr)


def _read_dataset(item: h5py.Dataset, path: Path, digest: _TreeDigest):
    """The dataset's array (a list if it was one), checked against its SHA-256 when it has one."""
    try:
        arr = item[()]
    except OSError as exc:
        raise ReadError(f"{path} is damaged: dataset {item.name} cannot be read "
                        f"({str(exc).splitlines()[0]})") from None
    attrs = dict(item.attrs.items())
    for name, attr in attrs.items():
        digest.attr(item.name, name, attr)
    stored = attrs.get(_SHA)
    if stored is not None and _text(stored) != _array_digest(np.asarray(arr)):
        raise ReadError(f"{path} is damaged: dataset {item.name} does not match its checksum "
                        f"(it changed after the file was written)")
    return arr.tolist() if _LIST in attrs else arr


def _set_attr(group: h5py.Group, key: str, value, digest: _TreeDigest) -> None:
    stored = value if isinstance(value, (str, bytes)) else np.asarray(value)
    group.attrs[key] = value
    digest.attr(group.name, key, stored)


def _write_group(group: h5py.Group, tree: dict, digest: _TreeDigest) -> None:
    digest.group(group)
    for key, value in tree.items():
        key = str(key)
        if isinstance(value, dict):
            _write_group(group.create_group(key), value, digest)
        elif isinstance(value, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in value):
            sub = group.create_group(key)
            _set_attr(sub, _LIST, len(value), digest)
            _write_group(sub, {str(i): v for i, v in enumerate(value)}, digest)
        elif isinstance(value, np.ndarray):
            _create_dataset(group, key, value, digest)
        elif isinstance(value, (list, tuple)) and any(isinstance(v, str) for v in value):
            _set_attr(group, key, _JSON + json.dumps(list(value)), digest)
        elif isinstance(value, (list, tuple)):
            _create_dataset(group, key, np.asarray(value), digest, as_list=len(value))
        elif value is None:
            _set_attr(group, key, "__none__", digest)
        else:
            _set_attr(group, key, value, digest)


def _read_group(group: h5py.Group, path: Path, digest: _TreeDigest):
    digest.group(group)
    out: dict[str, Any] = {}
    attrs = dict(group.attrs.items())
    for key, value in attrs.items():
        if key == _TREE_SHA and group.name == "/":
            continue
        digest.attr(group.name, key, value)
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
            out[key] = _read_group(item, path, digest)
        else:
            out[key] = _read_dataset(item, path, digest)
    if _LIST in attrs:
        return [out[str(i)] for i in range(int(attrs[_LIST]))]
    return out
