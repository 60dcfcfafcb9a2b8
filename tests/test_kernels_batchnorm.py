"""BatchNorm2d kernels against torch.nn.functional.batch_norm (training and eval) and autograd.

Tolerances (float32 inputs, both sides accumulate the statistics in float64): mean, var,
invstd and the eval output within rtol=1e-5, atol=1e-5; gx, ggamma, gbeta within rtol=1e-4,
atol=1e-5 (ggamma/gbeta are sums over up to N*H*W = 243 terms, rounded differently).
y within rtol=1e-5, atol=1e-5 + 1e-6 * max|x| * invstd * |gamma| per channel: torch forms
y = x * a + (beta - mean * a) in float32, which loses digits to cancellation when a channel's
mean is large against its spread; our y is checked against the formula evaluated in float64
(statistics included) within rtol=1e-6, atol=1e-6.
Determinism: bit-identical on a repeat and across Numba thread counts (1 vs 2).
"""
import numba
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from approxdarts_np.kernels.batchnorm import batch_norm_eval, batch_norm_grad, batch_norm_train

torch.set_num_threads(2)

FWD = {"rtol": 1e-5, "atol": 1e-5}
GRAD = {"rtol": 1e-4, "atol": 1e-5}


@st.composite
def bn_shapes(draw):
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 9)),
             draw(st.integers(1, 9)))
    if shape[0] * shape[2] * shape[3] < 2:
        shape = (shape[0], shape[1], shape[2], 2)
    return shape


def _inputs(shape, seed, affine):
    rng = np.random.default_rng(seed)
    n_ch = shape[1]
    # Channels with different offsets and scales, so normalisation matters.
    x = (rng.standard_normal(shape) * rng.uniform(0.5, 3.0, (1, n_ch, 1, 1))
         + rng.uniform(-5, 5, (1, n_ch, 1, 1))).astype(np.float32)
    gy = rng.standard_normal(shape).astype(np.float32)
    if not affine:
        return x, gy, None, None
    gamma = rng.uniform(0.5, 1.5, n_ch).astype(np.float32)
    beta = rng.standard_normal(n_ch).astype(np.float32)
    return x, gy, gamma, beta


def _torch_train(x, gy, gamma, beta):
    """Return (y, mean, unbiased var, invstd, gx, ggamma, gbeta) from torch."""
    n_ch = x.shape[1]
    xt = torch.tensor(x, requires_grad=True)
    gt = None if gamma is None else torch.tensor(gamma, requires_grad=True)
    bt = None if beta is None else torch.tensor(beta, requires_grad=True)
    running_mean = torch.zeros(n_ch)
    running_var = torch.zeros(n_ch)
    # momentum=1 makes the running statistics equal to the batch statistics torch keeps.
    yt = F.batch_norm(xt, running_mean, running_var, gt, bt, training=True, momentum=1.0)
    yt.backward(torch.tensor(gy))
    _, _, invstd = torch.ops.aten.native_batch_norm(
        torch.tensor(x), gt, bt, None, None, True, 0.0, 1e-5)
    return (yt.detach().numpy(), running_mean.numpy(), running_var.numpy(), invstd.numpy(),
            xt.grad.numpy(), None if gt is None else gt.grad.numpy(),
            None if bt is None else bt.grad.numpy())


def _check_train(x, gy, gamma, beta, ours_fwd, ours_grad):
    y_r, mean_r, var_unbiased_r, invstd_r, gx_r, gg_r, gb_r = _torch_train(x, gy, gamma, beta)
    y, mean, var, invstd = ours_fwd
    n = x.shape[0] * x.shape[2] * x.shape[3]
    for a in (y, mean, var, invstd):
        assert a.dtype == np.float32
    cancel = np.abs(x).max(axis=(0, 2, 3)) * invstd * (1.0 if gamma is None else np.abs(gamma))
    y_atol = (FWD["atol"] + 1e-6 * cancel)[None, :, None, None]
    assert np.all(np.abs(y - y_r) <= y_atol + FWD["rtol"] * np.abs(y_r)), "y vs torch"
    x64 = x.astype(np.float64)
    mean64 = x64.mean(axis=(0, 2, 3), keepdims=True)
    invstd64 = 1.0 / np.sqrt(x64.var(axis=(0, 2, 3), keepdims=True) + 1e-5)
    shape = (1, -1, 1, 1)
    y64 = ((x64 - mean64) * invstd64
           * (1.0 if gamma is None else gamma.astype(np.float64).reshape(shape))
           + (0.0 if beta is None else beta.astype(np.float64).reshape(shape)))
    np.testing.assert_allclose(y, y64, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mean, mean_r, **FWD)
    np.testing.assert_allclose(var * (n / (n - 1)), var_unbiased_r, **FWD)
    np.testing.assert_allclose(invstd, invstd_r, **FWD)
    gx, ggamma, gbeta = ours_grad
    np.testing.assert_allclose(gx, gx_r, **GRAD)
    if gamma is None:
        assert ggamma is None and gbeta is None
    else:
        np.testing.assert_allclose(ggamma, gg_r, **GRAD)
        np.testing.assert_allclose(gbeta, gb_r, **GRAD)


