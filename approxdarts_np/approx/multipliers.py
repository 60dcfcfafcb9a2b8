"""8-bit unsigned multiplier tables: the bundled EvoApprox library, user tables, error figures.

A multiplier is its 256x256 product table ``M[a, b]`` for unsigned operands ``a, b`` in 0..255
(in TFApprox ``a`` is the quantised activation, ``b`` the quantised weight). The bundled tables
are the 36 EvoApproxLib circuits distributed with TFApprox; ``tables/multipliers.json`` holds the
published figures of each circuit (power, area, delay and five error metrics; four circuits
have none).

Error metrics computed by :func:`characterise` (``E = M - a*b`` over all 65,536 operand pairs):

- ``mae%``  = mean |E| / 2^16 * 100
- ``wce%``  = max |E| / 2^16 * 100
- ``ep%``   = share of pairs with E != 0, in percent
- ``mre%``  = mean of |E| / (a*b) * 100 over the 65,025 pairs with a*b != 0
- ``wcre%`` = max of |E| / (a*b) * 100 over the same pairs

The relative-error definition was chosen because it is the one that reproduces the published
``mre%`` and ``wcre%`` of all 32 circuits that have figures. Pairs with ``a*b == 0`` are skipped,
not divided by ``max(a*b, 1)``: three circuits (2AC, 2HH, 2P7) return non-zero products when an
operand is 0, and with ``max(a*b, 1)`` their figures come out far off (2AC: 26.97 % instead of
1.25 %, 2P7 ``wcre%``: 200 instead of 100). Averaging over the 65,025 non-zero pairs rather than
over all 65,536 also matters (13QR: 44.0 published, 43.66 with the other denominator).
"""
from __future__ import annotations

import difflib
import functools
import json
import math
import types
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Mapping

import numpy as np
from approxdarts_np.errors import UserError
from approxdarts_np.kernels.rank import MAX_ELIMINATION_STEPS, PRIME_LIMIT, ranks_mod_primes

TABLE_SIDE = 256
TABLE_ENTRIES = TABLE_SIDE * TABLE_SIDE
BUNDLED_PREFIX = "mul8u_"
EXACT_REFERENCE = "mul8u_1JFF"
PUBLISHED_KEYS = ("pwr", "area", "delay", "mae%", "wce%", "ep%", "mre%", "wcre%")
ERROR_METRICS = ("mae%", "wce%", "ep%", "mre%", "wcre%")

_TABLES_PACKAGE = "approxdarts_np.approx"
_TABLES_DIR = "tables"
_MANIFEST = "multipliers.json"


@dataclass(frozen=True, eq=False)
class Multiplier:
    """One 8x8-bit unsigned multiplier: its product table and, if known, its published figures.

    ``table`` is a read-only 256x256 int32 array, ``table[a, b] = M(a, b)``. ``source`` is the
    bundled circuit name, ``"exact"``, or the path the table was read from. ``published`` maps the
    keys of :data:`PUBLISHED_KEYS` to the EvoApproxLib figures (read-only), or is None.
    """

    name: str
    table: np.ndarray
    source: str
    published: Mapping[str, float] | None = None

    def __post_init__(self):
        table = _freeze(_validated_table(np.asarray(self.table), f"multiplier {self.name!r}"))
        object.__setattr__(self, "table", table)
        if self.published is not None:
            object.__setattr__(self, "published", types.MappingProxyType(dict(self.published)))

    @property
    def is_exact(self) -> bool:
        """True when ``M(a, b) == a*b`` for every operand pair."""
        return bool(np.array_equal(self.table, exact_table()))

    @property
    def is_bundled(self) -> bool:
        """True for the tables shipped with the package (including ``exact``)."""
        return self.source == "exact" or self.source in bundled_names()


def exact_table() -> np.ndarray:
    """Return a fresh 256x256 int32 table of exact products ``a*b``."""
    ops = np.arange(TABLE_SIDE, dtype=np.int32)
    return np.multiply.outer(ops, ops)


def _tables_dir():
    return resources.files(_TABLES_PACKAGE).joinpath(_TABLES_DIR)


