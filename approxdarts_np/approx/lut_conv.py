"""Approximate (product-table) convolution: one plan per multiplier, two exact engines.

    plan = make_lut_plan(table)                       # once per multiplier table
    acc = lut_conv2d(qx, zx, qw, zw, plan, stride=1, padding=1, groups=C)

``acc`` (int64) is, for every output element, the exact integer

    sum over the receptive field of ( M[qx, qw] - zw*qx - zx*qw + zx*zw ),

padding positions holding the code zx; the caller scales it by s_x*s_w. Both engines return
this integer bit for bit:

* ``"gather"`` - table lookups (:mod:`approxdarts_np.kernels.lut_conv`); works for every table.
* ``"lowrank"`` - 1 + R ordinary convolutions of integer features, exact by a bound checked on
  every call (:mod:`approxdarts_np.approx.lowrank`); needs the table's error M - a*b to have
  a small rank R.

Which engine is cheaper (``engine="auto"``). The gather engine's cost does not depend on the
table; the low-rank engine's grows with the number of terms 1 + R. Measured on the reference
machine (``benchmarks/bench_approx.py`` and ``benchmarks/results/bench_approx.json``: 2 cores,
B64 C64 32x32, medians, GMAC/s):

    shape           float (ours)  gather    low-rank 1+R=2   1+R=4   1+R=7   1+R=9
    pointwise 1x1   46            16-19     23               14      7.7     6.6
    depthwise 3x3   23            3.0-3.2   4.8              3.1     1.9     1.6

so the low-rank engine wins at 1 + R = 2, loses at 1 + R = 4 in both shapes, and the
interpolated 1 + R = 3 is about even for pointwise and ahead for depthwise (whose lookups are
the slow part of a separable conv). The plan therefore picks ``"lowrank"`` when
1 + R <= :data:`LOWRANK_MAX_TERMS` = 3 and ``"gather"`` otherwise. ``max_rank`` only bounds
the work spent looking for a decomposition; a plan built with a larger ``max_rank`` keeps the
factors (so ``engine="lowrank"`` can be forced) even when it picks the gather engine.
"""
import hashlib
import operator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..kernels._util import as_pair, conv_output_size
from ..kernels.lut_conv import im2col_codes, lut_bag_conv, lut_depthwise_conv
from .lowrank import LowRankBoundError, LowRankFactors, exact_error_factors, lowrank_conv2d

__all__ = ["LutPlan", "make_lut_plan", "lut_conv2d", "LOWRANK_MAX_TERMS", "ENGINES"]

ENGINES = ("auto", "gather", "lowrank")
# Largest 1 + R for which the low-rank engine is chosen (see the module docstring).
LOWRANK_MAX_TERMS = 3
_INT32_MAX = 2 ** 31 - 1


@dataclass(frozen=True, eq=False)
class LutPlan:
    """What the approximate convolution needs to know about one multiplier table.

    ``table`` (256, 256) int32 read-only, M[a, b] for activation code a and weight code b;
    ``engine`` the engine ``"auto"`` uses (``"gather"`` or ``"lowrank"``); ``factors`` the exact
    integer decomposition of M - a*b or None (rank above ``max_rank``); ``rank`` its rank R or
    None; ``reason`` one line saying why the engine was chosen; ``digest`` sha256 of the table;
    ``gather_table`` the same table as uint16 when every entry fits (halves the memory the
    gather kernel's rows take), else int32, read-only.
    """

    table: np.ndarray
    engine: str
    factors: LowRankFactors | None
    rank: int | None
    reason: str
    digest: str
    gather_table: np.ndarray


def make_lut_plan(table, max_rank=16):
    """Return the :class:`LutPlan` of a (256, 256) integer table (cached by table content).

    Looks for an exact decomposition of M - a*b of rank <= ``max_rank`` and chooses the engine.
    Raises ValueError for a table of the wrong shape, a non-integer dtype or entries outside
    int32.
    """
    arr = np.asarray(table)
    if arr.shape != (256, 256):
        raise ValueError(f"table must have shape (256, 256), got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"table must hold integers, got dtype {arr.dtype}")
    if arr.size and (int(arr.min()) < -2 ** 31 or int(arr.max()) > _INT32_MAX):
        raise ValueError("table entries must fit in int32")
    max_rank = int(max_rank)
    if max_rank < 0:
        raise ValueError(f"max_rank must be >= 0, got {max_rank}")
    return _plan_from_bytes(np.ascontiguousarray(arr, dtype="<i4").tobytes(), max_rank)


@lru_cache(maxsize=64)
def _plan_from_bytes(data, max_rank):
    table = np.frombuffer(data, dtype="<i4").reshape(256, 256).astype(np.int32)
    table.flags.writeable = False
    fits_u16 = int(table.min()) >= 0 and int(table.max()) <= 65535
    gather_table = table.astype(np.uint16) if fits_u16 else table.copy()
    gather_table.flags.writeable = False
    digest = hashlib.sha256(data).hexdigest()
    factors = exact_error_factors(table, max_rank)
    if factors is None:
        return LutPlan(table, "gather", None, None,
                       f"M - a*b has rank > {max_rank} (or no exact integer factors)", digest,
                       gather_table)
    terms = 1 + factors.rank
    if terms <= LOWRANK_MAX_TERMS:
        engine, why = "lowrank", f"1 + R = {terms} <= {LOWRANK_MAX_TERMS}"
    else:
        engine, why = "gather", f"1 + R = {terms} > {LOWRANK_MAX_TERMS}"
    return LutPlan(table, engine, factors, factors.rank, f"rank {factors.rank}: {why}", digest,
                   gather_table)


# ----------------------------------------------------------------------------- validation

def _check_codes(a, name):
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 codes, got {a.dtype}")
    if a.ndim != 4:
        raise ValueError(f"{name} must be 4-D, got shape {a.shape}")
    return np.ascontiguousarray(a)


def _check_zero_point(z, name):
    try:
        value = operator.index(z)          # Python or NumPy integers, 0-d integer arrays
    except TypeError:
        value = None
    if value is None or isinstance(z, (bool, np.bool_)):
        raise ValueError(f"{name} must be an integer code, got {z!r}")
    if not 0 <= value <= 255:
        raise ValueError(f"{name} must be in 0..255, got {value}")
    return value


def _geometry(stride, padding, dilation):
    stride = as_pair(stride, "stride")
    padding = as_pair(padding, "padding")
    dilation = as_pair(dilation, "dilation")
    if min(stride) < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if min(padding) < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if min(dilation) < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation}")
    return stride, padding, dilation


