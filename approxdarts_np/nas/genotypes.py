"""Genotype: the discrete cell pair a search derives; JSON and DARTS-string forms."""
from __future__ import annotations

import ast
import json
import numbers
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from approxdarts_np.errors import UserError
from approxdarts_np.io.read import read_at_most
from approxdarts_np.nas.operations import PRIMITIVES

STEPS = 4
PAIRS = 2 * STEPS
_FIELDS = ("normal", "normal_concat", "reduce", "reduce_concat")
_MAX_FILE_BYTES = 1 << 20


class GenotypeError(UserError, ValueError):
    """A genotype that is not a DARTS cell pair (a UserError, and a ValueError for older callers)."""


SEARCHED_OPS = ("sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")
_INT_TOO_LONG = "integer string conversion"  # Python refuses to read or print integers over 4,300 digits


def _short(value) -> str:
    """A value for a message: an integer too long to print by its size, anything else cut to 80 characters."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and abs(int(value)) >= 10 ** 30:
        return f"an integer of about {int(int(value).bit_length() * 0.30103) + 1} digits"
    try:
        text = repr(value)
    except ValueError:  # a list or tuple holding such an integer
        return f"a {type(value).__name__} holding an integer too long to print"
    return text if len(text) <= 80 else text[:77] + "..."


def _parse_failure(exc: BaseException) -> str:
    """Why a genotype did not parse, in one line, without Python's advice on its integer limit."""
    if _INT_TOO_LONG in str(exc):
        return "a number in it has more than 4,300 digits; input and state indices are 0..5"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _pairs(value, field: str) -> tuple[tuple[str, int], ...]:
    """``value`` as 8 checked (operation, input) pairs (a third entry, the multiplier, is dropped here).

    Takes quark0's flat list ``[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ...]`` and the nested
    form of the authors' TensorFlow port, one list of 2 pairs per node
    ``[[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], ...]``.
    """
    if not isinstance(value, (list, tuple)):
        raise GenotypeError(f"{field} must be a list of (operation, input) pairs, "
                            f"got {type(value).__name__}")
    nested = any(isinstance(item, (list, tuple)) and item and isinstance(item[0], (list, tuple))
                 for item in value)
    if nested:
        flat = []
        for node, item in enumerate(value):
            if not isinstance(item, (list, tuple)) or not all(isinstance(p, (list, tuple)) for p in item):
                raise GenotypeError(f"{field}: node {node} must be a list of 2 (operation, input) pairs "
                                    f"like the other nodes, got {_short(item)}")
            if len(item) != 2:
                raise GenotypeError(f"{field}: node {node} has {len(item)} inputs; a DARTS node takes "
                                    f"exactly 2")
            flat.extend(item)
        value = flat
    if len(value) != PAIRS:
        raise GenotypeError(f"{field}: a DARTS cell has {STEPS} nodes with 2 inputs each "
                            f"({PAIRS} pairs), found {len(value)} pair{'s' * (len(value) != 1)}")
    pairs = []
    for k, pair in enumerate(value):
        if not isinstance(pair, (list, tuple)) or len(pair) not in (2, 3):
            raise GenotypeError(f"{field}: entry {k} must be an (operation, input) pair or an (operation, "
                                f"input, multiplier) triple, got {_short(pair)}")
        op, j = pair[0], pair[1]
        if not isinstance(op, str):
            raise GenotypeError(f"{field}: entry {k}: the operation must be a name, got {_short(op)}")
        if op == "none":
            raise GenotypeError(f"{field}: entry {k}: 'none' cannot be a kept operation "
                                f"(choose one of {', '.join(PRIMITIVES[1:])})")
        if op not in PRIMITIVES:
            raise GenotypeError(f"{field}: entry {k}: unknown operation {_short(op)} "
                                f"(choose one of {', '.join(PRIMITIVES[1:])})")
        if isinstance(j, bool) or not isinstance(j, numbers.Integral):
            raise GenotypeError(f"{field}: entry {k}: the input index must be an integer, got {_short(j)}")
        node = k // 2
        if not 0 <= j < 2 + node:
            raise GenotypeError(f"{field}: node {node} cannot take input {_short(j)} (its inputs are "
                                f"0..{1 + node}: the two cell inputs and the earlier nodes)")
        pairs.append((op, int(j)))
    return tuple(pairs)


def _entry_multipliers(value) -> tuple[str | None, ...] | None:
    """The multipliers of (operation, input, multiplier) entries, flat or nested; None when no entry has one."""
    flat = []
    for item in value if isinstance(value, (list, tuple)) else ():
        nested = isinstance(item, (list, tuple)) and item and isinstance(item[0], (list, tuple))
        flat.extend(item if nested else [item])
    found = [entry[2] if isinstance(entry, (list, tuple)) and len(entry) == 3 else None for entry in flat]
    return tuple(found) if any(m is not None for m in found) else None