@functools.lru_cache(maxsize=1)
def _manifest() -> Mapping[str, Mapping[str, float] | None]:
    """Published figures per bundled circuit, read once from ``multipliers.json`` (read-only)."""
    raw = json.loads(_tables_dir().joinpath(_MANIFEST).read_text(encoding="utf-8"))
    return types.MappingProxyType({
        name: (None if figures is None else types.MappingProxyType(dict(figures)))
        for name, figures in raw["multipliers"].items()
    })


@functools.lru_cache(maxsize=1)
def _bundled_names() -> tuple[str, ...]:
    names = [entry.name[: -len(".bin")] for entry in _tables_dir().iterdir()
             if entry.name.startswith(BUNDLED_PREFIX) and entry.name.endswith(".bin")]
    return tuple(sorted(names))


def bundled_names() -> list[str]:
    """Return the names of the bundled tables (``mul8u_...``), sorted."""
    return list(_bundled_names())


def _freeze(table: np.ndarray) -> np.ndarray:
    """A read-only int32 C-contiguous copy (the caller's array is left untouched; 256 KiB)."""
    frozen = np.array(table, dtype=np.int32, order="C", copy=True)
    frozen.setflags(write=False)
    return frozen


def _table_from_bin_bytes(data: bytes, where: str) -> np.ndarray:
    if len(data) != 2 * TABLE_ENTRIES:
        raise UserError(f"{where}: a .bin multiplier table must hold {TABLE_ENTRIES} little-endian "
                        f"uint16 values ({2 * TABLE_ENTRIES} bytes), found {len(data)} bytes")
    return np.frombuffer(data, dtype="<u2").reshape(TABLE_SIDE, TABLE_SIDE)


@functools.lru_cache(maxsize=None)
def _load_bundled(name: str) -> Multiplier:
    data = _tables_dir().joinpath(f"{name}.bin").read_bytes()
    table = _table_from_bin_bytes(data, f"bundled table {name}")
    return Multiplier(name=name, table=table, source=name, published=_manifest().get(name))


@functools.lru_cache(maxsize=1)
def _load_exact() -> Multiplier:
    return Multiplier(name="exact", table=exact_table(), source="exact",
                      published=_manifest()[EXACT_REFERENCE])


def _bundled_match(spec: str) -> str | None:
    """The bundled name ``spec`` refers to (``mul8u_2P7``, ``2P7``, any case), or None."""
    wanted = spec.upper()
    if wanted.startswith(BUNDLED_PREFIX.upper()):
        wanted = wanted[len(BUNDLED_PREFIX):]
    for name in _bundled_names():
        if name[len(BUNDLED_PREFIX):].upper() == wanted:
            return name
    return None


_NPZ_MAGIC = b"PK\x03\x04"
_NPY_MAGIC = b"\x93NUMPY"
_FORMAT_HINT = ("expected a TFApprox .bin (65,536 little-endian uint16) or a .npy 256x256 "
                "integer array saved with numpy.save")


def _read_table_file(path: Path) -> np.ndarray:
    """The table in ``path``; every problem is one UserError line naming the file.

    Sizes are checked before anything is read, so a huge or mislabelled file costs nothing.
    """
    try:
        if not path.exists():
            raise UserError(f"multiplier table file not found: {path}")
        if not path.is_file():
            raise UserError(f"not a file: {path}")
        suffix = path.suffix.lower()
        if suffix == ".bin":
            size = path.stat().st_size
            if size != 2 * TABLE_ENTRIES:
                raise UserError(f"{path}: a .bin multiplier table must hold {TABLE_ENTRIES} "
                                f"little-endian uint16 values ({2 * TABLE_ENTRIES} bytes), found "
                                f"{size} bytes")
            return _table_from_bin_bytes(path.read_bytes(), str(path))
        if suffix == ".npy":
            return _validated_table(_read_npy(path), str(path))
        raise UserError(f"{path}: unsupported table format {suffix or '(no suffix)'!r}; "
                        + _FORMAT_HINT)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None


