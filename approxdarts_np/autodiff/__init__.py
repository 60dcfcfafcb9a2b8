"""Reverse-mode autodiff: :class:`Tensor`, :class:`Function` and the ops the DARTS search needs."""
from approxdarts_np.autodiff.tensor import (DTYPE, Function, Tensor, as_tensor, is_grad_enabled, no_grad,
                                            run_independent, run_independent_with, unbroadcast)

__all__ = ["DTYPE", "Function", "Tensor", "as_tensor", "is_grad_enabled", "no_grad", "run_independent",
           "run_independent_with", "unbroadcast"]
