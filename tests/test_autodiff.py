"""The autodiff engine and its basic ops against PyTorch (forward and gradients) and numeric checks.

Tolerances: float32 results against torch within rtol=1e-5, atol=1e-6 for
element-wise and shape ops, rtol=1e-4, atol=1e-5 for reductions, matmul and
softmax-family ops (summation order differs).
"""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from approxdarts_np.autodiff import Function, Tensor, no_grad
from approxdarts_np.autodiff import functional as F
from gradcheck import check_gradients

torch.set_num_threads(2)


def _pair(shape_a, shape_b, seed, positive=False):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape_a).astype(np.float32)
    b = rng.standard_normal(shape_b).astype(np.float32)
    if positive:
        a, b = np.abs(a) + 0.5, np.abs(b) + 0.5
    return a, b


def _torch_grads(fn, arrays, upstream):
    ts = [torch.tensor(a, requires_grad=True) for a in arrays]
    out = fn(*ts)
    out.backward(torch.tensor(upstream))
    return out.detach().numpy(), [t.grad.numpy() for t in ts]


def _ours_grads(fn, arrays, upstream):
    ts = [Tensor(a, requires_grad=True) for a in arrays]
    out = fn(*ts)
    out.backward(upstream)
    return out.data, [t.grad for t in ts]


def _compare(ours_fn, torch_fn, arrays, rtol=1e-5, atol=1e-6, seed=1):
    with torch.no_grad():
        ref_shape = torch_fn(*[torch.tensor(a) for a in arrays]).shape
    upstream = np.random.default_rng(seed).standard_normal(tuple(ref_shape)).astype(np.float32)
    y, gs = _ours_grads(ours_fn, arrays, upstream)
    ty, tgs = _torch_grads(torch_fn, arrays, upstream)
    np.testing.assert_allclose(y, ty, rtol=rtol, atol=atol)
    for g, tg in zip(gs, tgs):
        assert g.shape == tg.shape and g.dtype == np.float32
        np.testing.assert_allclose(g, tg, rtol=rtol, atol=atol)


# Broadcast-compatible shape pairs: each dim of b is either the same, 1, or missing.
@st.composite
def broadcast_shapes(draw):
    shape = draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
    drop = draw(st.integers(0, len(shape) - 1))
    other = [n if draw(st.booleans()) else 1 for n in shape[drop:]]
    if draw(st.booleans()):
        return tuple(shape), tuple(other)
    return tuple(other), tuple(shape)


@given(broadcast_shapes(), st.integers(0, 2**16),
       st.sampled_from(["add", "sub", "mul"]))
def test_binary_ops_match_torch_with_broadcasting(shapes, seed, op):
    a, b = _pair(*shapes, seed)
    ours = {"add": lambda x, y: x + y, "sub": lambda x, y: x - y, "mul": lambda x, y: x * y}[op]
    _compare(ours, ours, [a, b])


@given(st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(1, 5)), st.integers(0, 2**16))
def test_matmul_matches_torch(dims, seed):
    m, k, n = dims
    a, b = _pair((m, k), (k, n), seed)
    _compare(lambda x, y: x @ y, lambda x, y: x @ y, [a, b], rtol=1e-4, atol=1e-5)


@given(st.lists(st.integers(1, 4), min_size=1, max_size=4), st.integers(0, 2**16), st.data())
def test_reductions_match_torch(shape, seed, data):
    a = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    axes = data.draw(st.sets(st.integers(0, len(shape) - 1), min_size=1))
    axis = tuple(sorted(axes))
    keep = data.draw(st.booleans())
    _compare(lambda x: x.sum(axis=axis, keepdims=keep),
             lambda x: x.sum(dim=axis, keepdim=keep), [a], rtol=1e-4, atol=1e-5)
    _compare(lambda x: x.mean(axis=axis, keepdims=keep),
             lambda x: x.mean(dim=axis, keepdim=keep), [a], rtol=1e-4, atol=1e-5)
    _compare(lambda x: x.sum(), lambda x: x.sum(), [a], rtol=1e-4, atol=1e-5)


@given(st.lists(st.integers(1, 4), min_size=2, max_size=4), st.integers(0, 2**16))
def test_shape_ops_match_torch(shape, seed):
    a = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    perm = tuple(np.random.default_rng(seed).permutation(len(shape)))
    _compare(lambda x: x.transpose(perm), lambda x: x.permute(perm), [a])
    _compare(lambda x: x.reshape(-1), lambda x: x.reshape(-1), [a])
    _compare(lambda x: x[..., 1:], lambda x: x[..., 1:], [a])
    _compare(lambda x: x[:, ::2], lambda x: x[:, ::2], [a])


@given(st.integers(1, 3), st.integers(1, 4), st.integers(0, 2**16))
def test_concat_matches_torch(n_parts, axis_len, seed):
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal((2, axis_len + i, 3)).astype(np.float32) for i in range(n_parts)]
    _compare(lambda *xs: F.concat(xs, axis=1), lambda *xs: torch.cat(xs, dim=1), arrays)