def _read_npy(path: Path) -> np.ndarray:
    """A 256x256 integer array from a .npy file, header checked before the data is read.

    Never unpickles: object arrays are refused from the header alone.
    """
    with open(path, "rb") as f:
        head = f.read(len(_NPY_MAGIC))
        if head[:len(_NPZ_MAGIC)] == _NPZ_MAGIC:
            raise UserError(f"{path}: this is a .npz archive (numpy.savez) under a .npy name; "
                            "save the table with numpy.save")
        if head != _NPY_MAGIC:
            raise UserError(f"{path}: not a valid .npy file (no NumPy header); " + _FORMAT_HINT)
        f.seek(0)
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {version}")
        except ValueError as exc:
            raise UserError(f"{path}: not a valid .npy file ({str(exc).splitlines()[0]})") from None
        if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
            raise UserError(f"{path}: a multiplier table must hold integers, found dtype {dtype} "
                            "(object and structured arrays are not read)")
        if tuple(shape) != (TABLE_SIDE, TABLE_SIDE):
            raise UserError(f"{path}: a multiplier table must have shape (256, 256), "
                            f"found {tuple(shape)}")
        if dtype == np.bool_ or not np.issubdtype(dtype, np.integer):
            raise UserError(f"{path}: a multiplier table must hold integers, found dtype {dtype}")
        expected = f.tell() + TABLE_ENTRIES * dtype.itemsize
        size = path.stat().st_size
        if size != expected:
            raise UserError(f"{path}: a 256x256 {dtype} .npy file has {expected} bytes, "
                            f"found {size} bytes (truncated or with trailing data)")
        data = np.frombuffer(f.read(TABLE_ENTRIES * dtype.itemsize), dtype=dtype)
    return data.reshape((TABLE_SIDE, TABLE_SIDE), order="F" if fortran else "C")


def _validated_table(array: np.ndarray, where: str) -> np.ndarray:
    if array.shape != (TABLE_SIDE, TABLE_SIDE):
        raise UserError(f"{where}: a multiplier table must have shape (256, 256), "
                        f"found {array.shape}")
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise UserError(f"{where}: a multiplier table must hold integers, "
                        f"found dtype {array.dtype}")
    low, high = int(array.min()), int(array.max())
    if low < 0 or high > 0xFFFF:
        raise UserError(f"{where}: table values must lie in 0..65535, found {low}..{high}")
    return array


def load_multiplier(spec: str | Path) -> Multiplier:
    """Return the multiplier named by ``spec``.

    ``spec`` is ``"exact"`` (``a*b``, with the published figures of mul8u_1JFF), a bundled name
    (``"mul8u_2P7"`` or ``"2P7"``, any case), or a path to a TFApprox ``.bin`` (65,536
    little-endian uint16, row-major, entry ``[a*256 + b]``) or a ``.npy`` 256x256 integer array.
    Bundled names win over files of the same name. Raises UserError for a missing or malformed
    file or an unknown name. Bundled loads are cached; file loads are read every time.
    """
    if isinstance(spec, str):
        if spec.strip().lower() == "exact":
            return _load_exact()
        name = _bundled_match(spec.strip())
        if name is not None:
            return _load_bundled(name)
    path = Path(spec)
    looks_like_path = (isinstance(spec, Path) or path.suffix.lower() in (".bin", ".npy")
                       or len(path.parts) > 1 or path.exists())
    if not looks_like_path:
        short = [n[len(BUNDLED_PREFIX):] for n in _bundled_names()]
        close = difflib.get_close_matches(str(spec).upper().removeprefix("MUL8U_"), short, n=3)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise UserError(f"unknown multiplier {str(spec)!r}{hint}: give 'exact', one of the "
                        f"{len(short)} bundled names (e.g. 2P7 or mul8u_2P7, 1446, JQQ, 17KS; "
                        "all listed by `approxdarts-np multipliers`) or a path to a .bin/.npy "
                        "table")
    return Multiplier(name=path.stem, table=_read_table_file(path), source=str(path))


# --------------------------------------------------------------------------------------------
# Characterisation
# --------------------------------------------------------------------------------------------

def error_matrix(table: np.ndarray) -> np.ndarray:
    """Return ``E = M - a*b`` as a 256x256 int64 array."""
    table = _validated_table(np.asarray(table), "table")
    return table.astype(np.int64) - exact_table().astype(np.int64)


