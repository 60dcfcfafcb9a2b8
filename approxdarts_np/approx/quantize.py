"""Per-tensor asymmetric unsigned 8-bit quantisation, following TFApprox.

For a tensor ``x`` (docs/design.md §2):

- range: ``lo = min(min(x), 0)``, ``hi = max(max(x), 0)`` — widened so that 0 is inside;
- scale ``s = (hi - lo) / 255``; zero point ``z = round(-lo / s)`` clamped to 0..255;
- ``q = clamp(round(x / s) + z, 0, 255)``; de-quantised value ``(q - z) * s``.

Choices, so that results are exactly reproducible:

- **Rounding is half up** (``round(v) = floor(v + 1/2)``, computed exactly as ``floor(v)`` plus
  one when ``v - floor(v) >= 1/2``). This is TFApprox's rule: its kernels quantise with
  ``(uint8) clamp((x - nudged_min) * inv_scale + 0.5, 0, 255)`` (truncation of a non-negative
  value, i.e. floor) and take the zero point from TensorFlow's ``Nudge``, which uses
  ``std::round`` on a non-negative number (half away from zero = half up). NumPy's ``np.rint``
  (half to even) would differ on exact ties.
- **Arithmetic is float64.** ``s`` is a Python float computed from the float32 min and max
  (converted exactly); ``x / s`` is evaluated in float64 with IEEE division, no fast-math.
  TFApprox does the same steps in float32 via ``1/s``, so a value sitting within float32
  rounding of a tie can land one step apart; the rule is the same, the bits are ours. (The
  pass itself takes a float32 shortcut and redoes every value near a tie by this rule, which
  gives the same codes: :mod:`approxdarts_np.kernels.codes`.)
- The compiled passes (range, codes, features, de-quantisation, the weights' one-call pass)
  are the unchecked kernels of :mod:`approxdarts_np.kernels.quantize`; the functions here
  check their arguments and call them.
- **Zero is exact**: ``x == 0`` quantises to ``z`` and de-quantises to exactly 0, so zero padding
  is ``q = z``. Every ``x`` in ``[min(x), max(x)]`` de-quantises to within ``s / 2`` of itself
  (plus float32 rounding of the result).
- **The all-zero tensor** (``lo == hi == 0``) gets ``s = 1.0, z = 0``: every value quantises to
  0 and de-quantises to 0. (TFApprox stores ``s = 0`` there; a unit scale avoids dividing by 0
  and gives the same numbers.)
- **Widening, not nudging**: TFApprox's ``fake_approx_conv2d`` passes the raw batch min/max to
  TensorFlow's ``Nudge``, which for an all-positive tensor *shifts* the range to
  ``[0, max - min]`` rather than widening it to ``[0, max]``. We widen as docs/design.md §2 says (as
  TensorFlow's quantisation-aware training does with ``min(batch_min, 0)``); the two agree
  whenever the tensor already spans 0, as ReLU outputs and weights do.
"""
from __future__ import annotations

import numbers

import numpy as np

from approxdarts_np.kernels._util import parallel_pays
from approxdarts_np.kernels.codes import affine_offset, float32_inverse
from approxdarts_np.kernels.quantize import (_dequantize_kernel, _exact_rows, _float32_params,
                                             _quantize_features_parallel,
                                             _quantize_features_serial, _quantize_kernel,
                                             _weight_codes_kernel)

QMIN = 0
QMAX = 255
# Tensors at least this large are quantised into features by a parallel kernel. Below it the
# pass runs on one thread: on a loaded 2-core machine every parallel region can wait a
# scheduler slice for its second thread, which costs more than it saves.
_PARALLEL_MIN = 1 << 20


