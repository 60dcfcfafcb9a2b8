"""Max/avg pooling kernels against torch.nn.functional.max_pool2d / avg_pool2d and autograd.

Tolerances (float32): max pooling forward and argmax are exact (bit-identical values, same
indices); its gradient sums at most k*k window contributions per pixel, compared within
rtol=1e-6, atol=1e-6. Average pooling forward and gradient within rtol=1e-6, atol=1e-6
(torch may divide/accumulate in a different order).
Against a plain window loop in NumPy (same scan order, float32 running sums): forward results
are bit-identical.
Determinism: bit-identical on a repeat and across Numba thread counts (1 vs 2).
"""
import numba
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from approxdarts_np.kernels.pool import avg_pool2d, avg_pool2d_grad, max_pool2d, max_pool2d_grad

torch.set_num_threads(2)

RTOL = 1e-6
ATOL = 1e-6


@st.composite
def pool_cases(draw):
    """(x shape, kernel_size, stride, padding) with padding <= kernel/2 and a non-empty output."""
    k = (draw(st.sampled_from([1, 2, 3, 5])), draw(st.sampled_from([1, 2, 3, 5])))
    stride = (draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2])))
    padding = tuple(draw(st.integers(0, kk // 2)) for kk in k)
    sizes = [draw(st.integers(max(1, kk - 2 * p), 9)) for kk, p in zip(k, padding)]
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 4)), *sizes)
    return shape, k, stride, padding