def _multipliers(value, pairs, field: str) -> tuple[str | None, ...] | None:
    """``value`` as one multiplier name per pair (None for pools, skip and FP32 convs), or None."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != len(pairs):
        raise GenotypeError(f"{field}: needs one multiplier (or null) per operation, {len(pairs)} in all")
    out = []
    for k, (m, (op, _)) in enumerate(zip(value, pairs)):
        if m is not None and not (isinstance(m, str) and m.strip()):
            raise GenotypeError(f"{field}: entry {k}: a multiplier is a name or a table path, got {_short(m)}")
        if m is not None and op not in SEARCHED_OPS:
            raise GenotypeError(f"{field}: entry {k}: {op} has no multiplier (only sep and dil convs have one)")
        out.append(m)
    return tuple(out) if any(m is not None for m in out) else None


def _concat(value, field: str) -> tuple[int, ...]:
    """``value`` as a checked, non-empty tuple of state indices 0..5."""
    if not isinstance(value, (list, tuple, range)):
        raise GenotypeError(f"{field} must be a list of state indices, got {type(value).__name__}")
    if len(value) == 0:
        raise GenotypeError(f"{field} is empty: the cell output concatenates at least one state")
    for i in value:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise GenotypeError(f"{field}: state indices must be integers, got {_short(i)}")
        if not 0 <= i < 2 + STEPS:
            raise GenotypeError(f"{field}: state index {_short(i)} is out of range (a cell has states "
                                f"0..{1 + STEPS}: the two inputs and {STEPS} nodes)")
    return tuple(int(i) for i in value)


@dataclass(frozen=True)
class Genotype:
    """Per cell type, 2 (operation, input index) pairs per intermediate node, and the concatenated nodes.

    Constructing one checks it (raises :class:`GenotypeError`, a ValueError): 4 nodes of 2 pairs
    (flat, or nested per node), known operations other than ``none``, inputs a node can take,
    and a non-empty concat of existing states. Fields are stored as tuples.
    """

    normal: tuple[tuple[str, int], ...]
    normal_concat: tuple[int, ...]
    reduce: tuple[tuple[str, int], ...]
    reduce_concat: tuple[int, ...]
    # The multiplier of each kept operation (None: pools, skip, or an FP32/unset conv); None for all.
    normal_multipliers: tuple[str | None, ...] | None = None
    reduce_multipliers: tuple[str | None, ...] | None = None

    def __post_init__(self):
        for field in ("normal", "reduce"):
            raw = getattr(self, field)
            pairs = _pairs(raw, field)
            object.__setattr__(self, field, pairs)
            concat = f"{field}_concat"
            object.__setattr__(self, concat, _concat(getattr(self, concat), concat))
            mults = getattr(self, f"{field}_multipliers")
            if mults is None:
                mults = _entry_multipliers(raw)
            object.__setattr__(self, f"{field}_multipliers", _multipliers(mults, pairs, f"{field} multipliers"))

    @property
    def has_multipliers(self) -> bool:
        return self.normal_multipliers is not None or self.reduce_multipliers is not None

    @property
    def has_searched_ops(self) -> bool:
        """Whether any kept operation is a sep or dil conv (an op that can have a multiplier)."""
        return any(op in SEARCHED_OPS for op, _ in self.normal + self.reduce)

    def multipliers(self, field: str) -> tuple[str | None, ...]:
        """One multiplier name (or None) per kept operation of ``field`` ("normal" or "reduce")."""
        found = getattr(self, f"{field}_multipliers")
        return found if found is not None else (None,) * PAIRS

    def without_multipliers(self) -> "Genotype":
        return Genotype(self.normal, self.normal_concat, self.reduce, self.reduce_concat)

    def to_dict(self) -> dict:
        """JSON form: edges ``[op, input]``, or ``[op, input, multiplier]`` for sep/dil convs with one."""
        def edges(field):
            return [[op, j] if m is None else [op, j, m]
                    for (op, j), m in zip(getattr(self, field), self.multipliers(field))]
        return {"normal": edges("normal"), "normal_concat": list(self.normal_concat),
                "reduce": edges("reduce"), "reduce_concat": list(self.reduce_concat)}

    def multipliers_line(self) -> str:
        """The second line of ``genotype.txt``: ``Multipliers(normal=[...], reduce=[...])``, one entry per op."""
        return (f"Multipliers(normal={list(self.multipliers('normal'))!r}, "
                f"reduce={list(self.multipliers('reduce'))!r})")

    def to_text(self) -> str:
        """``genotype.txt``: the DARTS string, and the multipliers on a second line when there are any."""
        return self.to_darts_string() + ("\n" + self.multipliers_line() if self.has_multipliers else "")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_darts_string(self) -> str:
        """``Genotype(normal=[('sep_conv_3x3', 0), ...], normal_concat=range(2, 6), ...)``."""
        def pairs(ps):
            return "[" + ", ".join(f"('{op}', {j})" for op, j in ps) + "]"

        def concat(c):
            c = list(c)
            if c == list(range(c[0], c[-1] + 1)):
                return f"range({c[0]}, {c[-1] + 1})"
            return repr(c)

        return (f"Genotype(normal={pairs(self.normal)}, normal_concat={concat(self.normal_concat)}, "
                f"reduce={pairs(self.reduce)}, reduce_concat={concat(self.reduce_concat)})")

    @classmethod
    def from_dict(cls, d: dict) -> "Genotype":
        """A genotype from ``to_dict``'s form (pairs flat or nested per node); GenotypeError if invalid."""
        if not isinstance(d, dict):
            raise GenotypeError(f"a genotype must be an object with keys {', '.join(_FIELDS)}, "
                                f"got {type(d).__name__}")
        missing = [k for k in _FIELDS if k not in d]
        if missing:
            raise GenotypeError(f"a genotype needs the keys {', '.join(_FIELDS)}; missing "
                                f"{', '.join(missing)}")
        return cls(**{k: d[k] for k in _FIELDS})

    @classmethod
    def from_darts_string(cls, text: str) -> "Genotype":
        """Parse the DARTS string form (literals only; nothing is evaluated).

        Accepts keyword or positional fields, ``range(a, b)`` or lists for the concats, flat or
        per-node nested pairs, and an optional ``name = `` in front (a line of a genotypes.py).
        """
        body = text.strip().lstrip("\ufeff").strip()
        m = re.fullmatch(r"(?:[A-Za-z_][A-Za-z_0-9]*\s*=\s*)?Genotype\s*\((.*)\)", body, flags=re.S)
        if not m:
            raise GenotypeError("not a DARTS genotype string: expected 'Genotype(normal=..., ...)'")
        try:
            inner = re.sub(r"range\(\s*(\d+)\s*,\s*(\d+)\s*\)", _range_as_list, m.group(1))
            call = ast.parse(f"f({inner})", mode="eval").body
            if not isinstance(call, ast.Call) or len(call.args) + len(call.keywords) == 0:
                raise ValueError("no fields")
            values = [ast.literal_eval(arg) for arg in call.args]
            fields = dict(zip(_FIELDS, values))
            if len(values) > len(_FIELDS):
                raise ValueError(f"{len(values)} positional fields")
            for kw in call.keywords:
                if kw.arg is None or kw.arg in fields:
                    raise ValueError(f"field {kw.arg!r} given twice or unpacked")
                fields[kw.arg] = ast.literal_eval(kw.value)
        except GenotypeError:
            raise
        except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError) as exc:
            reason = _parse_failure(exc)
            raise GenotypeError(f"cannot parse the genotype string ({reason}); expected "
                                f"Genotype(normal=[('sep_conv_3x3', 0), ...], normal_concat=range(2, 6), "
                                f"reduce=[...], reduce_concat=range(2, 6))") from None
        unknown = sorted(set(fields) - set(_FIELDS))
        if unknown:
            raise GenotypeError(f"unknown genotype field {unknown[0]!r} (fields: {', '.join(_FIELDS)})")
        return cls.from_dict(fields)


