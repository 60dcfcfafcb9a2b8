"""CIFAR-10 images and labels from a folder in the official python-batch layout.

The layout is the one inside ``cifar-10-python.tar.gz`` (Krizhevsky, 2009)::

    data_batch_1 ... data_batch_5   training images
    test_batch                      test images
    batches.meta                    class names

Each batch is a pickled dict whose ``b"data"`` is a ``uint8`` array of shape
``(n, 3072)`` (1024 red, 1024 green, 1024 blue values, each plane row-major
32x32) and whose ``b"labels"`` holds ``n`` integers in 0..9. The full data set
has 10,000 images per batch; the sample bundled with the package has the first
1,017 images of every official batch (5,085 training, 1,017 test) and is what
:func:`load_cifar10` reads when no folder is given.

Security: the batch files are Python pickles. Only read files from a trusted
source (the official archive, verified by its MD5 as ``approxdarts-np data
fetch`` does). The reader narrows the risk with an unpickler that resolves only
the handful of names a batch needs (NumPy array reconstruction and the
byte-string helper Python 3 uses for protocol-2 pickles) and refuses any other
global, but a restricted unpickler is a safety net, not a licence to open
pickles from anyone.
"""
from __future__ import annotations

import codecs
import io
import pickle
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

import numpy as np

from approxdarts_np.errors import UserError
from approxdarts_np.io.read import read_at_most

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
REQUIRED_FILES = TRAIN_FILES + (TEST_FILE, META_FILE)

#: Name of the folder the official archive extracts to.
ARCHIVE_FOLDER = "cifar-10-batches-py"

NUM_CLASSES = 10
IMAGE_SHAPE = (3, 32, 32)
_ROW_LENGTH = 3 * 32 * 32

#: Bounds checked before a batch is read: a batch of the official set has 10,000 images (31 MB);
#: one batch may hold the whole training set, 50,000 images, plus room for labels and names.
MAX_BATCH_IMAGES = 50_000
MAX_BATCH_BYTES = MAX_BATCH_IMAGES * (_ROW_LENGTH + 64) + 2 ** 20

#: Per-channel (R, G, B) mean and standard deviation of the CIFAR-10 training
#: images scaled to [0, 1], the constants DARTS normalises with.
CIFAR10_MEAN = (0.49139968, 0.48215827, 0.44653124)
CIFAR10_STD = (0.24703233, 0.24348505, 0.26158768)

_SAMPLE_FOLDER = "cifar10_sample"