def _random(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _torch_max(x, gy, k, s, p):
    xt = torch.tensor(x, requires_grad=True)
    yt, idx = F.max_pool2d(xt, k, s, p, return_indices=True)
    yt.backward(torch.tensor(gy))
    return yt.detach().numpy(), idx.numpy(), xt.grad.numpy()


def _torch_avg(x, gy, k, s, p, count_include_pad):
    xt = torch.tensor(x, requires_grad=True)
    yt = F.avg_pool2d(xt, k, s, p, count_include_pad=count_include_pad)
    yt.backward(torch.tensor(gy))
    return yt.detach().numpy(), xt.grad.numpy()


def _check_max(x, gy, k, s, p, ours):
    y_ref, idx_ref, gx_ref = _torch_max(x, gy, k, s, p)
    y, arg, gx = ours
    assert y.dtype == np.float32 and arg.dtype == np.int32 and gx.dtype == np.float32
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(arg, idx_ref)
    np.testing.assert_allclose(gx, gx_ref, rtol=RTOL, atol=ATOL)


def _ours_max(x, gy, k, s, p):
    y, arg = max_pool2d(x, k, s, p)
    return y, arg, max_pool2d_grad(gy, arg, x.shape)


@given(pool_cases(), st.integers(0, 2**16))
def test_max_pool_matches_torch(case, seed):
    shape, k, s, p = case
    x = _random(shape, seed)
    y_shape = F.max_pool2d(torch.tensor(x), k, s, p).shape
    gy = _random(tuple(y_shape), seed + 1)
    _check_max(x, gy, k, s, p, _ours_max(x, gy, k, s, p))


@given(pool_cases(), st.booleans(), st.integers(0, 2**16))
def test_avg_pool_matches_torch(case, count_include_pad, seed):
    shape, k, s, p = case
    x = _random(shape, seed)
    y_ref_shape = F.avg_pool2d(torch.tensor(x), k, s, p).shape
    gy = _random(tuple(y_ref_shape), seed + 1)
    y_ref, gx_ref = _torch_avg(x, gy, k, s, p, count_include_pad)
    y = avg_pool2d(x, k, s, p, count_include_pad)
    gx = avg_pool2d_grad(gy, x.shape, k, s, p, count_include_pad)
    assert y.dtype == np.float32 and gx.dtype == np.float32
    np.testing.assert_allclose(y, y_ref, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(gx, gx_ref, rtol=RTOL, atol=ATOL)


def _window_loop(x, k, s, p, count_include_pad):
    """Plain NumPy twin: (max, argmax, avg) by scanning each clipped window in row-major order."""
    n_img, n_ch, h, wd = x.shape
    out_h = (h + 2 * p[0] - k[0]) // s[0] + 1
    out_w = (wd + 2 * p[1] - k[1]) // s[1] + 1
    y_max = np.empty((n_img, n_ch, out_h, out_w), np.float32)
    arg = np.empty((n_img, n_ch, out_h, out_w), np.int32)
    y_avg = np.empty((n_img, n_ch, out_h, out_w), np.float32)
    for n, c, oh, ow in np.ndindex(n_img, n_ch, out_h, out_w):
        ih0, iw0 = oh * s[0] - p[0], ow * s[1] - p[1]
        rows = range(max(ih0, 0), min(ih0 + k[0], h))
        cols = range(max(iw0, 0), min(iw0 + k[1], wd))
        best, best_idx, total = np.float32(-np.inf), rows[0] * wd + cols[0], np.float32(0)
        for ih in rows:
            for iw in cols:
                v = x[n, c, ih, iw]
                if v > best or np.isnan(v):
                    best, best_idx = v, ih * wd + iw
                total = np.float32(total + v)
        count = k[0] * k[1] if count_include_pad else len(rows) * len(cols)
        y_max[n, c, oh, ow], arg[n, c, oh, ow] = best, best_idx
        y_avg[n, c, oh, ow] = total / np.float32(count)
    return y_max, arg, y_avg


@given(pool_cases(), st.booleans(), st.integers(0, 2**16))
def test_forward_matches_plain_window_loop_exactly(case, count_include_pad, seed):
    shape, k, s, p = case
    x = _random(shape, seed)
    y_max, arg, y_avg = _window_loop(x, k, s, p, count_include_pad)
    ours_max, ours_arg = max_pool2d(x, k, s, p)
    np.testing.assert_array_equal(ours_max, y_max)
    np.testing.assert_array_equal(ours_arg, arg)
    np.testing.assert_array_equal(avg_pool2d(x, k, s, p, count_include_pad), y_avg)


@pytest.mark.parametrize("stride", [1, 2])
def test_darts_pools_3x3_match_torch(stride):
    x = _random((2, 3, 8, 8), 7)
    gy = _random(F.max_pool2d(torch.tensor(x), 3, stride, 1).shape, 8)
    _check_max(x, gy, 3, stride, 1, _ours_max(x, gy, 3, stride, 1))
    y_ref, gx_ref = _torch_avg(x, gy, 3, stride, 1, False)
    np.testing.assert_allclose(avg_pool2d(x, 3, stride, 1), y_ref, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(avg_pool2d_grad(gy, x.shape, 3, stride, 1), gx_ref,
                               rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("shape, stride, padding", [
    ((6, 2, 16, 16), 1, 1),    # four 16x16 planes to a work item: the last item holds two
    ((7, 3, 8, 8), 1, 1),
    ((5, 2, 16, 16), 2, 1),    # phase planes, a partial last item
    ((9, 2, 7, 5), 2, 0),
    ((3, 2, 32, 32), 1, 1),    # one plane per item
])
def test_darts_pools_on_stacked_planes_match_the_window_loop(shape, stride, padding):
    """The 3x3 pools run on work items of several stacked planes (the depthwise kernels' layout);
    with NaN, -inf and whole -inf planes they give the plain window loop's bits, argmax and all,
    on any split of the images into items, and torch's values."""
    rng = np.random.default_rng(sum(shape) + stride)
    x = rng.standard_normal(shape).astype(np.float32)
    u = rng.random(shape)
    x[u < 0.1] = -np.inf
    x[u > 0.98] = np.nan
    x[1, 0] = -np.inf
    for include in (False, True):
        y_max, arg, y_avg = _window_loop(x, (3, 3), (stride, stride), (padding, padding), include)
        ours_max, ours_arg = max_pool2d(x, 3, stride, padding)
        np.testing.assert_array_equal(ours_max, y_max)
        np.testing.assert_array_equal(ours_arg, arg)
        np.testing.assert_array_equal(avg_pool2d(x, 3, stride, padding, include), y_avg)
    finite = np.nan_to_num(x, nan=0.5, neginf=-3.0)
    y_ref, idx_ref = F.max_pool2d(torch.tensor(finite), 3, stride, padding, return_indices=True)
    ours_max, ours_arg = max_pool2d(finite, 3, stride, padding)
    np.testing.assert_array_equal(ours_max, y_ref.numpy())
    np.testing.assert_array_equal(ours_arg, idx_ref.numpy())


def test_max_pool_padding_acts_as_minus_infinity():
    x = -1.0 - np.abs(_random((1, 2, 5, 5), 9))
    y, _ = max_pool2d(x, 3, 2, 1)
    assert np.all(y < 0)


def test_max_pool_ties_and_nans_follow_torch():
    x = np.zeros((1, 1, 5, 6), np.float32)        # every window is a tie
    x[0, 0, 2, 3] = np.nan
    x[0, 0, 4, 0] = 1.0
    x[0, 0, 4, 1] = 1.0
    gy = _random((1, 1, 5, 6), 10)
    _check_max(x, gy, 3, 1, 1, _ours_max(x, gy, 3, 1, 1))


def test_results_are_bit_identical_on_repeat_and_across_thread_counts():
    x = _random((3, 4, 9, 9), 11)
    gy = _random((3, 4, 9, 9), 12)

    def run():
        y, arg = max_pool2d(x, 3, 1, 1)
        return (y, arg, max_pool2d_grad(gy, arg, x.shape), avg_pool2d(x, 3, 1, 1),
                avg_pool2d_grad(gy, x.shape, 3, 1, 1))

    first, second = run(), run()
    previous = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        single = run()
    finally:
        numba.set_num_threads(previous)
    for a, b, c in zip(first, second, single):
        assert np.array_equal(a, b) and np.array_equal(a, c)


def test_the_tester_rejects_wrong_results():
    # Gradients routed to the wrong neighbour, or an avg pool that counts the padding when it
    # must not, must both fail the checks.
    x = _random((2, 2, 6, 6), 13)
    gy = _random((2, 2, 6, 6), 14)
    y, arg, gx = _ours_max(x, gy, 3, 1, 1)
    _check_max(x, gy, 3, 1, 1, (y, arg, gx))
    shifted = max_pool2d_grad(gy, np.where(arg > 0, arg - 1, arg).astype(np.int32), x.shape)
    with pytest.raises(AssertionError):
        _check_max(x, gy, 3, 1, 1, (y, arg, shifted))
    y_ref, _ = _torch_avg(x, gy, 3, 1, 1, False)
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(avg_pool2d(x, 3, 1, 1, count_include_pad=True), y_ref,
                                   rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("call, message", [
    (lambda x: max_pool2d(x.astype(np.float64)), "float32"),
    (lambda x: avg_pool2d(x[0]), "4-D"),
    (lambda x: max_pool2d(x, kernel_size=0), "kernel_size"),
    (lambda x: avg_pool2d(x, stride=0), "stride"),
    (lambda x: max_pool2d(x, 3, 1, 2), "padding"),
    (lambda x: avg_pool2d(x, 3, 1, -1), "padding"),
    (lambda x: max_pool2d(x, 7, 1, 0), "empty output"),
    (lambda x: avg_pool2d(x, (3, 3, 3)), "kernel_size"),
    (lambda x: avg_pool2d_grad(np.zeros((2, 3, 4, 4), np.float32), x.shape), "gy"),
    (lambda x: max_pool2d_grad(np.zeros((2, 3, 5, 5), np.float32),
                               np.zeros((2, 3, 5, 5), np.int64), x.shape), "int32"),
    (lambda x: max_pool2d_grad(np.zeros((2, 3, 5, 5), np.float32),
                               np.zeros((2, 3, 4, 5), np.int32), x.shape), "same shape"),
    (lambda x: max_pool2d_grad(np.zeros((2, 3, 5, 5), np.float32),
                               np.full((2, 3, 5, 5), 25, np.int32), x.shape), "outside"),
])
def test_invalid_arguments_raise(call, message):
    x = np.zeros((2, 3, 5, 5), np.float32)
    with pytest.raises(ValueError, match=message):
        call(x)
