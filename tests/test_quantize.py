"""Per-tensor asymmetric uint8 quantisation.

References: a slow NumPy twin of the kernels (must match exactly), the round-trip bound
``|dequantize(quantize(x)) - x| <= s/2`` (plus float32 rounding of the result: ``|x| * 2^-23``
and ``s * 1e-9`` for the float64 division), and TFApprox's own float32 formula (agrees except
within float32 rounding of a tie: at most one step, on a tiny share of values).
"""
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from approxdarts_np.approx.quantize import (
    dequantize, quant_params, quantize_per_tensor, quantize_to_features, quantize_with,
)
from approxdarts_np.kernels.lut_conv import code_features, feature_sum


def _twin_quantize(x, scale, zero_point):
    """Obvious NumPy version: half-up rounding of x/s in float64, plus z, clamped."""
    v = np.asarray(x, dtype=np.float64) / scale
    f = np.floor(v)
    rounded = f + (v - f >= 0.5)
    return np.clip(rounded + zero_point, 0, 255).astype(np.uint8)


def _twin_dequantize(q, scale, zero_point):
    return ((q.astype(np.float64) - zero_point) * scale).astype(np.float32)


def _roundtrip_error_ok(x, back, scale):
    x64 = np.asarray(x, dtype=np.float64)
    bound = scale / 2 + scale * 1e-9 + np.abs(x64) * 2.0 ** -23 + 1e-45
    return bool(np.all(np.abs(back.astype(np.float64) - x64) <= bound))


_shapes = hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=6)


@st.composite
def _tensors(draw):
    """float32 tensors: mixed sign, all positive, all negative, constant, tiny or wide range."""
    kind = draw(st.sampled_from(["mixed", "positive", "negative", "constant", "tiny", "wide"]))
    shape = draw(_shapes)
    if kind == "constant":
        value = draw(st.floats(-1e3, 1e3, width=32))
        return np.full(shape, value, dtype=np.float32)
    lo, hi = {"mixed": (-10.0, 10.0), "positive": (0.5, 20.0), "negative": (-20.0, -0.5),
              "tiny": (-2.0 ** -20, 2.0 ** -20), "wide": (-2.0 ** 20, 2.0 ** 20)}[kind]
    return draw(hnp.arrays(np.float32, shape, elements=st.floats(lo, hi, width=32)))


@given(_tensors())
def test_round_trip_within_half_a_step(x):
    q, scale, zp = quantize_per_tensor(x)
    assert q.dtype == np.uint8 and q.shape == x.shape
    assert scale > 0 and 0 <= zp <= 255 and isinstance(zp, int) and isinstance(scale, float)
    back = dequantize(q, scale, zp)
    assert back.dtype == np.float32 and back.shape == x.shape
    assert _roundtrip_error_ok(x, back, scale)


@given(_tensors())
def test_kernels_match_numpy_twin_exactly(x):
    q, scale, zp = quantize_per_tensor(x)
    np.testing.assert_array_equal(q, _twin_quantize(x, scale, zp))
    np.testing.assert_array_equal(dequantize(q, scale, zp), _twin_dequantize(q, scale, zp))


@given(_tensors())
def test_params_follow_the_definition(x):
    scale, zp = quant_params(x)
    lo = min(float(x.min()), 0.0)
    hi = max(float(x.max()), 0.0)
    if hi == lo:
        assert (scale, zp) == (1.0, 0)
        return
    assert scale == (hi - lo) / 255.0
    assert abs(zp - (-lo / scale)) <= 0.5 + 1e-9
    if lo == 0.0:
        assert zp == 0
    if hi == 0.0:
        assert zp == 255


@given(_tensors())
def test_zero_is_exactly_representable(x):
    scale, zp = quant_params(x)
    q0 = quantize_with(np.zeros(3, np.float32), scale, zp)
    assert np.all(q0 == zp)
    assert np.all(dequantize(q0, scale, zp) == 0.0)


def test_all_positive_and_all_negative_ranges_are_widened_to_zero():
    q, scale, zp = quantize_per_tensor(np.array([1.0, 2.0, 3.0], np.float32))
    assert zp == 0 and scale == 3.0 / 255 and q[-1] == 255
    q, scale, zp = quantize_per_tensor(np.array([-3.0, -2.0, -1.0], np.float32))
    assert zp == 255 and scale == 3.0 / 255 and q[0] == 0