def characterise(table: np.ndarray) -> dict:
    """Return the error figures of a 256x256 product table.

    Keys: ``mae%``, ``wce%``, ``ep%``, ``mre%``, ``wcre%`` (definitions in the module docstring,
    comparable with the published figures), ``bias`` (mean of ``M - a*b`` over all pairs),
    ``max_abs_error`` (max |M - a*b|) and ``rank`` (exact rank of ``E = M - a*b`` over the
    rationals, see :func:`exact_rank`).
    """
    err = error_matrix(table)
    abs_err = np.abs(err)
    exact = exact_table().astype(np.int64)
    nonzero = exact != 0
    relative = abs_err[nonzero] / exact[nonzero]
    return {
        "mae%": float(abs_err.mean() / TABLE_ENTRIES * 100.0),
        "wce%": float(abs_err.max() / TABLE_ENTRIES * 100.0),
        "ep%": float(np.count_nonzero(err) / TABLE_ENTRIES * 100.0),
        "mre%": float(relative.mean() * 100.0),
        "wcre%": float(relative.max() * 100.0),
        "bias": float(err.mean()),
        "max_abs_error": int(abs_err.max()),
        "rank": exact_rank(err),
    }


def printed_decimals(value: float) -> int:
    """Number of decimals in the shortest repr of ``value`` (``0.018`` -> 3, ``44.0`` -> 1)."""
    text = repr(float(value))
    if "e" in text or "E" in text:
        mantissa, exponent = text.lower().split("e")
        decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
        return max(decimals - int(exponent), 0)
    return len(text.split(".")[1]) if "." in text else 0


def matches_published(measured: float, published: float) -> bool:
    """True when ``measured`` equals ``published`` to the precision ``published`` is printed with.

    Printed precision is read from the shortest repr of the published number (``0.018`` has 3
    decimals, so ``0.0183`` matches); a tie at exactly half a unit counts as a match.
    """
    half_unit = 0.5 * 10.0 ** -printed_decimals(published)
    return abs(measured - published) <= half_unit * (1.0 + 1e-9) + 1e-12


def published_mismatches(measured: Mapping[str, float],
                         published: Mapping[str, float] | None) -> list[str]:
    """Return the error metrics whose measured value differs from the published one.

    Compares :data:`ERROR_METRICS` with :func:`matches_published`; an empty list means all
    match. Without published figures there is nothing to compare and the list is empty.
    """
    if published is None:
        return []
    return [key for key in ERROR_METRICS
            if key in published and not matches_published(measured[key], published[key])]


# --------------------------------------------------------------------------------------------
# Exact rank of an integer matrix
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _primes_below_limit(count: int) -> tuple[int, ...]:
    """The ``count`` largest primes below 2^26, descending (trial division; count stays small)."""
    small = [2]
    for candidate in range(3, math.isqrt(PRIME_LIMIT) + 1, 2):
        if all(candidate % p for p in small if p * p <= candidate):
            small.append(candidate)
    found = []
    candidate = PRIME_LIMIT - 1
    while len(found) < count:
        if all(candidate % p for p in small if p * p <= candidate):
            found.append(candidate)
        candidate -= 2
    return tuple(found)


def _hadamard_bound_squared(squared_norms: list[int], size: int) -> int:
    """Square of the Hadamard bound on any ``size`` x ``size`` minor (largest norms first)."""
    bound = 1
    for value in squared_norms[:size]:
        bound *= value
    return bound if len(squared_norms) >= size else 0


def _squared_norms(values: np.ndarray) -> list[int]:
    """Exact squared Euclidean norm of each row, as Python ints."""
    largest = max(abs(int(values.min())), abs(int(values.max())))
    if largest * largest * values.shape[1] < (1 << 62):
        return [int(v) for v in (values * values).sum(axis=1)]
    return [sum(int(v) * int(v) for v in row) for row in values.tolist()]


