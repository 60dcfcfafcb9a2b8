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

The quantised conv op calls :func:`approx_conv2d` on its float operands: it quantises each
operand once (for the low-rank engine straight into the integer features -- inside the
convolution kernel itself for depthwise and pointwise convolutions -- for the gather into uint8
codes, inside the byte-shuffle kernel where it runs), runs one engine and returns
float32(s_x*s_w*acc) with the codes for backward.

Which engine is cheaper (``engine="auto"``). :func:`choose_engine` compares estimated times for
the real shape (:data:`_COST`: per multiply-accumulate of the float and gather kernels, per
element of the feature passes, per kernel call): the low-rank engine costs 1 + R float
convolutions, the gather one lookup per multiply-accumulate, which is slow in depthwise convs
(a table lookup costs several float multiply-adds; ``benchmarks/bench_approx.py`` measures
both). So exact mode (R = 0) and rank-1 tables run the float kernels and higher ranks gather;
the larger the kernel, the larger the rank at which the gather takes over. The shuffle
gathers (:mod:`approxdarts_np.kernels.byte_shuffle`: CPUs with AVX-512 VBMI, and AVX2 for
tables whose columns are sums of nibble windows) are faster than the scalar one; over a
whole step the VBMI gather was not faster than the low-rank engine for R <= 1 (the AVX2 one
was not compared in whole steps), so the model (which keeps the scalar rates) keeps the same
engines for the bundled tables on every kernel path. ``plan.engine``
is the shape-free default of :func:`lut_conv2d` (``"lowrank"`` when 1 + R <=
:data:`LOWRANK_MAX_TERMS` = 3). ``max_rank`` only bounds the work spent looking for a
decomposition; a plan built with a larger ``max_rank`` keeps the factors (so ``engine=
"lowrank"`` can be forced) even when it picks the gather engine.
"""
import hashlib
import threading
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..kernels import conv as kconv
from ..kernels import depthwise as kdw
from ..kernels._util import (as_pair, check_code_value, check_codes, check_float32_4d,
                             conv_geometry, conv_output_hw)
from ..kernels.codes import float32_inverse
from ..kernels.lut_conv import (feature_sum, im2col_codes, lut_bag_conv, lut_conv_codes,
                                lut_depthwise_conv, table_peak)
from .lowrank import (LowRankBoundError, LowRankFactors, activation_features,
                      exact_error_factors, feature_conv, features_fit_float32, lowrank_conv2d,
                      weight_error_rows, weight_features)
from .quantize import codes_and_features, params_of_range, quant_params, weight_codes

__all__ = ["LutPlan", "make_lut_plan", "lut_conv2d", "approx_conv2d", "choose_engine",
           "LOWRANK_MAX_TERMS", "ENGINES"]

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

def _geometry(stride, padding, dilation):
    """(stride, padding, dilation) as (h, w) pairs, checked (:func:`conv_geometry`)."""
    s_h, s_w, p_h, p_w, d_h, d_w = conv_geometry(stride, padding, dilation)
    return (s_h, s_w), (p_h, p_w), (d_h, d_w)


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
    qx = check_codes(qx, "qx")
    qw = check_codes(qw, "qw")
    zx = check_code_value(zx, "zx")
    zw = check_code_value(zw, "zw")
    stride, padding, dilation = _geometry(stride, padding, dilation)
    groups = int(groups)
    n_img, n_in, h, wd = qx.shape
    n_out, n_in_g, k_h, k_w = qw.shape
    if groups < 1 or n_in % groups or n_out % groups:
        raise ValueError(f"groups={groups} must divide Ci={n_in} and Co={n_out}")
    if n_in_g != n_in // groups or k_h < 1 or k_w < 1:
        raise ValueError(f"qw must be (Co, Ci/groups={n_in // groups}, kh, kw), got {qw.shape}")
    out_h, out_w = conv_output_hw(h, wd, k_h, k_w, stride + padding + dilation)
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
    return _gather_conv2d(qx, zx, qw, zw, plan, stride, padding, dilation, groups, out_size)


@lru_cache(maxsize=64)
def _transposed_table(plan):
    """plan.gather_table transposed (columns contiguous), read-only, once per plan."""
    table_t = np.ascontiguousarray(plan.gather_table.T)
    table_t.flags.writeable = False
    return table_t


def _gather_conv2d(qx, zx, qw, zw, plan, stride, padding, dilation, groups, out_size,
                   scale=None):
    """The gather engine: int64 acc, or float32(acc * scale) when ``scale`` is given."""
    n_img, n_in, h, wd = qx.shape
    n_out, n_in_g, k_h, k_w = qw.shape
    table, table_t = plan.gather_table, _transposed_table(plan)
    if groups == n_in and n_in_g == 1 and n_out == n_in:
        return lut_depthwise_conv(qx, zx, qw, zw, table, stride, padding, dilation, scale=scale,
                                  table_t=table_t)
    n_taps = n_in_g * k_h * k_w
    # taps per call so that the kernel's int32 sums cannot overflow; the parts add in int64
    chunk = max(1, _INT32_MAX // (table_peak(table) + 255 + 1))
    fused = scale is not None and groups == 1 and n_taps <= chunk
    out_g = n_out // groups
    parts = []
    for grp in range(groups):
        x_g = qx[:, grp * n_in_g:(grp + 1) * n_in_g]
        if (k_h, k_w) == (1, 1) and padding == (0, 0) and stride == (1, 1):
            cols = x_g.reshape(n_img, n_in_g, h * wd)
        else:
            cols = im2col_codes(x_g, zx, (k_h, k_w), stride, padding, dilation)
        w_cols = qw[grp * out_g:(grp + 1) * out_g].reshape(out_g, n_taps)
        part = lut_bag_conv(cols[:, :chunk], zx, w_cols[:, :chunk], zw, table,
                            scale=scale if fused else None, table_t=table_t)
        for k0 in range(chunk, n_taps, chunk):
            part += lut_bag_conv(cols[:, k0:k0 + chunk], zx, w_cols[:, k0:k0 + chunk], zw, table,
                                 table_t=table_t)
        parts.append(part)
    out = parts[0] if groups == 1 else np.concatenate(parts, axis=1)
    out = out.reshape(n_img, n_out, out_size[0], out_size[1])
    if scale is None or fused:
        return out
    return feature_sum(out, 1, np.zeros(n_out, np.int64), scale)


# ----------------------------------------------------------------------------- float operands

_NO_FEATURES_T = np.zeros((0, 256), np.float32)


# How an activation's quantisation range is taken over the replicas that split a batch
# (approxdarts_np.runs.replicas), per thread: ``reduce``, a function from this replica's float64
# (-min, max) to the elementwise maximum over every replica's; absent in one process.
_RANGES = threading.local()


def range_activations_with(reduce) -> None:
    """Make 8-bit convolutions, in this thread, quantise their input with the range ``reduce`` finds over
    every replica of a split batch (None: the batch is this thread's alone)."""
    _RANGES.reduce = reduce


def activation_params(x) -> tuple[float, int]:
    """:func:`~approxdarts_np.approx.quantize.quant_params` of the activation ``x``, or of the whole batch
    when the batch is split over replicas (:func:`range_activations_with`)."""
    reduce = getattr(_RANGES, "reduce", None)
    if reduce is None:
        return quant_params(x)
    neg_lo, hi = reduce(np.array([-float(x.min()), float(x.max())]))
    if not (np.isfinite(neg_lo) and np.isfinite(hi)):
        raise ValueError("cannot quantise a tensor that contains NaN or infinity")
    return params_of_range(-float(neg_lo), float(hi))


def approx_conv2d(x, w, plan, stride=1, padding=0, dilation=1, groups=1, engine="auto"):
    """Quantise x and w once and return ``(y, (qx, sx, zx), (qw, sw, zw))``, y float32.

    ``y = float32(sx * sw * acc)`` with ``acc`` exactly :func:`lut_conv2d` of the codes (the
    quantised convolution's forward); the uint8 codes and their parameters come back for the
    backward pass. x (N, Ci, H, W) and w (Co, Ci/groups, kh, kw) float32. ``engine`` as in
    :func:`lut_conv2d`; ``"auto"`` takes :func:`choose_engine`'s pick for this shape. The
    low-rank engine runs the float kernels on integer features: for depthwise and pointwise
    convolutions (the searched ones) one kernel quantises x as it reads it, convolves its
    features and scales the result in cache (``depthwise_conv2d_codes``,
    ``pointwise_conv2d_codes``); other shapes quantise into a feature array first. The gather
    engine quantises to codes and looks the products up.
    """
    if not isinstance(plan, LutPlan):
        raise ValueError(f"plan must be a LutPlan (make_lut_plan), got {type(plan).__name__}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    stride, padding, dilation = _geometry(stride, padding, dilation)
    x = check_float32_4d(x, "x")
    w = check_float32_4d(w, "w")
    n_img, n_in, h, wd = x.shape
    n_out, n_in_g, k_h, k_w = w.shape
    groups = int(groups)
    if groups < 1 or n_in % groups or n_out % groups or n_in_g != n_in // groups:
        raise ValueError(f"w {w.shape} does not fit x {x.shape} with groups={groups}")
    conv_output_hw(h, wd, k_h, k_w, stride + padding + dilation)   # raises on an empty output
    depthwise = groups == n_in and n_in_g == 1 and n_out == n_in
    sx, zx = activation_params(x)
    chosen = choose_engine(plan, x.shape, w.shape, stride, groups) if engine == "auto" else engine
    geometry = (stride, padding, dilation, groups, depthwise)
    if chosen == "lowrank":
        if plan.factors is None:
            raise ValueError(f"engine='lowrank' needs a decomposition; this plan has none "
                             f"({plan.reason})")
        done = _run_lowrank(x, w, plan, sx, zx, geometry)
        if done is not None:
            return done
        if engine == "lowrank":
            # forced past the float32 bound: exact tap chunks (dense) or LowRankBoundError
            sw, zw = quant_params(w)
            qw, _ = codes_and_features(w, sw, zw, _NO_FEATURES_T, -1)
            qx, _ = codes_and_features(x, sx, zx, _NO_FEATURES_T, -1)
            acc = lut_conv2d(qx, zx, qw, zw, plan, stride, padding, dilation, groups, engine=engine)
            return (feature_sum(acc, 1, np.zeros(n_out, np.int64), sx * sw), (qx, sx, zx),
                    (qw, sw, zw))
        # an automatic choice past the float32 bound gathers instead
    return _run_gather(x, w, plan, sx, zx, geometry)


def _run_lowrank(x, w, plan, sx, zx, geometry):
    """The low-rank engine of :func:`approx_conv2d`: ``(y, x codes, w codes)``, or None when the
    features' sums could leave float32's exact integers (the caller then gathers, or for a
    forced engine runs exact tap chunks)."""
    stride, padding, dilation, groups, depthwise = geometry
    n_out, n_in_g, k_h, k_w = w.shape
    act = activation_features(plan.factors, zx)
    # the weights' range, codes, features and filter constants in one compiled call
    sw, zw, qw, wf, cst = weight_codes(w, weight_error_rows(plan.factors), act.const)
    wgt = weight_features(plan.factors, zw)
    if not features_fit_float32(n_in_g * k_h * k_w, act, wgt):
        return None
    n_feat = act.table.shape[1]
    if depthwise:
        wf = wf.reshape(n_out * n_feat, 1, k_h, k_w)
    pointwise = (groups == 1 and (k_h, k_w) == (1, 1) and stride == (1, 1)
                 and padding == (0, 0))
    inv = float32_inverse(sx)
    if (depthwise or pointwise) and inv is not None:
        # one pass: quantise x, run the float kernel on its features, add cst, scale
        # (the kernels' unchecked entries: every argument is checked by approx_conv2d)
        if depthwise:
            y, qx = kdw.depthwise_codes_unchecked(
                x, sx, inv, zx, act.table_t, act.affine, wf, cst, sx * sw,
                stride + padding + dilation)
        else:
            y, qx = kconv.pointwise_codes_unchecked(x, sx, inv, zx, act.table_t,
                                                    act.affine, wf, cst, sx * sw)
        return y, (qx, sx, zx), (qw, sw, zw)
    qx, xf = codes_and_features(x, sx, zx, act.table_t, act.affine)
    y = feature_conv(xf, wf, cst, n_feat, depthwise, stride, padding, dilation, groups, sx * sw)
    return y, (qx, sx, zx), (qw, sw, zw)


def _run_gather(x, w, plan, sx, zx, geometry):
    """The gather engine of :func:`approx_conv2d`: ``(y, x codes, w codes)``."""
    stride, padding, dilation, groups, depthwise = geometry
    sw, zw = quant_params(w)
    qw, _ = codes_and_features(w, sw, zw, _NO_FEATURES_T, -1)
    if groups == 1 or depthwise:
        # one pass where the byte-shuffle kernel runs: quantise x as it is read
        fused = lut_conv_codes(x, sx, zx, qw, zw, plan.gather_table, stride, padding,
                               dilation, sx * sw, table_t=_transposed_table(plan))
        if fused is not None:
            return fused[0], (fused[1], sx, zx), (qw, sw, zw)
    qx, _ = codes_and_features(x, sx, zx, _NO_FEATURES_T, -1)
    out_size = conv_output_hw(x.shape[2], x.shape[3], w.shape[2], w.shape[3],
                              stride + padding + dilation)
    y = _gather_conv2d(qx, zx, qw, zw, plan, stride, padding, dilation, groups, out_size,
                       scale=sx * sw)
    return y, (qx, sx, zx), (qw, sw, zw)


# Cost model of one forward call, seconds (see choose_engine). Rates from
# benchmarks/bench_approx.py on the reference machine (2 threads): per multiply-accumulate of the
# float depthwise and pointwise kernels and of the two gather kernels, per element of a feature
# pass (quantise or look up one feature, sum one output), and per kernel call.
_COST = {
    "dw_float_mac": 1 / 15e9,
    "dw_gather_mac": 1 / 4e9,
    "gemm_mac": 1 / 40e9,
    "bag_mac": 1 / 15e9,
    "bag_row": 1 / 2e9,
    "element": 1 / 2e9,
    "call": 20e-6,
}


@lru_cache(maxsize=4096)   # called per convolution with a handful of distinct shapes per run
def choose_engine(plan, x_shape, w_shape, stride=1, groups=1):
    """The cheaper engine (``"gather"`` or ``"lowrank"``) for this plan and convolution shape.

    A plan without factors always gathers. Otherwise the estimated time of each engine is
    compared (:data:`_COST`): the low-rank engine costs 1 + R float convolutions plus a
    feature pass per term over the input and the output; the gather costs one lookup per
    multiply-accumulate (the pointwise gather also lays out K x 256 table rows per call).
    """
    if plan.factors is None:
        return "gather"
    n_feat = 1 + plan.rank
    n_img, n_in, h, wd = x_shape
    n_out, n_in_g, k_h, k_w = w_shape
    s_h, s_w = as_pair(stride, "stride")
    n_pix = n_img * (-(-h // s_h)) * (-(-wd // s_w))
    macs = n_pix * n_out * n_in_g * k_h * k_w
    elements = n_img * n_in * h * wd + n_pix * n_out
    c = _COST
    depthwise = groups == n_in and n_in_g == 1 and n_out == n_in
    if depthwise:
        lowrank = n_feat * (macs * c["dw_float_mac"] + elements * c["element"]) + 3 * c["call"]
        gather = macs * c["dw_gather_mac"] + 2 * elements * c["element"] + 3 * c["call"]
    else:
        lowrank = n_feat * (macs * c["gemm_mac"] + elements * c["element"]) + 3 * c["call"]
        gather = (macs * c["bag_mac"] + n_in_g * k_h * k_w * 256 * n_out * c["bag_row"]
                  + 2 * elements * c["element"] + 3 * c["call"])
    return "lowrank" if lowrank <= gather else "gather"