@dataclass(frozen=True, eq=False)
class CifarData:
    """CIFAR-10 images as read-only NCHW ``uint8`` arrays with ``int64`` labels.

    ``train_x`` has shape ``(N, 3, 32, 32)``, ``train_y`` shape ``(N,)`` with
    values in 0..9; likewise ``test_x``/``test_y``. ``class_names[k]`` names
    label ``k``. ``source`` is the folder the batches were read from.
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    class_names: tuple[str, ...]
    source: Path


def default_data_dir() -> Path:
    """The folder of the CIFAR-10 sample shipped with the package (5,085 train / 1,017 test)."""
    return Path(str(resources.files(__package__) / _SAMPLE_FOLDER))


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """The folder holding the batch files: the bundled sample for ``None``.

    A folder that does not hold the batches itself but has a
    ``cifar-10-batches-py`` sub-folder (what ``approxdarts-np data fetch
    --dest DIR`` creates) resolves to that sub-folder, so the same DIR works
    for both commands.
    """
    if data_dir is None:
        return default_data_dir()
    folder = Path(data_dir).expanduser()
    if not folder.is_dir():
        raise UserError(f"CIFAR-10 folder {folder} does not exist or is not a folder")
    nested = folder / ARCHIVE_FOLDER
    if not (folder / META_FILE).exists() and nested.is_dir():
        return nested
    return folder


def missing_files(folder: Path) -> list[str]:
    """Names of the required batch files that are not regular files in ``folder``."""
    return [name for name in REQUIRED_FILES if not (folder / name).is_file()]


def check_data_dir(data_dir: str | Path | None) -> Path:
    """The folder :func:`load_cifar10` reads; UserError when it is missing or lacks batch files (nothing is read)."""
    folder = resolve_data_dir(data_dir)
    missing = missing_files(folder)
    if len(missing) == len(REQUIRED_FILES):
        raise UserError(f"CIFAR-10 folder {folder} holds none of the python-version batch files "
                        f"({', '.join(REQUIRED_FILES)})")
    if missing:
        raise UserError(f"CIFAR-10 folder {folder} is missing {', '.join(missing)}")
    return folder


def load_cifar10(data_dir: str | Path | None = None) -> CifarData:
    """Read and validate CIFAR-10 from ``data_dir`` (the bundled sample when ``None``).

    Raises :class:`UserError` naming the folder and the missing files when the
    layout is incomplete, or naming the file when a batch does not unpickle to
    the expected dict of ``uint8 (n, 3072)`` data and ``n`` labels in 0..9.
    Only point this at trusted files: see the module docstring.
    """
    folder = check_data_dir(data_dir)
    class_names = _read_meta(folder / META_FILE)
    train = [_read_batch(folder / name) for name in TRAIN_FILES]
    test_x, test_y = _read_batch(folder / TEST_FILE)
    train_x = np.concatenate([x for x, _ in train])
    train_y = np.concatenate([y for _, y in train])
    for array in (train_x, train_y, test_x, test_y):
        array.flags.writeable = False
    return CifarData(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y,
                     class_names=class_names, source=folder)


def search_split(n_train: int, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Halve ``n_train`` training images into weight-train and architecture-val indices.

    With ``seed=None`` (the default) the split is the one DARTS uses: the first
    ``n_train // 2`` images train the weights, the remaining ones (one more
    when ``n_train`` is odd) are the validation set of the architecture step.
    The official training batches are already in random order, so this plain
    split is class-balanced up to sampling noise. With an integer ``seed`` the
    halves come from a permutation drawn by ``np.random.default_rng(seed)``
    instead. Both index arrays are sorted ``int64``, disjoint, and together
    cover ``0..n_train-1``.
    """
    if isinstance(n_train, bool) or not isinstance(n_train, (int, np.integer)) or n_train < 2:
        raise UserError(f"the search split needs at least 2 training images, got {n_train}")
    half = int(n_train) // 2
    if seed is None:
        order = np.arange(n_train, dtype=np.int64)
    else:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise UserError(f"seed must be a non-negative integer, got {seed!r}")
        order = np.random.default_rng(int(seed)).permutation(n_train).astype(np.int64)
    return np.sort(order[:half]), np.sort(order[half:])


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images as ``(n, 3, 32, 32) uint8`` and labels as ``(n,) int64`` from one batch file.

    Everything is checked before anything is converted: the keys, the types,
    the number of images and every label's value (a label may be any Python
    integer in a pickle, thousands of digits long).
    """
    batch = _as_str_keys(_unpickle(path), path)
    for key in ("data", "labels"):
        if key not in batch:
            raise UserError(f"{path}: not a CIFAR-10 batch (no {key!r} entry; has {_key_list(batch)})")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != _ROW_LENGTH or data.shape[0] == 0:
        described = (f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray)
                     else type(data).__name__)
        raise UserError(f"{path}: 'data' must be a uint8 array of shape (n, {_ROW_LENGTH}) "
                        f"with n >= 1, got {described}")
    n = data.shape[0]
    if n > MAX_BATCH_IMAGES:
        raise UserError(f"{path}: {n} images in one batch; a CIFAR-10 batch holds at most {MAX_BATCH_IMAGES}")
    labels = _as_labels(batch["labels"], path)
    if labels.shape[0] != n:
        raise UserError(f"{path}: {labels.shape[0]} labels for {n} images")
    images = np.ascontiguousarray(data).reshape((n,) + IMAGE_SHAPE)
    return images, labels


def _show_int(value: int) -> str:
    """An integer for a message; one too long to print (Python refuses over 4,300 digits) by its size."""
    value = int(value)
    if abs(value) < 10 ** 30:
        return str(value)
    return f"{'a negative' if value < 0 else 'an'} integer of about {int(value.bit_length() * 0.30103) + 1} digits"


def _as_labels(raw: object, path: Path) -> np.ndarray:
    """Labels as a 1-D ``int64`` array, each checked to lie in 0..9 before any conversion."""
    if isinstance(raw, np.ndarray):
        if raw.ndim != 1 or raw.dtype.kind not in "iu":
            raise UserError(f"{path}: 'labels' must be 1-D integers, got {raw.dtype} "
                            f"array of shape {raw.shape}")
        if raw.size > MAX_BATCH_IMAGES:
            raise UserError(f"{path}: {raw.size} labels; a CIFAR-10 batch holds at most {MAX_BATCH_IMAGES}")
        if raw.size and (raw.min() < 0 or raw.max() >= NUM_CLASSES):
            raise UserError(f"{path}: labels must lie in 0..{NUM_CLASSES - 1}, "
                            f"found {_show_int(raw.min())}..{_show_int(raw.max())}")
        return raw.astype(np.int64)
    if not isinstance(raw, (list, tuple)):
        raise UserError(f"{path}: 'labels' must be a list of integers, got {type(raw).__name__}")
    if len(raw) > MAX_BATCH_IMAGES:
        raise UserError(f"{path}: {len(raw)} labels; a CIFAR-10 batch holds at most {MAX_BATCH_IMAGES}")
    for index, value in enumerate(raw):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise UserError(f"{path}: 'labels' must be a list of integers, item {index} is "
                            f"{type(value).__name__}")
        if not 0 <= value < NUM_CLASSES:
            raise UserError(f"{path}: labels must lie in 0..{NUM_CLASSES - 1}, "
                            f"item {index} is {_show_int(value)}")
    return np.array([int(v) for v in raw], dtype=np.int64)


def _read_meta(path: Path) -> tuple[str, ...]:
    """The ten class names from ``batches.meta``."""
    meta = _as_str_keys(_unpickle(path), path)
    names = meta.get("label_names")
    if not isinstance(names, (list, tuple)) or len(names) != NUM_CLASSES \
            or not all(isinstance(n, (bytes, str)) for n in names):
        raise UserError(f"{path}: 'label_names' must list {NUM_CLASSES} class names")
    return tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names)


def _as_str_keys(obj: object, path: Path) -> dict[str, object]:
    """A pickled dict with its (bytes or str) keys as ``str``; other or clashing keys are refused."""
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    result: dict[str, object] = {}
    for key, value in obj.items():
        if not isinstance(key, (bytes, str)):
            raise UserError(f"{path}: not a CIFAR-10 batch (a key of type {type(key).__name__}; "
                            f"keys are names)")
        name = key.decode("latin-1") if isinstance(key, bytes) else key
        if name in result:
            raise UserError(f"{path}: not a CIFAR-10 batch (key {name!r} twice, as bytes and as text)")
        result[name] = value
    return result


def _key_list(batch: dict[str, object]) -> str:
    """The keys of a batch for a message, at most ten, each cut to 40 characters."""
    names = sorted(batch)
    shown = [repr(name[:40]) for name in names[:10]]
    return "[" + ", ".join(shown) + (f", ... {len(names) - 10} more" if len(names) > 10 else "") + "]"


def _unpickle(path: Path) -> object:
    """Load one pickle with the restricted unpickler; any failure names the file."""
    raw = read_at_most(
        path, MAX_BATCH_BYTES, unreadable=lambda reason: f"{path}: cannot read ({reason})",
        too_large=lambda size: f"{path}: {size:,} bytes is more than any CIFAR-10 batch file (at most "
                               f"{MAX_BATCH_IMAGES:,} images, {MAX_BATCH_BYTES:,} bytes); refusing to read it")
    try:
        return _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except UserError:
        raise
    except pickle.UnpicklingError as exc:
        raise UserError(f"{path}: not a CIFAR-10 batch pickle ({exc})") from exc
    except Exception as exc:  # a malformed stream fails with many exception types
        raise UserError(f"{path}: not a CIFAR-10 batch pickle ({type(exc).__name__}: {exc})") from exc


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles from Python 3 use it for ``bytes``."""
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"byte string with encoding {encoding!r} is not allowed")
    return codecs.encode(text, "latin-1")


def _allowed_globals() -> Mapping[tuple[str, str], object]:
    """The only names a CIFAR-10 pickle may reference, keyed as the pickle spells them."""
    reconstruct = np.ndarray.__reduce__(np.zeros(1, np.uint8))[0]
    scalar = np.int64(0).__reduce__()[0]
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    # The official files were written by NumPy 1.x (`numpy.core`); NumPy 2 writes `numpy._core`.
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = reconstruct
        allowed[(module, "scalar")] = scalar
    return MappingProxyType(allowed)


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler that resolves only NumPy array reconstruction and latin-1 byte strings."""

    _allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: a CIFAR-10 batch holds only "
                f"NumPy arrays, lists, numbers and strings") from None
