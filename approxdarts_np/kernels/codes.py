"""8-bit codes and integer features of float32 values, one plane at a time (Numba helpers).

The rule (docs/design.md §2, :mod:`approxdarts_np.approx.quantize`): the code of a finite value v
with scale s and zero point z is ``clamp(round_half_up(v / s) + z, 0, 255)``, the quotient
taken in float64 with IEEE division. These helpers are compiled into the quantisation pass
and into the convolution kernels that quantise their input as they read it
(:func:`approxdarts_np.kernels.depthwise.depthwise_conv2d_codes`,
:func:`approxdarts_np.kernels.conv.pointwise_conv2d_codes`), so that both give the same codes.

Speed: :func:`codes_plane` computes q = v * float32(1/s) in float32 (vectorised; about twice
as fast as the float64 division) and redoes with the exact rule (:func:`code_exact`) every
value whose q has a fractional part within TIE_MARGIN of 1/2. Why this gives exactly the
float64 codes: for |q| < 512 the float32 q lies within 2 * 2**-24 * 512 = 6.2e-5 of v/s (the
float64 quotient is within 2**-44 of it) and q - floor(q) is exact but for q in (-1, 0)
(error <= 2**-25), so outside the margin q and v/s round to the same integer; for |q| >= 512
the code saturates to 0 or 255 whatever the rounding (z <= 255). TIE_MARGIN = 1.2e-4 leaves
about twice that bound; about 1 value in 4,000 is redone.

Edit note: Numba's cache does not see changes here from the kernels that compile these in;
delete the ``__pycache__`` folders of ``approxdarts_np/kernels`` and ``approxdarts_np/approx``
after editing.
"""
import numpy as np
from numba import njit

TIE_MARGIN = 2.0 ** -13


@njit(cache=True, inline="always")
def code_exact(v, scale, zero_point):
    """The code of one finite value by the float64 rule: clamp(round_half_up(v/s) + z, 0, 255)."""
    q = np.float64(v) / scale
    f = np.floor(q)
    f = f + (1.0 if q - f >= 0.5 else 0.0)
    return np.int32(min(max(f + zero_point, 0.0), 255.0))


@njit(cache=True)
def codes_plane(src, scale, inv, zero_point, dst, near, feat=None, affine=0):
    """dst[i] = code of src[i] for the 1-D float32 arrays src (finite values) and uint8 dst.

    ``inv`` = float32(1 / scale) (finite, > 0); ``near`` a uint8 scratch at least as long.
    With a float32 array ``feat`` (as long as src), also feat[i] = code - ``affine`` (the
    exact feature 0 of :func:`feature_plane`, written in the same pass).
    """
    zp = np.float32(zero_point)
    off = np.float32(affine)
    any_near = np.int32(0)   # an int32 max, not a count nor a uint8 |=: the loop vectorises
    for i in range(src.shape[0]):
        q = src[i] * inv
        f = np.floor(q)
        r = q - f
        f = f + (np.float32(1.0) if r >= np.float32(0.5) else np.float32(0.0))
        flag = np.int32(1 if abs(r - np.float32(0.5)) < np.float32(TIE_MARGIN) else 0)
        any_near = max(any_near, flag)
        near[i] = np.uint8(flag)
        v = min(max(f + zp, np.float32(0.0)), np.float32(255.0))
        dst[i] = np.uint8(np.int32(v))
        if feat is not None:
            feat[i] = v - off
    if any_near:
        _redo_near(src, scale, zero_point, dst, near, feat, affine)


@njit(cache=True)
def _redo_near(src, scale, zero_point, dst, near, feat, affine):
    """Redo by the exact rule the values :func:`codes_plane` flagged in ``near``.

    About one value in 4,000 is flagged, so most 64-byte blocks of ``near`` are all zero: the
    blocks are tested as eight OR-ed 64-bit words (a byte-by-byte scan of a 32x32 plane cost
    as much as the quantisation loop itself) and only flagged blocks are scanned by byte.
    """
    n = src.shape[0]
    n_blocks = n // 64
    words = near[:n_blocks * 64].view(np.uint64)
    for b in range(n_blocks + 1):
        if b < n_blocks:
            w = words[8 * b:8 * b + 8]
            if (w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7]) == 0:
                continue
        for i in range(64 * b, min(64 * b + 64, n)):
            if near[i]:
                code = code_exact(src[i], scale, zero_point)
                dst[i] = code
                if feat is not None:
                    feat[i] = np.float32(code - affine)


