"""Element-wise, reduction, shape and loss ops, one Function each.

Convolution, pooling and batch-norm ops live in :mod:`approxdarts_np.autodiff.conv`.
"""
from __future__ import annotations

import numpy as np

from approxdarts_np.autodiff.tensor import DTYPE, Function, Tensor, is_grad_enabled, unbroadcast
from approxdarts_np.kernels import elementwise as kew

# ------------------------------------------------------------------ arithmetic


class Add(Function):
    def forward(self, a, b):
        self.shapes = (a.shape, b.shape)
        return np.add(a, b, dtype=DTYPE)

    def backward(self, g):
        sa, sb = self.shapes
        return (unbroadcast(g, sa) if self.needs_grad(0) else None,
                unbroadcast(g, sb) if self.needs_grad(1) else None)


class Sub(Function):
    def forward(self, a, b):
        self.shapes = (a.shape, b.shape)
        return np.subtract(a, b, dtype=DTYPE)

    def backward(self, g):
        sa, sb = self.shapes
        return (unbroadcast(g, sa) if self.needs_grad(0) else None,
                unbroadcast(-g, sb) if self.needs_grad(1) else None)


class Mul(Function):
    def forward(self, a, b):
        self.a = a if self.needs_grad(1) else None
        self.b = b if self.needs_grad(0) else None
        self.shapes = (a.shape, b.shape)
        return np.multiply(a, b, dtype=DTYPE)

    def backward(self, g):
        sa, sb = self.shapes
        return (unbroadcast(g * self.b, sa) if self.needs_grad(0) else None,
                unbroadcast(g * self.a, sb) if self.needs_grad(1) else None)


class Neg(Function):
    def forward(self, a):
        return np.negative(a)

    def backward(self, g):
        return -g


class MatMul(Function):
    """2-D matrix product ``a @ b``."""

    def forward(self, a, b):
        if a.ndim != 2 or b.ndim != 2:
            raise ValueError(f"matmul takes 2-D operands, got {a.shape} and {b.shape}")
        self.a, self.b = a, b
        return a @ b

    def backward(self, g):
        ga = g @ self.b.T if self.needs_grad(0) else None
        gb = self.a.T @ g if self.needs_grad(1) else None
        return ga, gb


class WeightedSum(Function):
    """``Σ_i w[i] · x_i`` for a weight vector ``w`` and same-shape tensors ``x_i`` (DARTS MixedOp).

    The sum is formed term by term in float32 (x_0·w_0, then + x_i·w_i, each product and sum
    rounded, as NumPy would); the passes run on all kernel threads
    (:mod:`approxdarts_np.kernels.elementwise`). Backward: g·w_i, and dL/dw_i = Σ g·x_i summed
    in float64.
    """

    def forward(self, w, *xs):
        if w.ndim != 1 or w.shape[0] != len(xs):
            raise ValueError(f"weighted_sum needs one weight per tensor, got {w.shape} for {len(xs)}")
        self.w = w
        xs = tuple(np.ascontiguousarray(x, dtype=DTYPE) for x in xs)
        self.xs = xs if self.needs_grad(0) else None
        out = np.empty(xs[0].shape, DTYPE)
        for i, (wi, x) in enumerate(zip(w, xs)):
            if x.shape != out.shape:
                raise ValueError(f"weighted_sum needs same-shape tensors, got {x.shape} and "
                                 f"{out.shape}")
            kew.scaled_add(out, x, wi, i == 0)
        return out

    def backward(self, g):
        g = np.ascontiguousarray(g, dtype=DTYPE)
        gw = np.zeros(len(self.w), DTYPE) if self.needs_grad(0) else None
        gxs = []
        for i, wi in enumerate(self.w):
            if gw is not None:
                gx, gw[i] = kew.scale_and_dot(g, self.xs[i], wi)   # dot summed in float64
            elif self.needs_grad(i + 1):
                gx = kew.scaled_add(np.empty_like(g), g, wi, True)
            gxs.append(gx if self.needs_grad(i + 1) else None)
        return (gw,) + tuple(gxs)


