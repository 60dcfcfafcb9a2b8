"""Numeric gradient check shared by every op test.

The loss is a fixed random projection of the op's output, ``L = Σ r · f(x)``;
the analytic gradient of each input is compared with central differences on a
sample of coordinates. Float32 arithmetic limits the agreement, so the step is
large (1e-2) and the tolerance is stated per call.
"""
from __future__ import annotations

import numpy as np

from approxdarts_np.autodiff import Tensor, no_grad


def check_gradients(fn, arrays, *, eps=1e-2, rtol=2e-2, atol=2e-3, samples=12, seed=0):
    """Assert that autodiff gradients of ``fn(*tensors)`` match central differences.

    ``fn`` maps Tensors to one Tensor; ``arrays`` are float32 inputs (all of
    them get a gradient). Raises AssertionError naming the input and coordinate.
    """
    rng = np.random.default_rng(seed)
    arrays = [np.asarray(a, dtype=np.float32) for a in arrays]
    tensors = [Tensor(a.copy(), requires_grad=True) for a in arrays]
    out = fn(*tensors)
    r = rng.standard_normal(out.shape).astype(np.float32)
    out.backward(r)

    def loss(values):
        with no_grad():
            return float(np.sum(r.astype(np.float64) * fn(*[Tensor(v) for v in values]).data))

    for i, (arr, t) in enumerate(zip(arrays, tensors)):
        assert t.grad is not None, f"input {i} received no gradient"
        flat_idx = rng.choice(arr.size, size=min(samples, arr.size), replace=False)
        for flat in flat_idx:
            idx = np.unravel_index(flat, arr.shape)
            plus = [a.copy() for a in arrays]
            minus = [a.copy() for a in arrays]
            plus[i][idx] += eps
            minus[i][idx] -= eps
            numeric = (loss(plus) - loss(minus)) / (2 * eps)
            analytic = float(t.grad[idx])
            tol = atol + rtol * max(abs(numeric), abs(analytic))
            assert abs(numeric - analytic) <= tol, (
                f"input {i} at {idx}: analytic {analytic:.6g} vs numeric {numeric:.6g}")