@njit(cache=True)
def codes_and_feature0(src, scale, inv, zero_point, dst, near, table_t, affine, feat0):
    """:func:`codes_plane` of src into dst, and feature 0 of those codes into feat0: in the
    same pass when ``affine`` >= 0 (feature 0 is code - affine), else by :func:`feature_plane`."""
    if affine >= 0:
        codes_plane(src, scale, inv, zero_point, dst, near, feat0, affine)
    else:
        codes_plane(src, scale, inv, zero_point, dst, near)
        feature_plane(dst, table_t, affine, 0, feat0)


@njit(cache=True)
def feature_plane(codes, table_t, affine, j, out):
    """out[i] = feature j of codes[i]: ``table_t[j, code]``, or code - affine when j == 0 and
    ``affine`` >= 0 (computed: the exact part of every feature table is code - z)."""
    if j == 0 and affine >= 0:
        for i in range(codes.shape[0]):
            out[i] = np.float32(np.int32(codes[i]) - affine)
    else:
        col = table_t[j]
        for i in range(codes.shape[0]):
            out[i] = col[codes[i]]


@njit(cache=True)
def scale_row(row, cst, out_scale):
    """row[i] = float32((row[i] + cst) * out_scale) in place, the sum and product in float64.

    ``row`` float32 holds exact integers; ``cst`` an integer. With cst == 0 the sum is taken
    in float32 (row[i] + 0 is exact there too, and turns -0 into +0 as the float64 sum does),
    which leaves only the product to the half-width float64 lanes.
    """
    if cst == 0:
        for i in range(row.shape[0]):
            row[i] = np.float32(np.float64(row[i] + np.float32(0.0)) * out_scale)
    else:
        base = np.float64(cst)
        for i in range(row.shape[0]):
            row[i] = np.float32((np.float64(row[i]) + base) * out_scale)


def affine_offset(table_t) -> int:
    """c when feature 0 of ``table_t`` (J, 256) float32 is code - c for every code, else -1."""
    if table_t.shape[0] == 0:
        return -1
    c = float(-table_t[0, 0])
    if 0 <= c <= 255 and c == int(c) and np.array_equal(table_t[0], _CODES - np.float32(c)):
        return int(c)
    return -1


def float32_inverse(scale):
    """float32(1 / scale) for a scale > 0, or None when that is not a normal float32 (then
    the error bound above does not hold and the exact rule must be used)."""
    inv = 1.0 / scale
    if not _FLOAT32_TINY <= inv <= _FLOAT32_MAX:
        return None
    return np.float32(inv)


_FLOAT32_TINY = float(np.finfo(np.float32).tiny)
_FLOAT32_MAX = float(np.finfo(np.float32).max)


_CODES = np.arange(256, dtype=np.float32)


def check_code_args(scale, zero_point, table_t, affine):
    """``(inv, zero_point, table_t, affine)`` checked for the convolutions that quantise their
    input: a scale with a normal float32 inverse, a zero point in 0..255, a (J, 256) feature
    table with J >= 1 (float32 C-contiguous) and its affine offset (computed when None)."""
    inv = float32_inverse(float(scale)) if float(scale) > 0 else None
    if inv is None:
        raise ValueError(f"scale {scale!r} has no normal float32 inverse")
    if not 0 <= int(zero_point) <= 255:
        raise ValueError(f"zero_point must lie in 0..255, got {zero_point!r}")
    table_t = np.ascontiguousarray(table_t, dtype=np.float32)
    if table_t.ndim != 2 or table_t.shape[1] != 256 or table_t.shape[0] < 1:
        raise ValueError(f"table_t must be (J, 256) with J >= 1, got {table_t.shape}")
    if affine is None:
        affine = affine_offset(table_t)
    return inv, int(zero_point), table_t, int(affine)