def _range_as_list(match: re.Match) -> str:
    """``range(a, b)`` of a concat as the list it stands for; GenotypeError for one no cell can have."""
    start, stop = match[1], match[2]
    if len(start) > 3 or len(stop) > 3 or int(stop) - int(start) > 64:  # spelled out, it could fill the memory
        raise GenotypeError(f"{_short(match[0])} is not a concat: a cell has states 0..{1 + STEPS}")
    return repr(list(range(int(start), int(stop))))


def derive_genotype(weights_normal: np.ndarray, weights_reduce: np.ndarray) -> Genotype:
    """DARTS's rule on softmax-ed α (14×8 each): per node keep the 2 incoming edges whose
    strongest non-``none`` weight is largest, each with that strongest operation."""
    concat = tuple(range(2, 2 + STEPS))
    return Genotype(normal=_parse(weights_normal), normal_concat=concat,
                    reduce=_parse(weights_reduce), reduce_concat=concat)


def _parse(weights: np.ndarray) -> tuple[tuple[str, int], ...]:
    none = PRIMITIVES.index("none")
    candidates = [k for k in range(len(PRIMITIVES)) if k != none]
    gene = []
    start = 0
    for i in range(STEPS):
        n_inputs = 2 + i
        w = weights[start:start + n_inputs]
        # Strongest non-none op per edge; ties go to the earlier op / earlier edge.
        best_op = [max(candidates, key=lambda k, row=row: (row[k], -k)) for row in w]
        strength = [w[j][best_op[j]] for j in range(n_inputs)]
        edges = sorted(range(n_inputs), key=lambda j: -strength[j])[:2]
        gene.extend((PRIMITIVES[best_op[j]], j) for j in edges)
        start += n_inputs
    return tuple(gene)


