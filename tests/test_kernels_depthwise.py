"""Depthwise conv2d kernels against torch.nn.functional.conv2d(groups=C) and its autograd gradients.

Tolerances (float32; torch and the kernels sum in different orders): each element of y, gx and gw
is a sum of products, and float32 rounding of such a sum is bounded by a multiple of
eps32 * (sum of the absolute values of its products). So per element
|ours - reference| <= BOUND_FACTOR * eps32 * S, with S computed in float64 by the NumPy twin on
|x|, |w|, |gy| (S = Σ|x·w| for y, Σ|w·gy| for gx, Σ|x·gy| for gw) and BOUND_FACTOR = 8: the
bound follows each element's own magnitude, not the number of terms or the tensor's largest entry.
Against the float64 NumPy twin below the same bound holds with the twin as reference.
Determinism: bit-identical on a repeat and across Numba thread counts (1 vs 2).
"""
import numba
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from approxdarts_np.kernels._util import as_pair, conv_output_size
from approxdarts_np.kernels.depthwise import (
    _stack_size,
    depthwise_conv2d,
    depthwise_conv2d_grad_input,
    depthwise_conv2d_grad_weight,
)

torch.set_num_threads(2)

EPS32 = float(np.finfo(np.float32).eps)
BOUND_FACTOR = 8


# ----------------------------------------------------------------------------- helpers

@st.composite
def depthwise_cases(draw, square=True):
    """(x shape, w shape, stride, padding, dilation) with a non-empty output."""
    n_img = draw(st.integers(1, 3))
    n_ch = draw(st.integers(1, 6))
    k_h = draw(st.sampled_from([1, 3, 5]))
    if square:
        k_w = k_h
        stride = (draw(st.sampled_from([1, 2])),) * 2
        padding = (draw(st.integers(0, 3)),) * 2
        dilation = (draw(st.sampled_from([1, 2])),) * 2
    else:
        k_w = draw(st.sampled_from([1, 3, 5]))
        stride = (draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2])))
        padding = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
        dilation = (draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2])))
    sizes = []
    for k, d, p in zip((k_h, k_w), dilation, padding):
        smallest = max(1, d * (k - 1) + 1 - 2 * p)  # smallest input with a non-empty output
        sizes.append(draw(st.integers(smallest, max(smallest, 9))))
    return (n_img, n_ch, *sizes), (n_ch, 1, k_h, k_w), stride, padding, dilation