def _as_float_array(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype == np.float32 and x.size:
        return x
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    if x.size == 0:
        raise ValueError(f"{name} is empty; quantisation needs at least one value")
    return x


def _round_half_up(v: float) -> int:
    floor = np.floor(v)
    return int(floor) + (1 if v - floor >= 0.5 else 0)


def quant_params(x) -> tuple[float, int]:
    """Return ``(scale, zero_point)`` for quantising ``x`` per tensor to unsigned 8 bit.

    ``scale`` is a Python float (float64), ``zero_point`` a Python int in 0..255. Raises
    ValueError if ``x`` is empty or holds NaN or infinity, TypeError if it is not floating point.
    """
    x = _as_float_array(x, "x")
    if x.dtype == np.float32:
        scale, zero_point, finite = _float32_params(np.ascontiguousarray(x).reshape(-1)
                                                    .view(np.int32))
        if not finite:
            raise ValueError("cannot quantise a tensor that contains NaN or infinity")
        return float(scale), int(zero_point)
    lo, hi = float(x.min()), float(x.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError("cannot quantise a tensor that contains NaN or infinity")
    return params_of_range(lo, hi)


def params_of_range(lo: float, hi: float) -> tuple[float, int]:
    """(scale, zero point) of the finite range [lo, hi], widened to contain 0."""
    lo = min(lo, 0.0)
    hi = max(hi, 0.0)
    if hi == lo:
        return 1.0, 0
    scale = (hi - lo) / float(QMAX - QMIN)
    zero_point = min(max(_round_half_up(-lo / scale), QMIN), QMAX)
    return scale, zero_point


def _check_params(scale, zero_point) -> tuple[float, int]:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number, got {scale!r}")
    scale = float(scale)
    if not (np.isfinite(scale) and scale > 0.0):
        raise ValueError(f"scale must be finite and > 0, got {scale!r}")
    if isinstance(zero_point, bool) or not isinstance(zero_point, numbers.Integral):
        raise TypeError(f"zero_point must be an integer, got {zero_point!r}")
    zero_point = int(zero_point)
    if not QMIN <= zero_point <= QMAX:
        raise ValueError(f"zero_point must lie in {QMIN}..{QMAX}, got {zero_point}")
    return scale, zero_point


def quantize_with(x, scale: float, zero_point: int) -> np.ndarray:
    """Return ``x`` quantised with the given parameters as a uint8 array of ``x``'s shape.

    Values outside the representable range ``[-z*s, (255-z)*s]`` saturate to 0 or 255; ±inf
    saturate too. Raises ValueError for NaN, a non-positive scale or a zero point outside 0..255.
    """
    x = _as_float_array(x, "x")
    scale, zero_point = _check_params(scale, zero_point)
    flat = np.ascontiguousarray(x).reshape(-1)
    out = np.empty(flat.size, dtype=np.uint8)
    bad = _quantize_kernel(flat, scale, zero_point, out)
    if bad:
        raise ValueError(f"cannot quantise a tensor that contains NaN ({bad} values)")
    return out.reshape(x.shape)


def quantize_per_tensor(x) -> tuple[np.ndarray, float, int]:
    """Return ``(q, scale, zero_point)``: ``x`` quantised with its own :func:`quant_params`."""
    scale, zero_point = quant_params(x)
    codes, _ = codes_and_features(np.asarray(x), scale, zero_point, _NO_FEATURES)
    return codes, scale, zero_point


def quantize_to_features(x, scale: float, zero_point: int, table) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(q, features)``: the codes of ``x`` and, in the same pass, ``table[q]`` per element.

    ``x`` has at least two dimensions (N, C, ...) and only finite values (as after
    :func:`quant_params`); ``table`` (256, J) float32 maps a code to J features (J = 0: codes only). ``q`` is the
    uint8 code array of ``x``'s shape, exactly :func:`quantize_with`'s; ``features`` is float32
    (N, C * J, ...) with channel ``c * J + j`` holding feature ``j`` of channel ``c``: the
    layout in which a depthwise or grouped convolution sees the J features as channels.
    """
    x = _as_float_array(x, "x")
    if x.ndim < 2:
        raise ValueError(f"x must have >= 2 dimensions (N, C, ...), got shape {x.shape}")
    scale, zero_point = _check_params(scale, zero_point)
    table = np.asarray(table)
    if table.ndim != 2 or table.shape[0] != 256:
        raise ValueError(f"table must be (256, J), got {table.shape}")
    table_t = np.ascontiguousarray(table.T, dtype=np.float32)
    return codes_and_features(x, scale, zero_point, table_t)


_NO_FEATURES = np.zeros((0, 256), np.float32)


def codes_and_features(x, scale, zero_point, table_t, affine=None):
    """:func:`quantize_to_features` without its argument checks, for the hot path.

    ``x`` a finite float array (as after :func:`quant_params`), ``scale`` and ``zero_point``
    valid, ``table_t`` the (J, 256) float32 C-contiguous transpose of the feature table;
    ``affine`` the :func:`~approxdarts_np.kernels.codes.affine_offset` of ``table_t`` when known.
    """
    n_feat = table_t.shape[0]
    planes = x.shape[0] * x.shape[1] if x.ndim >= 2 else 1
    x2 = np.ascontiguousarray(x).reshape(planes, -1)
    codes = np.empty(x2.shape, np.uint8)
    feats = np.empty((planes, n_feat, x2.shape[1]), np.float32)
    if affine is None:
        affine = affine_offset(table_t)
    inv = float32_inverse(scale)
    if x2.dtype != np.float32 or inv is None:
        _exact_rows(x2, scale, zero_point, table_t, codes, feats)
    elif parallel_pays(x.size, _PARALLEL_MIN) and planes > 1:
        _quantize_features_parallel(x2, scale, inv, zero_point, table_t, affine, codes, feats)
    else:
        _quantize_features_serial(x2, scale, inv, zero_point, table_t, affine, codes, feats)
    if x.ndim < 2:
        return codes.reshape(x.shape), feats.reshape(n_feat, x.size)
    return codes.reshape(x.shape), feats.reshape((x.shape[0], x.shape[1] * n_feat) + x.shape[2:])


def weight_codes(w, err_t, g0):
    """Quantise a convolution's weights in one call: ``(scale, zero_point, qw, wf, cst)``.

    w (Co, Ci/g, kh, kw) float32 C-contiguous; err_t (R, 256) float32, the error features
    v[b] of a low-rank table by rows (independent of the zero point); g0 (256,) int64, the
    activation side's constant row. Gives exactly what :func:`quant_params`,
    :func:`codes_and_features` (feature table (b - zw, v[b]), affine zw) and
    ``filter_constants`` give, in one compiled pass for the whole (small) tensor: ``qw`` uint8
    of w's shape, ``wf`` (Co, Ci/g * (1 + R), kh, kw) (input channel c*(1 + R) + j: feature j
    of channel c), ``cst`` (Co,) int64 = sum over each filter's taps of g0[qw]. ValueError for
    NaN or infinity, as :func:`quant_params`.
    """
    n_out, n_in_g, k_h, k_w = w.shape
    scale, zero_point, finite, codes, feats, cst = _weight_codes_kernel(
        w.reshape(n_out * n_in_g, k_h * k_w), err_t, g0, n_in_g)
    if not finite:
        raise ValueError("cannot quantise a tensor that contains NaN or infinity")
    n_feat = feats.shape[1]
    return (float(scale), int(zero_point), codes.reshape(w.shape),
            feats.reshape(n_out, n_in_g * n_feat, k_h, k_w), cst)


def dequantize(q, scale: float, zero_point: int) -> np.ndarray:
    """Return ``(q - zero_point) * scale`` as float32 (computed in float64, rounded once)."""
    q = np.asarray(q)
    if q.dtype != np.uint8:
        raise TypeError(f"q must be a uint8 array, got dtype {q.dtype}")
    scale, zero_point = _check_params(scale, zero_point)
    return dequantize_codes(q, scale, zero_point)


def dequantize_codes(q, scale: float, zero_point: int) -> np.ndarray:
    """:func:`dequantize` without its argument checks, for the hot path (the backward of the
    quantised convolution): ``q`` uint8, ``scale`` and ``zero_point`` as quantisation made
    them."""
    flat = np.ascontiguousarray(q).reshape(-1)
    out = np.empty(flat.size, dtype=np.float32)
    _dequantize_kernel(flat, scale, zero_point, out)
    return out.reshape(q.shape)
