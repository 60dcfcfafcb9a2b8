"""Dense/grouped conv2d kernels against torch.nn.functional.conv2d and its autograd gradients.

Tolerances (float32; torch sums in a different order): every element of y, gx and gw is a sum of
products, and float32 rounding of such a sum is bounded by a multiple of eps32 times the sum of
the absolute values of its products, S. Per element |ours - torch| <= BOUND_FACTOR * eps32 * S
with BOUND_FACTOR = 8, S computed in float64 by torch on |x|, |w|, |gy| (S = Σ|x·w| for y,
Σ|w·gy| for gx, Σ|x·gy| for gw): the bound follows each element's own magnitude, not the number
of terms or a fixed absolute tolerance.
Determinism: bit-identical on a repeat and across Numba thread counts (1 vs 2).
"""
import numba
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from approxdarts_np.kernels.conv import conv2d, conv2d_grad_input, conv2d_grad_weight

torch.set_num_threads(2)

EPS32 = float(np.finfo(np.float32).eps)
BOUND_FACTOR = 8


@st.composite
def conv_cases(draw):
    """(x shape, w shape, stride, padding, dilation, groups) with a non-empty output."""
    groups = draw(st.sampled_from([1, 2, 3]))
    c_in = groups * draw(st.integers(1, 2))
    c_out = groups * draw(st.integers(1, 2))
    n_img = draw(st.integers(1, 3))
    k_h = draw(st.sampled_from([1, 3, 5]))
    k_w = draw(st.sampled_from([1, 3, 5])) if draw(st.booleans()) else k_h
    stride = (draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2])))
    dilation = (draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2])))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    sizes = []
    for k, d, p in zip((k_h, k_w), dilation, padding):
        smallest = max(1, d * (k - 1) + 1 - 2 * p)
        sizes.append(draw(st.integers(smallest, max(smallest, 9))))
    return ((n_img, c_in, *sizes), (c_out, c_in // groups, k_h, k_w), stride, padding,
            dilation, groups)


def _random(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _torch_reference(x, w, gy, stride, padding, dilation, groups):
    """Return (y, gx, gw) from torch autograd, float32 on CPU."""
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(w, requires_grad=True)
    yt = F.conv2d(xt, wt, stride=stride, padding=padding, dilation=dilation, groups=groups)
    yt.backward(torch.tensor(gy))
    return yt.detach().numpy(), xt.grad.numpy(), wt.grad.numpy()


def _ours(x, w, gy, stride, padding, dilation, groups):
    geom = (stride, padding, dilation, groups)
    return (conv2d(x, w, *geom), conv2d_grad_input(gy, w, x.shape, *geom),
            conv2d_grad_weight(gy, x, w.shape, *geom))


def _abs_sums(x, w, gy, stride, padding, dilation, groups):
    """Per element of (y, gx, gw): the sum of the absolute values of its products (float64)."""
    xt = torch.tensor(np.abs(x).astype(np.float64), requires_grad=True)
    wt = torch.tensor(np.abs(w).astype(np.float64), requires_grad=True)
    yt = F.conv2d(xt, wt, stride=stride, padding=padding, dilation=dilation, groups=groups)
    yt.backward(torch.tensor(np.abs(gy).astype(np.float64)))
    return yt.detach().numpy(), xt.grad.numpy(), wt.grad.numpy()


def _check_against_torch(ours, ref, sums):
    for name, a, b, s in zip(("y", "gx", "gw"), ours, ref, sums):
        assert a.dtype == np.float32 and a.shape == b.shape, name
        err = np.abs(a.astype(np.float64) - b.astype(np.float64))
        bound = BOUND_FACTOR * EPS32 * s
        if not np.all(err <= bound):
            worst = np.unravel_index(np.argmax(err - bound), err.shape)
            raise AssertionError(f"{name}: error {err[worst]:.3g} at {worst} exceeds "
                                 f"{BOUND_FACTOR} * eps32 * {s[worst]:.3g} = {bound[worst]:.3g}")


def _compare(x_shape, w_shape, stride, padding, dilation, groups, seed=0):
    x = _random(x_shape, seed)
    w = _random(w_shape, seed + 1)
    y_ref = F.conv2d(torch.tensor(x), torch.tensor(w), stride=stride, padding=padding,
                     dilation=dilation, groups=groups).numpy()
    gy = _random(y_ref.shape, seed + 2)
    _check_against_torch(_ours(x, w, gy, stride, padding, dilation, groups),
                         _torch_reference(x, w, gy, stride, padding, dilation, groups),
                         _abs_sums(x, w, gy, stride, padding, dilation, groups))


@given(conv_cases(), st.integers(0, 2**16))
def test_conv2d_matches_torch(case, seed):
    _compare(*case, seed=seed)


@pytest.mark.parametrize("stride", [1, 2, (2, 1)])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("hw", [(8, 8), (7, 9)])
def test_pointwise_fast_path_matches_torch(stride, groups, hw):
    _compare((2, 4, *hw), (6, 4 // groups, 1, 1), stride, 0, 1, groups)


def test_pointwise_with_padding_and_dilation_matches_torch():
    # 1x1 with padding leaves the fast path; dilation is irrelevant for a 1x1 kernel.
    _compare((2, 3, 5, 5), (4, 3, 1, 1), 2, 1, 2, 1)


def test_factorized_reduce_shifted_view_matches_torch():
    # FactorizedReduce applies a 1x1 stride-2 conv to x[:, :, 1:, 1:], a non-contiguous view.
    x = _random((2, 4, 8, 8), 3)
    w = _random((3, 4, 1, 1), 4)
    view = x[:, :, 1:, 1:]
    gy = _random((2, 3, 4, 4), 5)
    _check_against_torch(_ours(view, w, gy, 2, 0, 1, 1),
                         _torch_reference(np.ascontiguousarray(view), w, gy, 2, 0, 1, 1),
                         _abs_sums(view, w, gy, 2, 0, 1, 1))


@pytest.mark.parametrize("case", [
    ((3, 3, 9, 9), (6, 3, 3, 3), 1, 1, 1, 1),   # stem-like 3x3
    ((2, 4, 9, 9), (4, 1, 5, 5), 2, 4, 2, 4),   # depthwise-as-grouped, dilated 5x5
    ((2, 2, 3, 3), (2, 2, 5, 5), 1, 2, 1, 1),   # kernel larger than the input
    ((1, 2, 6, 6), (2, 2, 1, 3), (1, 2), (0, 1), (1, 2), 1),  # non-square geometry
    ((2, 2, 7, 7), (3, 2, 3, 3), 1, 2, 2, 1),   # "same" dilated 3x3: one run per col row
    ((2, 2, 5, 4), (3, 2, 1, 1), (2, 1), (0, 2), 1, 1),  # stride_h * W == OW: one run too
])
def test_selected_geometries_match_torch(case):
    _compare(*case)


def test_results_are_bit_identical_on_repeat_and_across_thread_counts():
    x = _random((3, 4, 9, 9), 10)
    w = _random((6, 2, 3, 3), 11)
    gy = _random((3, 6, 5, 5), 12)
    args = (x, w, gy, 2, 1, 1, 2)
    first = _ours(*args)
    second = _ours(*args)
    previous = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        single = _ours(*args)
    finally:
        numba.set_num_threads(previous)
    for a, b, c in zip(first, second, single):
        assert np.array_equal(a, b)
        assert np.array_equal(a, c)


def test_gradients_are_adjoint_of_forward():
    # <conv(x, w), gy> = <x, grad_input(gy, w)> = <w, grad_weight(gy, x)> up to rounding.
    x = _random((2, 4, 7, 6), 20)
    w = _random((4, 2, 3, 3), 21)
    y = conv2d(x, w, 2, 1, 2, 2)
    gy = _random(y.shape, 22)
    lhs = np.sum(y.astype(np.float64) * gy)
    gx = conv2d_grad_input(gy, w, x.shape, 2, 1, 2, 2)
    gw = conv2d_grad_weight(gy, x, w.shape, 2, 1, 2, 2)
    assert np.isclose(lhs, np.sum(x.astype(np.float64) * gx), rtol=1e-5, atol=1e-4)
    assert np.isclose(lhs, np.sum(w.astype(np.float64) * gw), rtol=1e-5, atol=1e-4)


def test_the_tester_rejects_a_wrong_backward():
    # A grad_input taken with the spatially flipped kernel (a classic slip) must fail the check,
    # and so must a single wrong weight-gradient element.
    x = _random((2, 2, 6, 6), 30)
    w = _random((3, 2, 3, 3), 31)
    gy = _random((2, 3, 6, 6), 32)
    ref = _torch_reference(x, w, gy, 1, 1, 1, 1)
    sums = _abs_sums(x, w, gy, 1, 1, 1, 1)
    y, gx, gw = _ours(x, w, gy, 1, 1, 1, 1)
    _check_against_torch((y, gx, gw), ref, sums)
    flipped_gx = conv2d_grad_input(gy, np.ascontiguousarray(w[:, :, ::-1, ::-1]), x.shape, 1, 1)
    with pytest.raises(AssertionError):
        _check_against_torch((y, flipped_gx, gw), ref, sums)
    bad_gw = gw.copy()
    bad_gw[1, 0, 2, 1] += 1e-2
    with pytest.raises(AssertionError):
        _check_against_torch((y, gx, bad_gw), ref, sums)
    # 1e-4 on one element passed the former fixed atol of 1e-4; the product-magnitude bound
    # (2.9e-5 for this entry, a sum of 50 products) sees it.
    bad_gw = gw.copy()
    bad_gw[0, 1, 0, 0] += 1e-4
    with pytest.raises(AssertionError):
        _check_against_torch((y, gx, bad_gw), ref, sums)


@pytest.mark.parametrize("call, message", [
    (lambda x, w: conv2d(x.astype(np.float64), w), "float32"),
    (lambda x, w: conv2d(x[0], w), "4-D"),
    (lambda x, w: conv2d(x.tolist(), w), "numpy array"),
    (lambda x, w: conv2d(x, w, groups=3), "groups=3"),
    (lambda x, w: conv2d(x, w, groups=0), "groups"),
    (lambda x, w: conv2d(x, w[:, :2]), "weight"),
    (lambda x, w: conv2d(x, w, stride=0), "stride"),
    (lambda x, w: conv2d(x, w, padding=-1), "padding"),
    (lambda x, w: conv2d(x, w, dilation=(1, 0)), "dilation"),
    (lambda x, w: conv2d(x, w, stride=(1, 2, 3)), "stride"),
    (lambda x, w: conv2d(x[:, :, :2, :2], w), "empty output"),
    (lambda x, w: conv2d_grad_input(np.zeros((2, 4, 5, 5), np.float32), w, x.shape), "gy"),
    (lambda x, w: conv2d_grad_input(np.zeros((2, 4, 3, 3), np.float32), w, (2, 4, 5)),
     "input_shape"),
    (lambda x, w: conv2d_grad_weight(np.zeros((2, 4, 2, 2), np.float32), x, w.shape), "gy"),
    (lambda x, w: conv2d_grad_weight(np.zeros((2, 4, 3, 3), np.float32), x, (4, 4, 3)),
     "weight_shape"),
])
def test_invalid_arguments_raise(call, message):
    x = np.zeros((2, 4, 5, 5), np.float32)
    w = np.zeros((4, 4, 3, 3), np.float32)
    with pytest.raises(ValueError, match=message):
        call(x, w)


def test_blas_thread_limits_are_left_as_they_were():
    # The kernels change no thread setting; the run sets BLAS once (see the module docstring).
    from threadpoolctl import threadpool_info

    x = _random((2, 4, 6, 6), 40)
    w = _random((4, 4, 3, 3), 41)
    conv2d(x, w, 1, 1)  # loads the BLAS that Numba's np.dot uses
    before = sorted((lib["filepath"], lib["num_threads"]) for lib in threadpool_info()
                    if lib["user_api"] == "blas")
    gy = _random((2, 4, 6, 6), 42)
    conv2d(x, w, 1, 1)
    conv2d_grad_input(gy, w, x.shape, 1, 1)
    conv2d_grad_weight(gy, x, w.shape, 1, 1)
    after = sorted((lib["filepath"], lib["num_threads"]) for lib in threadpool_info()
                   if lib["user_api"] == "blas")
    assert after == before