def _random(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _torch_reference(x, w, gy, stride, padding, dilation):
    """Return (y, gx, gw) from torch autograd, float32 on CPU."""
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(w, requires_grad=True)
    yt = F.conv2d(xt, wt, stride=stride, padding=padding, dilation=dilation, groups=x.shape[1])
    yt.backward(torch.tensor(gy))
    return yt.detach().numpy(), xt.grad.numpy(), wt.grad.numpy()


def _numpy_twin(x, w, gy, stride, padding, dilation):
    """Return (y, gx, gw) by the definition, in float64, one tap at a time (slow and obvious)."""
    (s_h, s_w), (p_h, p_w), (d_h, d_w) = stride, padding, dilation
    x64, w64, gy64 = (a.astype(np.float64) for a in (x, w, gy))
    n_img, n_ch, h, wd = x.shape
    k_h, k_w = w.shape[2:]
    out_h, out_w = gy.shape[2:]
    xpad = np.zeros((n_img, n_ch, h + 2 * p_h, wd + 2 * p_w))
    xpad[:, :, p_h:p_h + h, p_w:p_w + wd] = x64
    gxpad = np.zeros_like(xpad)
    y = np.zeros((n_img, n_ch, out_h, out_w))
    gw = np.zeros((n_ch, 1, k_h, k_w))
    for i in range(k_h):
        for j in range(k_w):
            rows = slice(i * d_h, i * d_h + s_h * (out_h - 1) + 1, s_h)
            cols = slice(j * d_w, j * d_w + s_w * (out_w - 1) + 1, s_w)
            tap = w64[None, :, 0, i, j, None, None]
            y += tap * xpad[:, :, rows, cols]
            gxpad[:, :, rows, cols] += tap * gy64
            gw[:, 0, i, j] = np.sum(gy64 * xpad[:, :, rows, cols], axis=(0, 2, 3))
    gx = gxpad[:, :, p_h:p_h + h, p_w:p_w + wd]
    return y, gx, gw


def _ours(x, w, gy, stride, padding, dilation):
    geom = (stride, padding, dilation)
    return (depthwise_conv2d(x, w, *geom),
            depthwise_conv2d_grad_input(gy, w, x.shape, *geom),
            depthwise_conv2d_grad_weight(gy, x, w.shape, *geom))


def assert_matches(ours, ref, sums):
    """Assert (y, gx, gw) agree with ``ref`` element by element within BOUND_FACTOR * eps32 * S.

    ``sums`` gives, per result, S: the sum of the absolute products behind each element.
    """
    for name, a, b, s in zip(("y", "gx", "gw"), ours, ref, sums):
        assert a.dtype == np.float32, f"{name}: dtype {a.dtype}"
        assert a.shape == b.shape, f"{name}: shape {a.shape} vs {b.shape}"
        err = np.abs(a.astype(np.float64) - np.asarray(b, dtype=np.float64))
        bound = BOUND_FACTOR * EPS32 * s
        if not np.all(err <= bound):
            worst = np.unravel_index(np.argmax(err - bound), err.shape)
            raise AssertionError(f"{name}: error {err[worst]:.3g} at {worst} exceeds "
                                 f"{BOUND_FACTOR} * eps32 * {s[worst]:.3g} = {bound[worst]:.3g}")


def _abs_sums(x, w, gy, stride, padding, dilation):
    """Per element of (y, gx, gw): the sum of the absolute values of its products (float64)."""
    geom = (as_pair(stride, "stride"), as_pair(padding, "padding"), as_pair(dilation, "dilation"))
    return _numpy_twin(np.abs(x), np.abs(w), np.abs(gy), *geom)


def _case(x_shape, w_shape, stride, padding, dilation, seed):
    x = _random(x_shape, seed)
    w = _random(w_shape, seed + 1)
    y_ref = F.conv2d(torch.tensor(x), torch.tensor(w), stride=stride, padding=padding,
                     dilation=dilation, groups=x_shape[1]).numpy()
    gy = _random(y_ref.shape, seed + 2)
    return x, w, gy


# ----------------------------------------------------------------------------- against torch

@given(depthwise_cases(), st.integers(0, 2**16))
def test_matches_torch_square(case, seed):
    x_shape, w_shape, stride, padding, dilation = case
    x, w, gy = _case(x_shape, w_shape, stride, padding, dilation, seed)
    assert_matches(_ours(x, w, gy, stride, padding, dilation),
                   _torch_reference(x, w, gy, stride, padding, dilation),
                   _abs_sums(x, w, gy, stride, padding, dilation))


@given(depthwise_cases(square=False), st.integers(0, 2**16))
def test_matches_torch_non_square(case, seed):
    x_shape, w_shape, stride, padding, dilation = case
    x, w, gy = _case(x_shape, w_shape, stride, padding, dilation, seed)
    assert_matches(_ours(x, w, gy, stride, padding, dilation),
                   _torch_reference(x, w, gy, stride, padding, dilation),
                   _abs_sums(x, w, gy, stride, padding, dilation))


@given(depthwise_cases(square=False), st.integers(0, 2**16))
def test_matches_numpy_twin(case, seed):
    x_shape, w_shape, stride, padding, dilation = case
    x, w, gy = _case(x_shape, w_shape, stride, padding, dilation, seed)
    assert_matches(_ours(x, w, gy, stride, padding, dilation),
                   _numpy_twin(x, w, gy, stride, padding, dilation),
                   _abs_sums(x, w, gy, stride, padding, dilation))


@pytest.mark.parametrize("k, stride, padding, dilation", [
    (3, 1, 1, 1), (5, 1, 2, 1), (3, 1, 2, 2), (5, 1, 4, 2),
    (3, 2, 1, 1), (5, 2, 2, 1), (3, 2, 2, 2), (5, 2, 4, 2),
])
def test_darts_shapes_match_torch(k, stride, padding, dilation):
    """The supernet's depthwise convolutions at a realistic plane size (long inner loops)."""
    x, w, gy = _case((2, 3, 32, 32), (3, 1, k, k), stride, padding, dilation, seed=k + stride)
    assert_matches(_ours(x, w, gy, stride, padding, dilation),
                   _torch_reference(x, w, gy, stride, padding, dilation),
                   _abs_sums(x, w, gy, stride, padding, dilation))


@pytest.mark.parametrize("k, stride, padding, dilation", [
    (3, 1, 1, 1), (5, 1, 4, 2), (3, 2, 1, 1), (5, 2, 2, 1), (1, 1, 3, 1),
])
def test_image_groups_with_a_short_last_group(k, stride, padding, dilation):
    """Several images share a work item: at 16x15 the 5 images split into groups of 2 or 3."""
    x, w, gy = _case((5, 2, 16, 15), (2, 1, k, k), stride, padding, dilation, seed=k + padding)
    out_h, out_w = gy.shape[2:]
    for shared in (False, stride == 1):
        assert 1 < _stack_size(5, 16, 15, out_h, out_w, stride, stride, padding, padding,
                               shared) < 5
    assert_matches(_ours(x, w, gy, stride, padding, dilation),
                   _torch_reference(x, w, gy, stride, padding, dilation),
                   _abs_sums(x, w, gy, stride, padding, dilation))


@pytest.mark.parametrize("width", [7, 8, 9, 10])
@pytest.mark.parametrize("padding", [0, 1, 2, 3])
def test_stride_two_column_parities(width, padding):
    """Odd/even widths and paddings exercise every split of columns between the two phases."""
    x, w, gy = _case((1, 2, 6, width), (2, 1, 3, 3), 2, padding, 1, seed=width * 10 + padding)
    assert_matches(_ours(x, w, gy, 2, padding, 1),
                   _torch_reference(x, w, gy, 2, padding, 1),
                   _abs_sums(x, w, gy, 2, padding, 1))


def test_stride_three_generic_path():
    x, w, gy = _case((2, 3, 11, 10), (3, 1, 3, 5), (3, 3), (1, 2), (2, 1), seed=3)
    assert_matches(_ours(x, w, gy, (3, 3), (1, 2), (2, 1)),
                   _torch_reference(x, w, gy, (3, 3), (1, 2), (2, 1)),
                   _abs_sums(x, w, gy, (3, 3), (1, 2), (2, 1)))


def test_non_contiguous_inputs():
    x, w, gy = _case((2, 3, 7, 8), (3, 1, 3, 3), 1, 1, 1, seed=5)
    x_view = np.asfortranarray(x)
    gy_view = np.asfortranarray(gy)
    assert not x_view.flags.c_contiguous
    ref = _torch_reference(x, w, gy, 1, 1, 1)
    assert_matches(_ours(x_view, w, gy_view, 1, 1, 1), ref, _abs_sums(x, w, gy, 1, 1, 1))


def test_empty_batch():
    x = np.zeros((0, 3, 6, 6), np.float32)
    w = _random((3, 1, 3, 3), 0)
    gy = np.zeros((0, 3, 6, 6), np.float32)
    y, gx, gw = _ours(x, w, gy, 1, 1, 1)
    assert y.shape == (0, 3, 6, 6) and gx.shape == (0, 3, 6, 6)
    assert gw.shape == (3, 1, 3, 3) and not gw.any()


# ----------------------------------------------------------------------------- determinism

@pytest.mark.parametrize("k, stride, padding, dilation", [
    (5, 1, 4, 2), (3, 2, 1, 1), (1, 1, 2, 1),
])
def test_repeat_and_thread_count_give_identical_bits(k, stride, padding, dilation):
    geom = (stride, padding, dilation)
    x, w, gy = _case((5, 8, 12, 13), (8, 1, k, k), *geom, seed=11)
    first = _ours(x, w, gy, *geom)
    again = _ours(x, w, gy, *geom)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        single = _ours(x, w, gy, *geom)
    finally:
        numba.set_num_threads(before)
    for a, b, c in zip(first, again, single):
        assert a.tobytes() == b.tobytes()
        assert a.tobytes() == c.tobytes()


# ----------------------------------------------------------------------------- the tester

def test_comparison_catches_a_wrong_gradient():
    """A weight gradient off by one float32 step times 1e3 on one entry must fail the check."""
    x, w, gy = _case((2, 3, 8, 8), (3, 1, 3, 3), 1, 1, 1, seed=7)
    ours = _ours(x, w, gy, 1, 1, 1)
    ref = _torch_reference(x, w, gy, 1, 1, 1)
    terms = _abs_sums(x, w, gy, 1, 1, 1)
    assert_matches(ours, ref, terms)

    # An error of 1e-3 on one weight-gradient entry (a sum of 128 products) passed the old bound
    # of 1e-5 per summed term; the bound from the products' magnitudes sees it.
    gw_off = ours[2].copy()
    gw_off[0, 0, 1, 1] += 1e-3
    with pytest.raises(AssertionError):
        assert_matches((ours[0], ours[1], gw_off), ref, terms)

    y, gx, gw = (a.copy() for a in ours)
    gw[1, 0, 2, 0] += 0.01 * max(1.0, abs(gw[1, 0, 2, 0]))
    with pytest.raises(AssertionError):
        assert_matches((y, gx, gw), ref, terms)

    gx_shifted = np.roll(ours[1], 1, axis=3)  # a gradient scattered one column off
    with pytest.raises(AssertionError):
        assert_matches((ours[0], gx_shifted, ours[2]), ref, terms)


def test_numpy_twin_catches_a_flipped_kernel():
    """The twin is not trivially agreeable: a convolution (flipped kernel) must differ from it."""
    x, w, gy = _case((1, 2, 6, 6), (2, 1, 3, 3), 1, 1, 1, seed=9)
    flipped = np.ascontiguousarray(w[:, :, ::-1, ::-1])
    ref = _numpy_twin(x, w, gy, (1, 1), (1, 1), (1, 1))
    with pytest.raises(AssertionError):
        assert_matches(_ours(x, flipped, gy, 1, 1, 1), ref, _abs_sums(x, w, gy, 1, 1, 1))


# ----------------------------------------------------------------------------- validation

def test_rejects_bad_inputs():
    x = _random((2, 3, 8, 8), 0)
    w = _random((3, 1, 3, 3), 1)
    gy = _random((2, 3, 8, 8), 2)
    with pytest.raises(ValueError, match="float32"):
        depthwise_conv2d(x.astype(np.float64), w, 1, 1)
    with pytest.raises(ValueError, match="float32"):
        depthwise_conv2d(x, w.astype(np.float16), 1, 1)
    with pytest.raises(ValueError, match="4-D"):
        depthwise_conv2d(x[0], w, 1, 1)
    with pytest.raises(ValueError, match="numpy array"):
        depthwise_conv2d(x.tolist(), w, 1, 1)
    with pytest.raises(ValueError, match=r"\(C, 1, kh, kw\)"):
        depthwise_conv2d(x, _random((4, 1, 3, 3), 1), 1, 1)
    with pytest.raises(ValueError, match=r"\(C, 1, kh, kw\)"):
        depthwise_conv2d(x, _random((3, 2, 3, 3), 1), 1, 1)
    with pytest.raises(ValueError, match="empty output"):
        depthwise_conv2d(x, _random((3, 1, 5, 5), 1), 1, 0, 3)
    with pytest.raises(ValueError, match="stride"):
        depthwise_conv2d(x, w, 0, 1)
    with pytest.raises(ValueError, match="padding"):
        depthwise_conv2d(x, w, 1, -1)
    with pytest.raises(ValueError, match="dilation"):
        depthwise_conv2d(x, w, 1, 1, (1, 0))
    with pytest.raises(ValueError, match="stride"):
        depthwise_conv2d(x, w, (1, 2, 3), 1)
    with pytest.raises(ValueError, match="padding"):
        depthwise_conv2d(x, w, 1, 1.5)
    with pytest.raises(ValueError, match="gy must have shape"):
        depthwise_conv2d_grad_input(gy[:, :, :7], w, x.shape, 1, 1)
    with pytest.raises(ValueError, match="input_shape"):
        depthwise_conv2d_grad_input(gy, w, (2, 3, 8), 1, 1)
    with pytest.raises(ValueError, match="gy must have shape"):
        depthwise_conv2d_grad_weight(gy, x, w.shape, 2, 1)
    with pytest.raises(ValueError, match="weight_shape"):
        depthwise_conv2d_grad_weight(gy, x, (3, 1, 3), 1, 1)
    with pytest.raises(ValueError, match=r"\(C, 1, kh, kw\)"):
        depthwise_conv2d_grad_weight(gy, x, (3, 1, 0, 3), 1, 1)


def test_as_pair_and_output_size():
    assert as_pair(3, "k") == (3, 3)
    assert as_pair((1, 2), "k") == (1, 2)
    assert as_pair(np.int64(2), "k") == (2, 2)
    for bad in (True, 1.0, (1,), (1, 2, 3), "ab", (1, 2.0), None):
        with pytest.raises(ValueError, match="k must be"):
            as_pair(bad, "k")
    # Compared with the output length torch gives, wherever that output is non-empty.
    for size in range(1, 8):
        for k in (1, 3, 5):
            for stride in (1, 2, 3):
                for padding in range(3):
                    for dilation in (1, 2):
                        ours = conv_output_size(size, k, stride, padding, dilation)
                        if size + 2 * padding < dilation * (k - 1) + 1:
                            assert ours <= 0
                            continue
                        y = F.conv2d(torch.zeros(1, 1, size, 1), torch.zeros(1, 1, k, 1),
                                     stride=(stride, 1), padding=(padding, 0),
                                     dilation=(dilation, 1))
                        assert ours == y.shape[2]
    assert conv_output_size(32, 3, 2, 1, 1) == 16
    assert conv_output_size(32, 5, 1, 4, 2) == 32