# ------------------------------------------------------------------ element-wise


class ReLU(Function):
    """max(a, 0); backward keeps only a bit mask of the positive entries (1/32 of the input)."""

    # np.ascontiguousarray makes a 0-d array 1-d; the results take the input's shape back.
    def forward(self, a):
        out, self.mask = kew.relu_forward(np.ascontiguousarray(a, dtype=DTYPE))
        return out.reshape(np.shape(a))

    def backward(self, g):
        return kew.relu_backward(np.ascontiguousarray(g, dtype=DTYPE), self.mask).reshape(np.shape(g))


class Exp(Function):
    def forward(self, a):
        self.out = np.exp(a)
        return self.out

    def backward(self, g):
        return g * self.out


class Log(Function):
    def forward(self, a):
        self.a = a
        return np.log(a)

    def backward(self, g):
        return g / self.a


# ------------------------------------------------------------------ reductions


def _norm_axes(axis, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted(a % ndim for a in axes))


class Sum(Function):
    def forward(self, a, axis=None, keepdims=False):
        self.shape = a.shape
        self.axes = _norm_axes(axis, a.ndim)
        return np.asarray(a.sum(axis=self.axes, keepdims=keepdims, dtype=DTYPE))

    def backward(self, g):
        kept = list(self.shape)
        for ax in self.axes:
            kept[ax] = 1
        return np.broadcast_to(g.reshape(kept), self.shape).astype(DTYPE)


class Mean(Function):
    def forward(self, a, axis=None, keepdims=False):
        self.shape = a.shape
        self.axes = _norm_axes(axis, a.ndim)
        self.count = int(np.prod([a.shape[ax] for ax in self.axes]))
        return np.asarray(a.mean(axis=self.axes, keepdims=keepdims, dtype=DTYPE))

    def backward(self, g):
        kept = list(self.shape)
        for ax in self.axes:
            kept[ax] = 1
        scaled = g.reshape(kept) * DTYPE(1.0 / self.count)
        return np.broadcast_to(scaled, self.shape).astype(DTYPE)


# ------------------------------------------------------------------ shape


class Reshape(Function):
    def forward(self, a, shape=()):
        self.shape = a.shape
        return a.reshape(shape)

    def backward(self, g):
        return g.reshape(self.shape)


class Transpose(Function):
    def forward(self, a, axes=None):
        self.axes = tuple(range(a.ndim))[::-1] if axes is None else tuple(axes)
        return np.transpose(a, self.axes)

    def backward(self, g):
        return np.ascontiguousarray(np.transpose(g, np.argsort(self.axes)))


class GetItem(Function):
    """Basic indexing (ints, slices, Ellipsis, None) and integer-array indexing."""

    def forward(self, a, index=None):
        self.shape = a.shape
        self.index = index
        return np.ascontiguousarray(a[index])

    def backward(self, g):
        out = np.zeros(self.shape, dtype=DTYPE)
        np.add.at(out, self.index, g) if _has_array_index(self.index) else out.__setitem__(self.index, g)
        return out


def _has_array_index(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, (list, np.ndarray)) for p in parts)


class Concat(Function):
    def forward(self, *arrays, axis=0):
        self.axis = axis
        self.sizes = [a.shape[axis] for a in arrays]
        return np.concatenate(arrays, axis=axis)

    def backward(self, g):
        bounds = np.cumsum(self.sizes)[:-1]
        parts = np.split(g, bounds, axis=self.axis)
        return tuple(np.ascontiguousarray(p) if self.needs_grad(i) else None
                     for i, p in enumerate(parts))


# ------------------------------------------------------------------ softmax and loss


def _log_softmax(a: np.ndarray, axis: int) -> np.ndarray:
    shifted = a - a.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


class Softmax(Function):
    def forward(self, a, axis=-1):
        self.axis = axis
        self.out = np.exp(_log_softmax(a, axis)).astype(DTYPE)
        return self.out

    def backward(self, g):
        y = self.out
        return (y * (g - (g * y).sum(axis=self.axis, keepdims=True))).astype(DTYPE)