@given(st.lists(st.integers(1, 5), min_size=1, max_size=3), st.integers(0, 2**16))
def test_elementwise_match_torch(shape, seed):
    a = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    _compare(lambda x: x.relu(), torch.relu, [a])
    _compare(lambda x: x.exp(), torch.exp, [a], rtol=1e-5, atol=1e-6)
    _compare(lambda x: (x * x + 0.5).log(), lambda x: torch.log(x * x + 0.5), [a], rtol=1e-5, atol=1e-5)
    _compare(lambda x: -x, lambda x: -x, [a])


@given(st.integers(1, 5), st.integers(1, 8), st.integers(0, 2**16))
def test_softmax_family_matches_torch(n, k, seed):
    a = (3 * np.random.default_rng(seed).standard_normal((n, k))).astype(np.float32)
    _compare(lambda x: x.softmax(-1), lambda x: torch.softmax(x, -1), [a], rtol=1e-4, atol=1e-6)
    _compare(lambda x: x.softmax(0), lambda x: torch.softmax(x, 0), [a], rtol=1e-4, atol=1e-6)
    _compare(lambda x: x.log_softmax(-1), lambda x: torch.log_softmax(x, -1), [a], rtol=1e-4, atol=1e-5)
    labels = np.random.default_rng(seed + 1).integers(0, k, size=n)
    _compare(lambda x: F.cross_entropy(x, labels),
             lambda x: torch.nn.functional.cross_entropy(x, torch.tensor(labels)), [a],
             rtol=1e-4, atol=1e-6)


@given(st.integers(1, 4), st.integers(0, 2**16))
def test_weighted_sum_matches_torch(k, seed):
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(k).astype(np.float32)] + \
        [rng.standard_normal((2, 3, 4)).astype(np.float32) for _ in range(k)]
    _compare(lambda w, *xs: F.weighted_sum(w, xs),
             lambda w, *xs: sum(w[i] * x for i, x in enumerate(xs)), arrays, rtol=1e-4, atol=1e-5)


def test_numeric_gradients_of_a_composite():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 4)).astype(np.float32)
    b = rng.standard_normal((4, 2)).astype(np.float32)
    check_gradients(lambda x, y: ((x @ y).softmax(-1) * (x @ y)).sum(axis=1), [a, b])


def test_shared_subexpression_accumulates():
    x = Tensor(np.array([1.0, 2.0, 3.0]), requires_grad=True)
    y = x * x + x  # x used three times
    y.sum().backward()
    np.testing.assert_array_equal(x.grad, 2 * x.data + 1)


def test_deep_chain_needs_no_recursion():
    x = Tensor(np.ones(3), requires_grad=True)
    y = x
    for _ in range(5000):
        y = y + 1.0
    y.sum().backward()
    np.testing.assert_array_equal(x.grad, np.ones(3))


def test_no_grad_records_nothing():
    x = Tensor(np.ones(3), requires_grad=True)
    with no_grad():
        y = x * 2.0
    assert y._ctx is None and not y.requires_grad


def test_leaf_gradients_accumulate_across_backwards():
    x = Tensor(np.ones(2), requires_grad=True)
    (x * 3.0).sum().backward()
    (x * 3.0).sum().backward()
    np.testing.assert_array_equal(x.grad, [6.0, 6.0])


# ----------------------------------------------------------- test the tester


class _WrongScale(Function):
    """ReLU with a backward that is off by a factor of two."""

    def forward(self, a):
        self.mask = a > 0
        return np.maximum(a, 0)

    def backward(self, g):
        return 2 * g * self.mask


class _WrongShape(Function):
    def forward(self, a):
        return a.sum(axis=0)

    def backward(self, g):
        return g  # missing the broadcast back to the input shape


def test_gradcheck_catches_a_wrong_backward():
    a = np.array([[0.5, -1.0, 2.0]], dtype=np.float32)
    check_gradients(lambda x: x.relu(), [a])
    with pytest.raises(AssertionError, match="analytic"):
        check_gradients(lambda x: _WrongScale.apply(x), [a])


def test_torch_comparison_catches_a_wrong_backward():
    a = np.array([[0.5, -1.0, 2.0]], dtype=np.float32)
    with pytest.raises(AssertionError):
        _compare(lambda x: _WrongScale.apply(x), torch.relu, [a])


def test_engine_rejects_a_gradient_of_the_wrong_shape():
    x = Tensor(np.ones((2, 3)), requires_grad=True)
    with pytest.raises(RuntimeError, match="_WrongShape.backward returned a gradient"):
        _WrongShape.apply(x).sum().backward()


def test_engine_rejects_a_gradient_of_the_wrong_dtype():
    class _WrongDtype(Function):
        def forward(self, a):
            return a * 2

        def backward(self, g):
            return (g * 2).astype(np.float64)

    x = Tensor(np.ones(3), requires_grad=True)
    with pytest.raises(RuntimeError, match="float32"):
        _WrongDtype.apply(x).sum().backward()


