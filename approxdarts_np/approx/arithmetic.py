"""The arithmetic spec: how a command, a config or a sweep names the arithmetic of the searched
convolutions. One home for its grammar; everything else calls these functions.

A spec is one of

* FP32 (float32 convolutions): ``none``, ``fp32`` or ``float`` (any case), or no spec at all;
* ``exact``: 8-bit quantised convolutions with the exact product;
* a bundled multiplier's name (``mul8u_2P7``, or its short form ``2P7``) or the path of a
  ``.bin``/``.npy`` product table: 8-bit through that multiplier;
* ``genotype`` (train and evaluate only): each searched op through the multiplier its genotype
  names.

Lists of specs (``search --multipliers``, ``evaluate --arithmetic``) are separated by commas.
"""
from __future__ import annotations

from approxdarts_np.approx.convolution import QuantizedArithmetic
from approxdarts_np.approx.multipliers import load_multiplier

FP32_NAMES = ("none", "fp32", "float")
EXACT = "exact"
GENOTYPE = "genotype"
SEPARATOR = ","


def is_fp32(spec: str | None) -> bool:
    """True for no spec and for the FP32 spellings."""
    return spec is None or str(spec).strip().lower() in FP32_NAMES


def split_specs(text: str) -> list[str]:
    """The specs of a comma-separated list, stripped, empty items dropped."""
    return [item.strip() for item in str(text).split(SEPARATOR) if item.strip()]


def join_specs(specs) -> str:
    """The list ``split_specs`` reads back."""
    return SEPARATOR.join(specs)


def arithmetic_from_spec(spec: str | None) -> QuantizedArithmetic | None:
    """None for FP32; for ``exact``, a bundled name or a table path, the 8-bit arithmetic that
    computes through that multiplier. Raises UserError for an unknown name or a bad table file
    (``genotype`` is not an arithmetic: the callers that accept it resolve it per op)."""
    if is_fp32(spec):
        return None
    return QuantizedArithmetic(load_multiplier(spec))