def _ours_train(x, gy, gamma, beta):
    fwd = batch_norm_train(x, gamma, beta)
    return fwd, batch_norm_grad(gy, x, fwd[1], fwd[3], gamma)


@given(bn_shapes(), st.booleans(), st.integers(0, 2**16))
def test_train_forward_and_gradients_match_torch(shape, affine, seed):
    x, gy, gamma, beta = _inputs(shape, seed, affine)
    _check_train(x, gy, gamma, beta, *_ours_train(x, gy, gamma, beta))


@given(bn_shapes(), st.booleans(), st.integers(0, 2**16))
def test_eval_matches_torch(shape, affine, seed):
    x, _, gamma, beta = _inputs(shape, seed, affine)
    rng = np.random.default_rng(seed + 1)
    running_mean = rng.standard_normal(shape[1]).astype(np.float32)
    running_var = rng.uniform(0.1, 4.0, shape[1]).astype(np.float32)
    ref = F.batch_norm(torch.tensor(x), torch.tensor(running_mean), torch.tensor(running_var),
                       None if gamma is None else torch.tensor(gamma),
                       None if beta is None else torch.tensor(beta), training=False).numpy()
    y = batch_norm_eval(x, running_mean, running_var, gamma, beta)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, ref, **FWD)
    # float64 running statistics (as a layer may keep them) give the same result.
    y64 = batch_norm_eval(x, running_mean.astype(np.float64), running_var.astype(np.float64),
                          gamma, beta)
    np.testing.assert_array_equal(y64, y)


def test_large_offset_keeps_the_variance_accurate():
    # mean 1000, std 0.01: a one-pass float32 E[x^2] - E[x]^2 would lose the variance entirely.
    rng = np.random.default_rng(3)
    x = (1000.0 + 0.01 * rng.standard_normal((4, 2, 8, 8))).astype(np.float32)
    _, mean, var, _ = batch_norm_train(x, None, None)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mean, x64.mean(axis=(0, 2, 3)), rtol=1e-7)
    np.testing.assert_allclose(var, x64.var(axis=(0, 2, 3)), rtol=1e-6)


def test_results_are_bit_identical_on_repeat_and_across_thread_counts():
    x, gy, gamma, beta = _inputs((3, 5, 9, 7), 4, True)

    def run():
        fwd = batch_norm_train(x, gamma, beta)
        grad = batch_norm_grad(gy, x, fwd[1], fwd[3], gamma)
        return (*fwd, *grad, batch_norm_eval(x, fwd[1], fwd[2], gamma, beta))

    first, second = run(), run()
    previous = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        single = run()
    finally:
        numba.set_num_threads(previous)
    for a, b, c in zip(first, second, single):
        assert np.array_equal(a, b) and np.array_equal(a, c)


def test_the_tester_rejects_a_wrong_backward():
    # Dropping the projection term (the gradient through the batch variance) must fail.
    x, gy, gamma, beta = _inputs((2, 3, 5, 5), 5, True)
    fwd, grad = _ours_train(x, gy, gamma, beta)
    _check_train(x, gy, gamma, beta, fwd, grad)
    y, mean, var, invstd = fwd
    gy_centered = gy - gy.mean(axis=(0, 2, 3), keepdims=True)
    wrong_gx = (gy_centered * (invstd * gamma)[None, :, None, None]).astype(np.float32)
    with pytest.raises(AssertionError):
        _check_train(x, gy, gamma, beta, fwd, (wrong_gx, grad[1], grad[2]))
    # ... and so must the unbiased variance returned where the biased one is documented.
    n = 2 * 5 * 5
    with pytest.raises(AssertionError):
        _check_train(x, gy, gamma, beta, (y, mean, var * (n / (n - 1)), invstd), grad)


@pytest.mark.parametrize("call, message", [
    (lambda x, g: batch_norm_train(x.astype(np.float64), None, None), "float32"),
    (lambda x, g: batch_norm_train(x[0], None, None), "4-D"),
    (lambda x, g: batch_norm_train(x, g, None), "both"),
    (lambda x, g: batch_norm_train(x, g[:2], g[:2]), "shape"),
    (lambda x, g: batch_norm_train(x[:1, :, :1, :1], None, None), "more than one value"),
    (lambda x, g: batch_norm_train(x, None, None, eps=-1.0), "eps"),
    (lambda x, g: batch_norm_grad(x[:, :2], x, g, g, None), "shape of x"),
    (lambda x, g: batch_norm_grad(x, x, g, g.astype(np.int32), None), "invstd"),
    (lambda x, g: batch_norm_eval(x, g, -g, None, None), "running_var"),
    (lambda x, g: batch_norm_eval(x, g[:2], g, None, None), "running_mean"),
])
def test_invalid_arguments_raise(call, message):
    x = np.zeros((2, 3, 4, 4), np.float32)
    g = np.ones(3, np.float32)
    with pytest.raises(ValueError, match=message):
        call(x, g)