@pytest.mark.parametrize("size", [5, (1 << 17) + 13])     # one thread, then all kernel threads
def test_weighted_sum_is_numpys_float32_sum_and_float64_dots(size):
    """Forward bit for bit NumPy's term-by-term float32 sum; backward g*w_i bit for bit, and
    dL/dw_i the float64 dot rounded once (scaled tolerance: relative 1e-6 of sum |g*x|)."""
    rng = np.random.default_rng(size)
    k = 4
    w = rng.standard_normal(k).astype(np.float32)
    xs = [rng.standard_normal(size).astype(np.float32) for _ in range(k)]
    g = rng.standard_normal(size).astype(np.float32)
    wt = Tensor(w, requires_grad=True)
    xts = [Tensor(x, requires_grad=True) for x in xs]
    out = F.weighted_sum(wt, xts)
    expected = xs[0] * w[0]
    for wi, x in zip(w[1:], xs[1:]):
        expected = expected + x * wi
    np.testing.assert_array_equal(out.data, expected)
    out.backward(g)
    for wi, xt in zip(w, xts):
        np.testing.assert_array_equal(xt.grad, g * wi)
    dots = np.array([np.dot(g.astype(np.float64), x.astype(np.float64)) for x in xs])
    scale = np.array([np.abs(g.astype(np.float64) * x).sum() for x in xs])
    assert np.all(np.abs(wt.grad - dots) <= 1e-6 * scale + 1e-30)


@pytest.mark.parametrize("size", [1, 63, 64, 65, 16384 + 3, (1 << 17) + 77])   # serial, parallel
def test_relu_is_numpys_maximum_and_its_gradient_numpys_masked_product(size):
    """Forward bit for bit np.maximum(a, 0) (NaN kept, -0 to +0), the mask a > 0 in bit j of
    word w for element 64*w + j, and the gradient bit for bit g * mask as a float32 product
    (so -0 and NaN of g behave as NumPy's). Elements sit on both sides of word and block ends."""
    from approxdarts_np.kernels import elementwise as kew
    rng = np.random.default_rng(size)
    a = rng.standard_normal(size).astype(np.float32)
    a[::7] = 0.0
    a[3::11] = -0.0
    a[5::13] = np.nan
    a[-1] = 1.0
    g = rng.standard_normal(size).astype(np.float32)
    g[::5] = -g[::5]
    x = Tensor(a.reshape(1, -1), requires_grad=True)
    y = F.relu(x)
    expected = np.maximum(a, np.float32(0))
    np.testing.assert_array_equal(y.data.reshape(-1).view(np.int32), expected.view(np.int32))
    out, bits = kew.relu_forward(a)
    mask = np.unpackbits(bits.view(np.uint8), bitorder="little")[:size].astype(bool)
    np.testing.assert_array_equal(mask, a > 0)
    y.backward(g.reshape(1, -1))
    gx = np.multiply(g, a > 0, dtype=np.float32)
    np.testing.assert_array_equal(x.grad.reshape(-1).view(np.int32), gx.view(np.int32))
    # test the tester: the mask of the previous element (a one-bit shift) is caught
    shifted = kew.relu_backward(g, np.left_shift(bits, np.uint64(1)))
    assert size == 1 or not np.array_equal(shifted, gx)


def test_elementwise_results_do_not_depend_on_the_thread_count():
    import numba

    from approxdarts_np.kernels import elementwise as kew
    rng = np.random.default_rng(2)
    size = (1 << 18) + 7
    g, x = rng.standard_normal(size).astype(np.float32), rng.standard_normal(size).astype(np.float32)
    results = []
    before = numba.get_num_threads()
    try:
        for threads in (1, numba.config.NUMBA_NUM_THREADS):
            numba.set_num_threads(threads)
            gx, dot = kew.scale_and_dot(g, x, np.float32(0.7))
            acc = kew.scaled_add(np.empty_like(x), x, np.float32(0.3), True)
            kew.add_into(acc, g)
            results.append((gx, dot, acc))
    finally:
        numba.set_num_threads(before)
    (gx1, d1, a1), (gx2, d2, a2) = results
    np.testing.assert_array_equal(gx1, gx2)
    np.testing.assert_array_equal(a1, a2)
    assert d1 == d2
    np.testing.assert_array_equal(a1, (x * np.float32(0.3)) + g)


@pytest.mark.parametrize("size", [6, (1 << 17) + 5])
def test_gradients_meeting_at_a_node_are_summed_without_touching_shared_arrays(size):
    """Add's backward hands one array to both inputs; y1 then also gets 5*g from another
    reader. An in-place sum into that shared array would give y2 the 5*g too."""
    x = Tensor(np.ones(size, np.float32), requires_grad=True)
    y1 = x * 1.0
    y2 = x * 2.0
    s = y1 + y2                      # dL/dy1 = dL/dy2 = g, one array
    t = s + y1 * 5.0 + y1 * 7.0      # y1: three readers, so two sums (the second in place)
    t.backward(np.ones(size, np.float32))
    # dL/dx = 1*(1 + 5 + 7) + 2*1 = 15 everywhere
    np.testing.assert_array_equal(x.grad, np.full(size, 15.0, np.float32))