class LogSoftmax(Function):
    def forward(self, a, axis=-1):
        self.axis = axis
        self.out = _log_softmax(a, axis).astype(DTYPE)
        return self.out

    def backward(self, g):
        soft = np.exp(self.out)
        return (g - soft * g.sum(axis=self.axis, keepdims=True)).astype(DTYPE)


class CrossEntropy(Function):
    """Mean negative log-likelihood of integer ``labels`` under ``softmax(logits)``."""

    def forward(self, logits, labels=None):
        labels = np.asarray(labels)
        if logits.ndim != 2 or labels.shape != (logits.shape[0],):
            raise ValueError(f"cross_entropy needs logits (N, K) and labels (N,), got "
                             f"{logits.shape} and {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() >= logits.shape[1]):
            raise ValueError("labels out of range for the number of classes")
        logp = _log_softmax(logits, 1)
        self.logp, self.labels = logp, labels
        n = logits.shape[0]
        return np.asarray(-logp[np.arange(n), labels].mean(), dtype=DTYPE)

    def backward(self, g):
        n = self.logp.shape[0]
        grad = np.exp(self.logp)
        grad[np.arange(n), self.labels] -= 1.0
        return (grad * (g / n)).astype(DTYPE)


# ------------------------------------------------------------------ public functions


def add(a, b) -> Tensor:
    return Add.apply(a, b)


def sub(a, b) -> Tensor:
    return Sub.apply(a, b)


def mul(a, b) -> Tensor:
    return Mul.apply(a, b)


def neg(a) -> Tensor:
    return Neg.apply(a)


def matmul(a, b) -> Tensor:
    return MatMul.apply(a, b)


def weighted_sum(weights, tensors) -> Tensor:
    """``Σ_i weights[i] · tensors[i]`` with one fused op (weights: a 1-D Tensor)."""
    return WeightedSum.apply(weights, *tensors)


def relu(a) -> Tensor:
    """max(a, 0). The ReLU of an op's result is computed once and shared.

    DARTS applies ReLU to the same cell state in every convolution of every edge
    that reads it (4 per edge, up to 4 edges per state); those calls get the
    same result Tensor, so the pass, the output and the saved mask exist once
    and the gradients of all readers meet before one ReLU backward (the same
    sum: masking is exact). Only results of ops are shared, never tensors a
    caller made (their data may be changed in place).
    """
    shared = a._relu if isinstance(a, Tensor) else False
    if shared is False:
        return ReLU.apply(a)
    record = a.requires_grad and is_grad_enabled()
    if shared is not None and shared.requires_grad == record and not (record and shared._ctx.consumed):
        return shared
    out = ReLU.apply(a)
    a._relu = out
    return out


def exp(a) -> Tensor:
    return Exp.apply(a)


def log(a) -> Tensor:
    return Log.apply(a)


def sum(a, axis=None, keepdims: bool = False) -> Tensor:  # noqa: A001 - mirrors numpy
    return Sum.apply(a, axis=axis, keepdims=keepdims)


def mean(a, axis=None, keepdims: bool = False) -> Tensor:
    return Mean.apply(a, axis=axis, keepdims=keepdims)


def reshape(a, shape) -> Tensor:
    return Reshape.apply(a, shape=tuple(shape))


def transpose(a, axes=None) -> Tensor:
    return Transpose.apply(a, axes=axes)


def getitem(a, index) -> Tensor:
    return GetItem.apply(a, index=index)


def concat(tensors, axis: int = 0) -> Tensor:
    return Concat.apply(*tensors, axis=axis)


def softmax(a, axis: int = -1) -> Tensor:
    return Softmax.apply(a, axis=axis)


def log_softmax(a, axis: int = -1) -> Tensor:
    return LogSoftmax.apply(a, axis=axis)


def cross_entropy(logits, labels) -> Tensor:
    """Mean cross-entropy of ``logits`` (N, K) against integer ``labels`` (N,)."""
    return CrossEntropy.apply(logits, labels=np.asarray(labels))
