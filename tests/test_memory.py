"""What the autodiff graph keeps alive between forward and backward.

The graph links functions, not tensors, so an intermediate array survives the
forward only when a backward saved it; ReLU keeps a bit mask, max-pool a
compact argmax; with the weights frozen (the architecture step) no op keeps an
input for a weight gradient; and ReLU of one cell state is computed once.
"""
import gc
import weakref

import numpy as np

from approxdarts_np.autodiff import Tensor
from approxdarts_np.autodiff import conv as C
from approxdarts_np.autodiff import functional as F
from approxdarts_np.autodiff.tensor import Function, _topological_order
from approxdarts_np.nas.model_search import Network


def _saved_arrays(root: Tensor) -> list[tuple[str, str, np.ndarray]]:
    """(op name, attribute, array) for every array a recorded function keeps for its backward."""
    out = []
    for node in _topological_order(root._ctx):
        if not isinstance(node, Function):
            continue
        for key, value in vars(node).items():
            values = value if isinstance(value, (tuple, list)) else (value,)
            out += [(type(node).__name__, key, v) for v in values if isinstance(v, np.ndarray)]
    return out


def test_an_intermediate_nobody_saved_is_freed_before_backward():
    x = Tensor(np.ones((64, 64), np.float32), requires_grad=True)
    t1 = F.add(x, 1.0)  # Add saves no arrays
    probe = weakref.ref(t1.data)
    t2 = F.add(t1, 2.0)
    del t1
    gc.collect()
    assert probe() is None, "the graph kept an intermediate array that no backward needs"
    t2.sum().backward()
    np.testing.assert_array_equal(x.grad, np.ones((64, 64), np.float32))


def test_relu_saves_a_bit_mask_and_its_gradient_is_exact():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 5, 7, 9)).astype(np.float32)
    x = Tensor(a, requires_grad=True)
    y = F.relu(x)
    saved = _saved_arrays(y)
    assert sum(arr.nbytes for _, _, arr in saved) <= 8 * -(-a.size // 64)   # bits, in 64-bit words
    g = rng.standard_normal(a.shape).astype(np.float32)
    y.backward(g)
    np.testing.assert_array_equal(x.grad, np.where(a > 0, g, np.float32(0)))


def test_max_pool_keeps_a_uint16_argmax():
    rng = np.random.default_rng(1)
    x = Tensor(rng.standard_normal((2, 3, 8, 8)).astype(np.float32), requires_grad=True)
    y = C.max_pool2d(x, 3, 1, 1)
    saved = _saved_arrays(y)
    assert [arr.dtype for _, key, arr in saved if key == "argmax"] == [np.uint16]


def test_relu_of_an_op_result_is_shared_and_gradients_meet():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((4, 6)).astype(np.float32)
    x = Tensor(a, requires_grad=True)
    h = F.mul(x, 2.0)
    r1, r2 = F.relu(h), F.relu(h)
    assert r1 is r2
    (F.mul(r1, 3.0) + F.mul(r2, 5.0)).sum().backward()
    np.testing.assert_array_equal(x.grad, np.where(a > 0, np.float32(16), np.float32(0)))
    # a tensor the caller made is never shared (its data may change in place)
    assert F.relu(x) is not F.relu(x)


def _tiny_net():
    return Network(channels=2, num_classes=10, layers=3, seed=0)


def _images(n=2, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 3, size, size)).astype(np.float32), rng.integers(0, 10, n)


def test_frozen_weights_keep_no_inputs_for_weight_gradients():
    net = _tiny_net()
    images, labels = _images()
    for p in net.weights():
        p.requires_grad = False
    loss = F.cross_entropy(net(Tensor(images)), labels)
    saved = _saved_arrays(loss)
    for p in net.weights():
        p.requires_grad = True
    conv_inputs = [(op, key) for op, key, _ in saved if op in ("Conv2d", "DepthwiseConv2d") and key == "x"]
    assert conv_inputs == []
    frozen_bytes = sum(arr.nbytes for *_, arr in saved)
    loss = F.cross_entropy(net(Tensor(images)), labels)
    trained_bytes = sum(arr.nbytes for *_, arr in _saved_arrays(loss))
    assert frozen_bytes < 0.8 * trained_bytes


def test_each_cell_state_is_relu_d_once_per_pass():
    net = _tiny_net()
    images, _ = _images()
    calls = []
    original = F.ReLU.forward

    def counting(self, a):
        calls.append(a.shape)
        return original(self, a)

    F.ReLU.forward = counting
    try:
        net(Tensor(images))
    finally:
        F.ReLU.forward = original
    # per cell: one ReLU per state read by convolutions (2 inputs + 3 intermediate nodes) and
    # one per SepConv's second half (2 SepConvs on each of 14 edges); preprocessing: one per
    # tensor that cells read (stem, cell 0, cell 1), each read by two cells' preprocessing
    # (unshared: 3 * (2 + 4 * 5 + 2 * 14) + 6)
    assert len(calls) == 3 * (5 + 2 * 14) + 3
