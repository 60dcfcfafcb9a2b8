"""Genotype: the discrete cell pair a search derives; JSON and DARTS-string forms."""
from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from approxdarts_np.errors import UserError
from approxdarts_np.nas.operations import PRIMITIVES

STEPS = 4


@dataclass(frozen=True)
class Genotype:
    """Per cell type, 2 (operation, input index) pairs per intermediate node, and the concatenated nodes."""

    normal: tuple[tuple[str, int], ...]
    normal_concat: tuple[int, ...]
    reduce: tuple[tuple[str, int], ...]
    reduce_concat: tuple[int, ...]

    def __post_init__(self):
        for field in ("normal", "reduce"):
            pairs = getattr(self, field)
            if len(pairs) % 2:
                raise ValueError(f"{field}: needs 2 inputs per node, got {len(pairs)} pairs")
            for k, (op, j) in enumerate(pairs):
                if op not in PRIMITIVES or op == "none":
                    raise ValueError(f"{field}: unknown operation {op!r}")
                if not 0 <= j < 2 + k // 2:
                    raise ValueError(f"{field}: node {k // 2} cannot take input {j}")

    def to_dict(self) -> dict:
        return {"normal": [[op, j] for op, j in self.normal], "normal_concat": list(self.normal_concat),
                "reduce": [[op, j] for op, j in self.reduce], "reduce_concat": list(self.reduce_concat)}

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
        try:
            return cls(normal=tuple((str(op), int(j)) for op, j in d["normal"]),
                       normal_concat=tuple(int(i) for i in d["normal_concat"]),
                       reduce=tuple((str(op), int(j)) for op, j in d["reduce"]),
                       reduce_concat=tuple(int(i) for i in d["reduce_concat"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"not a valid genotype: {exc}") from None

    @classmethod
    def from_darts_string(cls, text: str) -> "Genotype":
        """Parse the DARTS string form (literals only; nothing is evaluated)."""
        body = text.strip()
        m = re.fullmatch(r"Genotype\((.*)\)", body, flags=re.S)
        if not m:
            raise UserError("not a DARTS genotype string: expected 'Genotype(normal=..., ...)'")
        inner = re.sub(r"range\((\d+),\s*(\d+)\)", lambda r: repr(list(range(int(r[1]), int(r[2])))),
                       m.group(1))
        try:
            call = ast.parse(f"f({inner})", mode="eval").body
            fields = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
        except (SyntaxError, ValueError) as exc:
            raise UserError(f"cannot parse the genotype string: {exc}") from None
        return cls.from_dict(fields)


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
    """A genotype from a JSON file, a text file with the DARTS string, the string itself, or ``DARTS_V2``."""
    text = str(spec)
    if text.upper() in ("DARTS_V2", "DARTS"):
        return DARTS_V2
    if text.lstrip().startswith("Genotype("):
        return Genotype.from_darts_string(text)
    path = Path(text)
    if not path.is_file():
        raise UserError(f"genotype file {path} does not exist (give a .json, a .txt with the DARTS string, "
                        f"or DARTS_V2)")
    content = path.read_text()
    if content.lstrip().startswith("{"):
        try:
            return Genotype.from_dict(json.loads(content))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} is not valid JSON: {exc}") from None
    return Genotype.from_darts_string(content)