# ----------------------------------------------------------------------------- dispatcher

def lut_conv2d(qx, zx, qw, zw, plan, stride=1, padding=0, dilation=1, groups=1, engine="auto"):
    """Return the approximate convolution acc (N, Co, OH, OW) int64 of codes qx with codes qw.

    qx (N, Ci, H, W) uint8 with zero point zx; qw (Co, Ci/groups, kh, kw) uint8 with zero point
    zw; ``plan`` from :func:`make_lut_plan`; stride/padding/dilation an int or (h, w) pair
    (symmetric padding with the code zx). ``engine`` is ``"auto"`` (the plan's choice, falling
    back to the gather engine when a call breaks the low-rank exactness bound), ``"gather"`` or
    ``"lowrank"`` (raises ValueError without factors, LowRankBoundError past the bound).
    Depthwise (groups == Ci == Co), pointwise and dense convolutions take specialised paths;
    other group counts run group by group.
    """
    if not isinstance(plan, LutPlan):
        raise ValueError(f"plan must be a LutPlan (make_lut_plan), got {type(plan).__name__}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    qx = _check_codes(qx, "qx")
    qw = _check_codes(qw, "qw")
    zx = _check_zero_point(zx, "zx")
    zw = _check_zero_point(zw, "zw")
    stride, padding, dilation = _geometry(stride, padding, dilation)
    groups = int(groups)
    n_img, n_in, h, wd = qx.shape
    n_out, n_in_g, k_h, k_w = qw.shape
    if groups < 1 or n_in % groups or n_out % groups:
        raise ValueError(f"groups={groups} must divide Ci={n_in} and Co={n_out}")
    if n_in_g != n_in // groups or k_h < 1 or k_w < 1:
        raise ValueError(f"qw must be (Co, Ci/groups={n_in // groups}, kh, kw), got {qw.shape}")
    out_h = conv_output_size(h, k_h, stride[0], padding[0], dilation[0])
    out_w = conv_output_size(wd, k_w, stride[1], padding[1], dilation[1])
    if out_h < 1 or out_w < 1:
        raise ValueError(f"empty output {out_h}x{out_w}: input {h}x{wd}, kernel {k_h}x{k_w}, "
                         f"stride {stride}, padding {padding}, dilation {dilation}")
    out_size = (out_h, out_w)

    if engine == "lowrank" and plan.factors is None:
        raise ValueError(f"engine='lowrank' needs a decomposition; this plan has none "
                         f"({plan.reason})")
    if n_img == 0 or n_out == 0 or n_in == 0:
        # nothing to compute, or no taps at all (Ci == 0): every sum is empty
        return np.zeros((n_img, n_out, out_h, out_w), np.int64)
    use_lowrank = engine == "lowrank" or (engine == "auto" and plan.engine == "lowrank")
    if use_lowrank:
        try:
            return lowrank_conv2d(qx, zx, qw, zw, plan.factors, stride, padding, dilation,
                                  groups, out_size)
        except LowRankBoundError:
            if engine == "lowrank":
                raise
    return _gather_conv2d(qx, zx, qw, zw, plan.gather_table, stride, padding, dilation, groups,
                          out_size)


def _gather_conv2d(qx, zx, qw, zw, table, stride, padding, dilation, groups, out_size):
    n_img, n_in, h, wd = qx.shape
    n_out, n_in_g, k_h, k_w = qw.shape
    if groups == n_in and n_in_g == 1 and n_out == n_in:
        return lut_depthwise_conv(qx, zx, qw, zw, table, stride, padding, dilation, out_size)
    n_taps = n_in_g * k_h * k_w
    peak = int(np.abs(table.astype(np.int64)).max())
    # taps per call so that the kernel's int32 sums cannot overflow; the parts add in int64
    chunk = max(1, _INT32_MAX // (peak + 255 + 1))
    out_g = n_out // groups
    parts = []
    for grp in range(groups):
        x_g = qx[:, grp * n_in_g:(grp + 1) * n_in_g]
        if (k_h, k_w) == (1, 1) and padding == (0, 0) and stride == (1, 1):
            cols = x_g.reshape(n_img, n_in_g, h * wd)
        else:
            cols = im2col_codes(x_g, zx, (k_h, k_w), stride, padding, dilation, out_size)
        w_cols = qw[grp * out_g:(grp + 1) * out_g].reshape(out_g, n_taps)
        part = lut_bag_conv(cols[:, :chunk], zx, w_cols[:, :chunk], zw, table)
        for k0 in range(chunk, n_taps, chunk):
            part += lut_bag_conv(cols[:, k0:k0 + chunk], zx, w_cols[:, k0:k0 + chunk], zw, table)
        parts.append(part)
    out = parts[0] if groups == 1 else np.concatenate(parts, axis=1)
    return out.reshape(n_img, n_out, out_size[0], out_size[1])
