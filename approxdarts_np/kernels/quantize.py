"""Compiled passes of the per-tensor 8-bit quantisation (Numba kernels, unchecked).

The validated public API is :mod:`approxdarts_np.approx.quantize` (the rule, its choices and
its argument checks are documented there); it calls the kernels below after checking their
arguments. Every kernel here is internal: it takes C-contiguous arrays of the dtypes and
shapes its docstring names and finite parameters as the API checked them, and does no checks
of its own. The per-plane code and feature helpers they compile in are in
:mod:`approxdarts_np.kernels.codes`.

Edit note: Numba's cache does not see changes to :mod:`~approxdarts_np.kernels.codes` from
the kernels here; delete the ``__pycache__`` folder of ``approxdarts_np/kernels`` after
editing it.
"""
import numpy as np
from numba import config, njit, prange

from .codes import (_FLOAT32_MAX, _FLOAT32_TINY, code_exact, codes_and_feature0, codes_plane,
                    feature_plane)


@njit(cache=True)
def _float32_params(bits):
    """The (scale, zero_point, finite) of a float32 array given as its int32 view, in one pass:
    the range widened to contain 0, as ``approx.quantize.params_of_range`` takes it.

    Float comparisons in a loop do not vectorise (NaN rules); integer ones do. The key
    k(b) = b ^ ((b >> 31) & 0x7FFFFFFF) of a float's bits b orders like the floats (negative
    floats have their magnitude bits flipped) and is its own inverse; NaNs sort beyond +-inf,
    so a NaN makes a bound NaN or infinite. One pass for both bounds, where ``x.min()`` and
    ``x.max()`` take two.
    """
    lo_k = np.int32(0x7FFFFFFF)
    hi_k = np.int32(-0x80000000)
    for i in range(bits.size):
        b = bits[i]
        k = np.int32(b ^ ((b >> 31) & 0x7FFFFFFF))   # the cast keeps the loop in int32 lanes
        lo_k = min(lo_k, k)
        hi_k = max(hi_k, k)
    keys = np.empty(2, np.int32)
    keys[0] = np.int32(lo_k ^ ((lo_k >> 31) & 0x7FFFFFFF))
    keys[1] = np.int32(hi_k ^ ((hi_k >> 31) & 0x7FFFFFFF))
    vals = keys.view(np.float32)
    lo = np.float64(vals[0])
    hi = np.float64(vals[1])
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return 1.0, 0, False
    if lo > 0.0:      # min(lo, 0.0) and max(hi, 0.0) as Python takes them (a -0.0 is kept)
        lo = 0.0
    if hi < 0.0:
        hi = 0.0
    if hi == lo:
        return 1.0, 0, True
    scale = (hi - lo) / 255.0
    v = -lo / scale
    f = np.floor(v)
    zp = np.int64(f) + (1 if v - f >= 0.5 else 0)
    return scale, min(max(zp, 0), 255), True


# The element-wise kernels are serial below approx.quantize._PARALLEL_MIN elements: for a
# small tensor a thread team costs more than it saves.
@njit(cache=True)
def _quantize_kernel(x, scale, zero_point, out):
    """``out[i] = clamp(round_half_up(x[i] / scale) + zero_point, 0, 255)`` for 1-D float x
    (any finite or infinite values) into uint8 out; returns the number of NaNs (coded z)."""
    bad = 0
    for i in range(x.size):
        v = np.float64(x[i]) / scale
        if v != v:
            bad += 1
            out[i] = zero_point
            continue
        out[i] = code_exact(x[i], scale, zero_point)
    return bad


@njit(cache=True)
def _features_rows(x2, scale, inv, zero_point, table_t, affine, codes, feats, lo, hi):
    """Planes lo..hi: codes[p, i] = code of x2[p, i], feats[p, j, i] = feature j of the code."""
    near = np.empty(x2.shape[1], np.uint8)
    for p in range(lo, hi):
        if table_t.shape[0] == 0:
            codes_plane(x2[p], scale, inv, zero_point, codes[p], near)
            continue
        codes_and_feature0(x2[p], scale, inv, zero_point, codes[p], near, table_t, affine,
                           feats[p, 0])
        for j in range(1, table_t.shape[0]):
            feature_plane(codes[p], table_t, affine, j, feats[p, j])