def test_all_zero_tensor():
    q, scale, zp = quantize_per_tensor(np.zeros((2, 3), np.float32))
    assert (scale, zp) == (1.0, 0)
    assert np.all(q == 0) and np.all(dequantize(q, scale, zp) == 0.0)


def test_ties_round_half_up_like_tfapprox():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999999999999994], dtype=np.float64)
    np.testing.assert_array_equal(quantize_with(x, 1.0, 10), [11, 12, 13, 10, 9, 8, 10])
    # Test the tester: half-to-even rounding (np.rint) gives other codes on these ties.
    rint = np.clip(np.rint(x) + 10, 0, 255).astype(np.uint8)
    assert not np.array_equal(rint, quantize_with(x, 1.0, 10))


def test_zero_point_rounds_half_up():
    # -lo/s = 127.5 exactly: lo = -127.5, hi = 127.5, s = 1.
    scale, zp = quant_params(np.array([-127.5, 127.5], np.float32))
    assert scale == 1.0 and zp == 128


def test_saturation_and_float64_input():
    q = quantize_with(np.array([-1e9, 1e9, np.inf, -np.inf]), 0.1, 100)
    np.testing.assert_array_equal(q, [0, 255, 255, 0])
    x = np.linspace(-1, 2, 17)
    q, scale, zp = quantize_per_tensor(x)
    assert _roundtrip_error_ok(x, dequantize(q, scale, zp), scale)


def test_non_contiguous_input_matches_contiguous_copy():
    x = np.random.default_rng(0).standard_normal((4, 5, 6)).astype(np.float32)
    view = x.transpose(2, 0, 1)[:, ::2]
    q, scale, zp = quantize_per_tensor(view)
    q2, scale2, zp2 = quantize_per_tensor(np.ascontiguousarray(view))
    assert (scale, zp) == (scale2, zp2)
    np.testing.assert_array_equal(q, q2)