def exact_rank(matrix: np.ndarray) -> int:
    """Return the exact rank over the rationals of a 2-D integer matrix.

    Multi-modular and deterministic, not probabilistic: the rank modulo a prime never exceeds
    the rational rank, and is smaller only if the prime divides every r x r minor. Ranks are
    taken modulo primes just below 2^26 until the product of the primes used exceeds the
    Hadamard bound H on any (r+1) x (r+1) minor, r being the largest rank seen. If the true rank
    were above r, some (r+1) x (r+1) minor D would be non-zero yet divisible by all those primes,
    so |D| >= their product > H >= |D|, a contradiction. One prime settles most tables; the
    largest bundled ones need about a hundred (well under a second).
    """
    matrix = np.asarray(matrix)
    if matrix.ndim != 2:
        raise ValueError(f"exact_rank needs a 2-D matrix, got shape {matrix.shape}")
    if matrix.dtype == np.bool_ or not np.issubdtype(matrix.dtype, np.integer):
        raise ValueError(f"exact_rank needs an integer matrix, got dtype {matrix.dtype}")
    n, m = matrix.shape
    if min(n, m) > MAX_ELIMINATION_STEPS:
        raise ValueError(f"exact_rank supports matrices with min(rows, cols) <= "
                         f"{MAX_ELIMINATION_STEPS}, got {matrix.shape}")
    if matrix.size == 0 or not matrix.any():
        return 0
    if matrix.dtype == np.uint64 and int(matrix.max()) > np.iinfo(np.int64).max:
        raise ValueError("exact_rank: entries must fit in int64")
    values = np.ascontiguousarray(matrix, dtype=np.int64)
    rows = sorted(_squared_norms(values), reverse=True)
    cols = sorted(_squared_norms(values.T), reverse=True)
    full = min(n, m)

    rank = 0
    primes_used = 0
    product = 1
    while rank < full:
        size = rank + 1
        bound_sq = min(_hadamard_bound_squared(rows, size), _hadamard_bound_squared(cols, size))
        if primes_used and product * product > bound_sq:
            break
        # Enough primes for the current bound (each prime > 2^25); at least one.
        need_bits = max(bound_sq.bit_length() // 2 + 1 - (product.bit_length() - 1), 1)
        batch = max(-(-need_bits // 25), 1)
        primes = _primes_below_limit(primes_used + batch)[primes_used:]
        rank = max(rank, int(ranks_mod_primes(values, np.array(primes, dtype=np.int64)).max()))
        primes_used += batch
        for p in primes:
            product *= p
    return rank


# --------------------------------------------------------------------------------------------
# Summary for reports
# --------------------------------------------------------------------------------------------

def metric_definitions() -> dict[str, str]:
    """Return what each key of :func:`characterise` means (for reports and JSON output)."""
    return {
        "mae%": "mean |M(a,b) - a*b| / 2^16 * 100, over all 65,536 operand pairs",
        "wce%": "max |M(a,b) - a*b| / 2^16 * 100",
        "ep%": "share of operand pairs with M(a,b) != a*b, in percent",
        "mre%": "mean |M(a,b) - a*b| / (a*b) * 100 over the 65,025 pairs with a*b != 0",
        "wcre%": "max |M(a,b) - a*b| / (a*b) * 100 over the pairs with a*b != 0",
        "bias": "mean (M(a,b) - a*b) over all pairs, in product units",
        "max_abs_error": "max |M(a,b) - a*b|, in product units",
        "rank": "exact rank over the rationals of the error matrix E(a,b) = M(a,b) - a*b",
        "pwr": "published power, mW (EvoApproxLib, 45 nm)",
    }


def summarise(multiplier: Multiplier) -> dict:
    """Return a multiplier's identity, published figures, measured figures and any mismatches.

    Keys: ``name``, ``source``, ``is_exact``, ``published`` (dict or None), ``measured``
    (:func:`characterise`), ``mismatches`` (:func:`published_mismatches`).
    """
    measured = characterise(multiplier.table)
    published = None if multiplier.published is None else dict(multiplier.published)
    return {
        "name": multiplier.name,
        "source": multiplier.source,
        "is_exact": measured["ep%"] == 0.0,
        "published": published,
        "measured": measured,
        "mismatches": published_mismatches(measured, published),
    }