DARTS_V2 = Genotype(
    normal=(("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)),
    normal_concat=(2, 3, 4, 5),
    reduce=(("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
            ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)),
    reduce_concat=(2, 3, 4, 5),
)


def read_genotype(spec: str | Path) -> Genotype:
    """A genotype from a JSON file, a text file with the DARTS string, the string itself, or ``DARTS_V2``.

    JSON and string forms take quark0's flat pair lists and the TensorFlow port's per-node
    nested lists; a UTF-8 byte-order mark is ignored. Every problem is one UserError line that
    names the file (or says the genotype string was given inline).
    """
    text = str(spec).lstrip("\ufeff")
    if text.strip().upper() in ("DARTS_V2", "DARTS"):
        return DARTS_V2
    if not isinstance(spec, Path) and re.match(r"\s*(?:[A-Za-z_][A-Za-z_0-9]*\s*=\s*)?Genotype\s*\(", text):
        try:
            return Genotype.from_darts_string(text)
        except GenotypeError as exc:
            raise UserError(f"genotype string: {exc}") from None
    path = Path(text)
    content = _read_genotype_file(path)
    try:
        if content.lstrip().startswith(("{", "[")):
            try:
                fields = json.loads(content)
            except RecursionError:
                raise GenotypeError("JSON nested too deeply") from None
            except ValueError as exc:  # JSONDecodeError, or an integer over Python's 4,300-digit limit
                raise GenotypeError(f"not valid JSON ({_parse_failure(exc)})") from None
            return Genotype.from_dict(fields)
        return _from_text(content)
    except GenotypeError as exc:
        raise UserError(f"genotype file {path}: {exc}") from None


def _from_text(content: str) -> Genotype:
    """A DARTS string, optionally followed by a ``Multipliers(normal=[...], reduce=[...])`` line."""
    m = re.search(r"^\s*Multipliers\s*\((.*)\)\s*$", content, flags=re.M | re.S)
    if m is None:
        return Genotype.from_darts_string(content)
    genotype = Genotype.from_darts_string(content[:m.start()])
    try:
        call = ast.parse(f"f({m.group(1)})", mode="eval").body
        fields = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    except (SyntaxError, ValueError, TypeError, AttributeError, RecursionError, MemoryError) as exc:
        raise GenotypeError(f"cannot parse the Multipliers(...) line ({_parse_failure(exc)})") from None
    if set(fields) != {"normal", "reduce"}:
        raise GenotypeError("the Multipliers(...) line needs normal=[...] and reduce=[...]")
    return Genotype(genotype.normal, genotype.normal_concat, genotype.reduce, genotype.reduce_concat,
                    normal_multipliers=fields["normal"], reduce_multipliers=fields["reduce"])


def _read_genotype_file(path: Path) -> str:
    """The text of a genotype file (UTF-8, optional BOM); one UserError line for anything else."""
    hint = "give a .json, a .txt with the DARTS string, or DARTS_V2"

    def unreadable(reason):
        return f"cannot read genotype file {path}: {reason}"
    try:
        exists, is_file = path.exists(), path.is_file()
    except OSError as exc:
        raise UserError(unreadable(exc.strerror or exc)) from None
    if not exists:
        raise UserError(f"genotype file {path} does not exist ({hint})")
    if not is_file:
        raise UserError(f"genotype file {path} is not a file ({hint})")
    data = read_at_most(
        path, _MAX_FILE_BYTES, unreadable=unreadable,
        too_large=lambda size: f"genotype file {path} has {size:,} bytes; a genotype is a few hundred bytes "
                               f"({hint})")
    if data[:2] in (b"\xff\xfe", b"\xfe\xff") or _looks_utf16(data):
        raise UserError(f"genotype file {path} looks UTF-16 encoded; save it as UTF-8")
    if not data.strip():
        raise UserError(f"genotype file {path} is empty ({hint})")
    if b"\x00" in data:
        raise UserError(f"genotype file {path} is a binary file, not a genotype ({hint})")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"genotype file {path} is not UTF-8 text (byte {exc.start}: "
                        f"{exc.reason}); {hint}") from None


def _looks_utf16(data: bytes) -> bool:
    """UTF-16 text without a BOM: ASCII characters leave every other byte zero."""
    head = data[:64]
    return len(head) >= 4 and (not any(head[0::2]) or not any(head[1::2]))