def test_agrees_with_tfapprox_float32_formula():
    """TFApprox: q = uint8(clamp((x - nudged_min) * inv_scale + 0.5, 0, 255)), all in float32."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(20000) * 3).astype(np.float32)
    scale, zp = quant_params(x)
    s32 = np.float32((np.float32(x.max()) - np.float32(x.min())) / np.float32(255))
    inv32 = np.float32(255) / (np.float32(x.max()) - np.float32(x.min()))
    nudged_min = np.float32(-zp) * s32
    v = (x - nudged_min) * inv32 + np.float32(0.5)
    tf_q = np.floor(np.clip(v, 0, 255)).astype(np.uint8)
    ours = quantize_with(x, scale, zp)
    diff = np.abs(ours.astype(int) - tf_q.astype(int))
    assert diff.max() <= 1
    assert np.count_nonzero(diff) <= 0.001 * x.size


def test_the_tester_wrong_zero_point_breaks_round_trip():
    x = np.linspace(-1, 1, 101, dtype=np.float32)
    q, scale, zp = quantize_per_tensor(x)
    assert _roundtrip_error_ok(x, dequantize(q, scale, zp), scale)
    assert not _roundtrip_error_ok(x, dequantize(q, scale, zp + 1), scale)


@pytest.mark.parametrize("bad, error", [
    (np.array([1.0, np.nan], np.float32), ValueError),
    (np.array([1.0, np.inf], np.float32), ValueError),
    (np.array([], np.float32), ValueError),
    (np.array([1, 2], np.int32), TypeError),
])
def test_bad_tensors(bad, error):
    with pytest.raises(error):
        quantize_per_tensor(bad)


def test_bad_parameters():
    x = np.ones(3, np.float32)
    with pytest.raises(ValueError, match="NaN"):
        quantize_with(np.array([np.nan], np.float32), 1.0, 0)
    with pytest.raises(ValueError):
        quantize_with(x, 0.0, 0)
    with pytest.raises(ValueError):
        quantize_with(x, float("nan"), 0)
    with pytest.raises(ValueError):
        quantize_with(x, 1.0, 256)
    with pytest.raises(TypeError):
        quantize_with(x, 1.0, 1.5)
    with pytest.raises(TypeError):
        dequantize(np.ones(3, np.int32), 1.0, 0)
    with pytest.raises(ValueError):
        dequantize(np.ones(3, np.uint8), -1.0, 0)


@given(_tensors(), st.integers(0, 3), st.integers(0, 2 ** 32 - 1))
def test_codes_and_features_in_one_pass(x, n_feat, seed):
    assume(x.ndim >= 2)
    scale, zp = quant_params(x)
    table = np.random.default_rng(seed).integers(-300, 300, (256, n_feat)).astype(np.float32)
    q, feats = quantize_to_features(x, scale, zp, table)
    np.testing.assert_array_equal(q, _twin_quantize(x, scale, zp))
    # channel c*J + j holds table[q[:, c], j]
    twin = np.moveaxis(table[q], -1, 2).reshape((x.shape[0], x.shape[1] * n_feat) + x.shape[2:])
    np.testing.assert_array_equal(feats, twin)
    np.testing.assert_array_equal(code_features(q, table), twin)


def test_large_tensors_take_the_parallel_kernel_with_the_same_codes():
    x = np.random.default_rng(4).standard_normal((4, 16, 128, 160)).astype(np.float32)  # 2**20+
    scale, zp = quant_params(x)
    q, feats = quantize_to_features(x, scale, zp, np.arange(256, dtype=np.float32)[:, None])
    np.testing.assert_array_equal(q, _twin_quantize(x, scale, zp))
    np.testing.assert_array_equal(feats, q.astype(np.float32))
    np.testing.assert_array_equal(quantize_per_tensor(x)[0], q)


@pytest.mark.parametrize("size", [7, 1 << 19])
def test_feature_sum_adds_the_features_and_the_constant_then_scales_once(size):
    rng = np.random.default_rng(size)
    y = rng.integers(-2 ** 24, 2 ** 24, (2, 6, size)).astype(np.float32)
    cst = rng.integers(-10 ** 9, 10 ** 9, 3)
    scale = 0.0123
    exact = y.astype(np.int64).reshape(2, 3, 2, size).sum(axis=2) + cst[None, :, None]
    np.testing.assert_array_equal(feature_sum(y, 2, cst, scale),
                                  (exact * scale).astype(np.float32))
    np.testing.assert_array_equal(feature_sum(y, 2, cst, 1.0, np.float64).astype(np.int64),
                                  exact)
    with pytest.raises(ValueError, match="multiple"):
        feature_sum(y, 4, cst, scale)


def _near_ties(seed):
    """float32 values at and next to the half-way points k + 1/2 of x / s, for a random range.

    The quantiser computes x * float32(1/s) in float32 and redoes the float64 rule near ties;
    these are exactly the values where the float32 quotient alone can round the wrong way.
    """
    rng = np.random.default_rng(seed)
    lo, hi = -float(rng.uniform(0.1, 50.0)), float(rng.uniform(0.1, 50.0))
    s = (hi - lo) / 255.0
    k = np.arange(-260, 260, dtype=np.float64)
    exact = ((k + 0.5) * s).astype(np.float32)
    cols = [exact]
    for direction in (-np.inf, np.inf):   # up to three float32 steps either side
        v = exact
        for _ in range(3):
            v = np.nextafter(v, np.float32(direction))
            cols.append(v)
    vals = np.stack(cols, axis=1).reshape(-1)
    vals = vals[(vals >= lo) & (vals <= hi)]
    x = np.concatenate([vals, np.float32([lo, hi])]).astype(np.float32)
    return x.reshape(1, 1, 1, -1)


@pytest.mark.parametrize("seed", range(6))
def test_values_at_ties_get_the_float64_codes(seed):
    x = _near_ties(seed)
    scale, zp = quant_params(x)
    twin = _twin_quantize(x, scale, zp)
    q, feats = quantize_to_features(x, scale, zp, (np.arange(256) - zp).astype(np.float32)[:, None])
    np.testing.assert_array_equal(q, twin)
    np.testing.assert_array_equal(feats, twin.astype(np.float32) - zp)   # the computed feature
    np.testing.assert_array_equal(quantize_per_tensor(x)[0], twin)


@pytest.mark.parametrize("length", [64 * 37, 64 * 37 + 23, 50])
def test_sparse_ties_are_redone_in_every_block_and_the_tail(length):
    """A few tie values among ordinary ones: the redo pass finds each of them, whether it sits
    at either end of a 64-value block, in a later block or in the tail after the last block.
    """
    rng = np.random.default_rng(length)
    x = rng.uniform(-3.0, 5.0, length).astype(np.float32)
    x[0], x[-1] = -3.0, 5.0
    scale, zp = quant_params(x)
    ties = np.float32((rng.integers(-100, 150, 12) + 0.5) * scale)
    where = np.array([1, 63, 64, 127, 64 * 20 + 5, 64 * 36 + 63, length - 2, length - 12, 2, 3,
                      5, 7]) % (length - 1)
    x[np.maximum(where, 1)] = ties
    twin = _twin_quantize(x, scale, zp)
    table = (np.arange(256) - zp).astype(np.float32)[:, None]
    q, feats = quantize_to_features(x.reshape(1, 1, 1, -1), scale, zp, table)
    np.testing.assert_array_equal(q.reshape(-1), twin)
    np.testing.assert_array_equal(feats.reshape(-1), twin.astype(np.float32) - zp)
    # test the tester: the float32 quotient alone gets some of these ties wrong
    q32 = x * np.float32(1.0 / scale)
    f = np.floor(q32)
    fast = np.clip(f + (q32 - f >= np.float32(0.5)) + zp, 0, 255).astype(np.uint8)
    assert np.any(fast != twin)


def test_the_tester_ties_defeat_the_float32_quotient_alone():
    """The tie values above are where float32 x * (1/s) alone gives other codes than float64."""
    wrong = 0
    for seed in range(6):
        x = _near_ties(seed)
        scale, zp = quant_params(x)
        q32 = x.astype(np.float32) * np.float32(1.0 / scale)
        f = np.floor(q32)
        fast = np.clip(f + (q32 - f >= np.float32(0.5)) + zp, 0, 255).astype(np.uint8)
        wrong += int(np.sum(fast != _twin_quantize(x, scale, zp)))
    assert wrong > 0


@pytest.mark.parametrize("values", [
    [0.0, -0.0, 1.5], [-0.0, -2.0], [3.0, 3.0], [-1e30, 1e30, 0.0], [1e-40, -1e-41],
    [-1.5, -3.0], [2.0, 5.0],
])
def test_one_pass_range_is_numpy_min_and_max(values):
    x = np.array(values, np.float32).reshape(1, -1)
    widened = (min(float(x.min()), 0.0), max(float(x.max()), 0.0))
    s, z = quant_params(x)
    if widened[0] == widened[1]:
        assert (s, z) == (1.0, 0)
    else:
        assert s == (widened[1] - widened[0]) / 255.0


@pytest.mark.parametrize("bad", [np.nan, -np.nan, np.inf, -np.inf])
def test_one_pass_range_sees_nan_and_inf_anywhere(bad):
    x = np.zeros((3, 1000), np.float32)
    x[2, 777] = bad
    with pytest.raises(ValueError, match="NaN or infinity"):
        quant_params(x)


@pytest.mark.parametrize("scale", [1.0, 0.0123456789, 3.7e-5, 1e30, 2.0 ** -140])
@pytest.mark.parametrize("zero_point", [0, 1, 128, 255])
def test_both_dequantize_kernels_give_the_numpy_bits(scale, zero_point):
    """The integer and the float64 spelling of the de-quantisation (one runs on AVX-512
    targets, the other on AVX2) give NumPy's float32((q - z) * s) bit for bit, for every code
    and a length with a vector tail."""
    from approxdarts_np.kernels.quantize import _dequantize_float, _dequantize_int
    q = np.concatenate([np.arange(256), np.arange(255, -1, -1), np.arange(37)]).astype(np.uint8)
    want = _twin_dequantize(q, scale, zero_point)
    for kernel in (_dequantize_int, _dequantize_float):
        out = np.empty(q.size, np.float32)
        kernel(q, scale, zero_point, out)
        np.testing.assert_array_equal(out.view(np.int32), want.view(np.int32))
