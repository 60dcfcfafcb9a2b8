"""Layers (autodiff ops over the kernels) against torch modules, and numeric gradient checks.

Tolerances: forward and gradients within rtol=1e-4, atol=1e-5 of torch
(float32); numeric checks as in gradcheck.py.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from hypothesis import assume, given
from hypothesis import strategies as st

from approxdarts_np import nn
from approxdarts_np.autodiff import Tensor
from approxdarts_np.autodiff import conv as C
from gradcheck import check_gradients

torch.set_num_threads(2)
RTOL, ATOL = 1e-4, 1e-5


def _x(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _run(layer, x, upstream_seed=5):
    t = Tensor(x, requires_grad=True)
    y = layer(t)
    g = _x(y.shape, upstream_seed)
    y.backward(g)
    return y.data, t.grad, g


@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.sampled_from([1, 3, 5]),
       st.sampled_from([1, 2]), st.sampled_from([1, 2]), st.integers(0, 2), st.integers(0, 999))
def test_conv_layers_match_torch(n, cin, cout, k, stride, dilation, padding, seed):
    size = 8
    assume(size + 2 * padding - dilation * (k - 1) - 1 >= 0)  # a non-empty output
    x = _x((n, cin, size, size), seed)
    conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, rng=np.random.default_rng(seed))
    y, gx, g = _run(conv, x)
    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(conv.weight.data, requires_grad=True)
    ty = TF.conv2d(tx, tw, None, stride, padding, dilation)
    ty.backward(torch.tensor(g))
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(gx, tx.grad.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(conv.weight.grad, tw.grad.numpy(), rtol=RTOL, atol=ATOL)

    dw = nn.DepthwiseConv2d(cin, k, stride, padding, dilation, rng=np.random.default_rng(seed))
    y, gx, g = _run(dw, x)
    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(dw.weight.data, requires_grad=True)
    ty = TF.conv2d(tx, tw, None, stride, padding, dilation, groups=cin)
    ty.backward(torch.tensor(g))
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(gx, tx.grad.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(dw.weight.grad, tw.grad.numpy(), rtol=RTOL, atol=ATOL)


@given(st.integers(2, 4), st.integers(1, 4), st.booleans(), st.integers(0, 999))
def test_batchnorm_layer_matches_torch_in_both_modes(n, c, affine, seed):
    x = _x((n, c, 5, 5), seed) * 3 + 1
    bn = nn.BatchNorm2d(c, affine=affine)
    tbn = torch.nn.BatchNorm2d(c, affine=affine)
    if affine:
        bn.weight.data[...] = _x((c,), seed + 1)
        bn.bias.data[...] = _x((c,), seed + 2)
        with torch.no_grad():
            tbn.weight.copy_(torch.tensor(bn.weight.data))
            tbn.bias.copy_(torch.tensor(bn.bias.data))
    for step in range(2):  # two training steps move the running statistics
        y, gx, g = _run(bn, x + step)
        tx = torch.tensor(x + step, requires_grad=True)
        ty = tbn(tx)
        ty.backward(torch.tensor(g))
        np.testing.assert_allclose(y, ty.detach().numpy(), rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(gx, tx.grad.numpy(), rtol=RTOL, atol=1e-4)
        if affine:
            np.testing.assert_allclose(bn.weight.grad, tbn.weight.grad.numpy(), rtol=RTOL, atol=1e-4)
            np.testing.assert_allclose(bn.bias.grad, tbn.bias.grad.numpy(), rtol=RTOL, atol=1e-4)
            bn.zero_grad()
            tbn.zero_grad()
    np.testing.assert_allclose(bn._buffers["running_mean"], tbn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn._buffers["running_var"], tbn.running_var.numpy(), rtol=1e-5, atol=1e-6)
    bn.eval()
    tbn.eval()
    y, gx, g = _run(bn, x)
    tx = torch.tensor(x, requires_grad=True)
    ty = tbn(tx)
    ty.backward(torch.tensor(g))
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(gx, tx.grad.numpy(), rtol=RTOL, atol=ATOL)


@given(st.integers(1, 3), st.integers(1, 3), st.sampled_from([1, 2]), st.integers(0, 999))
def test_pool_layers_match_torch(n, c, stride, seed):
    x = _x((n, c, 7, 7), seed)
    for ours, theirs in [
        (nn.MaxPool2d(3, stride, 1), lambda t: TF.max_pool2d(t, 3, stride, 1)),
        (nn.AvgPool2d(3, stride, 1), lambda t: TF.avg_pool2d(t, 3, stride, 1, count_include_pad=False)),
        (nn.AvgPool2d(5, 3, 0), lambda t: TF.avg_pool2d(t, 5, 3, 0, count_include_pad=False)),
        (nn.GlobalAvgPool2d(), lambda t: t.mean(dim=(2, 3))),
    ]:
        y, gx, g = _run(ours, x)
        tx = torch.tensor(x, requires_grad=True)
        ty = theirs(tx)
        ty.backward(torch.tensor(g))
        np.testing.assert_allclose(y, ty.detach().numpy(), rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(gx, tx.grad.numpy(), rtol=RTOL, atol=ATOL)


def test_linear_matches_torch():
    x = _x((3, 5), 0)
    lin = nn.Linear(5, 4, rng=np.random.default_rng(0))
    y, gx, g = _run(lin, x)
    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(lin.weight.data, requires_grad=True)
    tb = torch.tensor(lin.bias.data, requires_grad=True)
    ty = TF.linear(tx, tw, tb)
    ty.backward(torch.tensor(g))
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=RTOL, atol=ATOL)
    for ours, theirs in [(gx, tx), (lin.weight.grad, tw), (lin.bias.grad, tb)]:
        np.testing.assert_allclose(ours, theirs.grad.numpy(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("op", ["conv", "depthwise", "dilated", "maxpool", "avgpool", "bn"])
def test_numeric_gradients_of_the_conv_family(op):
    x = _x((2, 3, 6, 6), 1)
    w = _x((4, 3, 3, 3), 2) * 0.3
    wd = _x((3, 1, 3, 3), 3) * 0.3
    fns = {
        "conv": (lambda a, b: C.conv2d(a, b, 2, 1), [x, w]),
        "depthwise": (lambda a, b: C.depthwise_conv2d(a, b, 1, 1), [x, wd]),
        "dilated": (lambda a, b: C.depthwise_conv2d(a, b, 1, 2, 2), [x, wd]),
        "maxpool": (lambda a: C.max_pool2d(a, 3, 2, 1), [x]),
        "avgpool": (lambda a: C.avg_pool2d(a, 3, 1, 1), [x]),
        "bn": (lambda a, g, b: C.BatchNormTrain.apply(a, g, b), [x, _x((3,), 4), _x((3,), 5)]),
    }
    fn, arrays = fns[op]
    check_gradients(fn, arrays, eps=1e-2 if op != "maxpool" else 1e-3)


def test_state_dict_round_trip_and_mismatch():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, rng=np.random.default_rng(0)), nn.BatchNorm2d(4))
    state = net.state_dict()
    other = nn.Sequential(nn.Conv2d(3, 4, 3, rng=np.random.default_rng(1)), nn.BatchNorm2d(4))
    other.load_state_dict(state)
    for k, v in other.state_dict().items():
        np.testing.assert_array_equal(v, state[k])
    with pytest.raises(KeyError):
        other.load_state_dict({k: v for k, v in state.items() if "running_var" not in k})