@njit(cache=True)
def _quantize_features_serial(x2, scale, inv, zero_point, table_t, affine, codes, feats):
    """Codes (planes, P) uint8 and features (planes, J, P) float32 of x2 (planes, P) float32
    (finite), ``inv`` = float32(1/scale) normal, ``table_t`` (J, 256) float32, on one thread."""
    _features_rows(x2, scale, inv, zero_point, table_t, affine, codes, feats, 0, x2.shape[0])


@njit(cache=True, parallel=True)
def _quantize_features_parallel(x2, scale, inv, zero_point, table_t, affine, codes, feats):
    """:func:`_quantize_features_serial` in up to 64 blocks of planes on the thread team."""
    n_planes = x2.shape[0]
    n_blocks = min(n_planes, 64)
    for b in prange(n_blocks):
        _features_rows(x2, scale, inv, zero_point, table_t, affine, codes, feats,
                       b * n_planes // n_blocks, (b + 1) * n_planes // n_blocks)


@njit(cache=True)
def _exact_rows(x2, scale, zero_point, table_t, codes, feats):
    """Codes by the float64 rule alone (float64 input, or a scale without a float32 inverse)."""
    for p in range(x2.shape[0]):
        for i in range(x2.shape[1]):
            codes[p, i] = code_exact(x2[p, i], scale, zero_point)
        for j in range(table_t.shape[0]):
            feature_plane(codes[p], table_t, -1, j, feats[p, j])


# De-quantisation: out[i] = float32((q[i] - z) * s), the product in float64. Two spellings of
# the same value (q - z is an exact integer either way, so the bits are the same): LLVM
# vectorises the int64 difference's conversion only with AVX-512 (vcvtqq2pd), and with AVX2
# only the uint8 -> float64 conversion; each is the faster one on its own target (about 4x
# apart with AVX2 for a 256K-element plane, 1.3x with AVX-512).
@njit(cache=True)
def _dequantize_int(q, scale, zero_point, out):
    """``out[i] = float32((q[i] - zero_point) * scale)``, the difference in integers."""
    for i in range(q.size):
        out[i] = np.float32(np.float64(np.int32(q[i]) - zero_point) * scale)


@njit(cache=True)
def _dequantize_float(q, scale, zero_point, out):
    """``out[i] = float32((q[i] - zero_point) * scale)``, the difference in float64."""
    z = np.float64(zero_point)
    for i in range(q.size):
        out[i] = np.float32((np.float64(q[i]) - z) * scale)


def _target_has_avx512():
    """Whether Numba compiles for AVX-512: the features ``NUMBA_CPU_FEATURES`` lists when set,
    else the host's."""
    if config.CPU_FEATURES is not None:
        return "+avx512f" in config.CPU_FEATURES.split(",")
    from llvmlite import binding
    try:
        return bool(binding.get_host_cpu_features().get("avx512f"))
    except Exception:
        return False


# the de-quantisation kernel of this process's target: q (n,) uint8, out (n,) float32
_dequantize_kernel = _dequantize_int if _target_has_avx512() else _dequantize_float


@njit(cache=True)
def _weight_codes_kernel(w2, err_t, g0, planes_per_filter):
    """``approx.quantize.weight_codes`` on w2 (planes, taps) float32:
    (scale, zp, finite, codes, feats, cst)."""
    n_planes, n_taps = w2.shape
    n_feat = 1 + err_t.shape[0]
    scale, zero_point, finite = _float32_params(w2.reshape(-1).view(np.int32))
    codes = np.empty((n_planes, n_taps), np.uint8)
    feats = np.empty((n_planes, n_feat, n_taps), np.float32)
    cst = np.zeros(n_planes // planes_per_filter, np.int64)
    if not finite:
        return scale, zero_point, False, codes, feats, cst
    inv = 1.0 / scale
    if _FLOAT32_TINY <= inv <= _FLOAT32_MAX:
        near = np.empty(n_taps, np.uint8)
        for p in range(n_planes):
            codes_plane(w2[p], scale, np.float32(inv), zero_point, codes[p], near, feats[p, 0],
                        zero_point)
    else:
        for p in range(n_planes):
            for i in range(n_taps):
                code = code_exact(w2[p, i], scale, zero_point)
                codes[p, i] = code
                feats[p, 0, i] = np.float32(code - zero_point)
    for p in range(n_planes):
        for j in range(1, n_feat):
            feature_plane(codes[p], err_t, -1, j - 1, feats[p, j])
        total = np.int64(0)
        for i in range(n_taps):
            total += g0[codes[p, i]]
        cst[p // planes_per_filter] += total
    return scale, zero_point, True, codes, feats, cst
