"""Quantised 8-bit convolution through a multiplier table, as an autodiff op (TFApprox semantics).

Forward: both operands are quantised per tensor (activations with the current
batch's range), the integer accumulation Σ M(q_x, q_w) − z_w·q_x − z_x·q_w + z_x·z_w
runs through the table (:func:`~approxdarts_np.approx.lut_conv.approx_conv2d`), and
the result is scaled by s_x·s_w. Backward: the straight-through estimator — the
exact float convolution gradient taken at the de-quantised operands.
"""
from __future__ import annotations

import numpy as np

from approxdarts_np.approx.lut_conv import approx_conv2d, make_lut_plan
from approxdarts_np.approx.multipliers import Multiplier
from approxdarts_np.approx.quantize import dequantize_codes
from approxdarts_np.autodiff import Function, Tensor
from approxdarts_np.kernels import conv as kconv
from approxdarts_np.kernels import depthwise as kdw


def _is_depthwise(x_shape, w_shape, groups) -> bool:
    return groups > 1 and groups == x_shape[1] == w_shape[0] and w_shape[1] == 1


class ApproxConv2d(Function):
    """Convolution of quantised operands through ``plan``'s table, straight-through gradient."""

    def forward(self, x, w, plan=None, stride=1, padding=0, dilation=1, groups=1):
        y, x_codes, w_codes = approx_conv2d(x, w, plan, stride, padding, dilation, groups)
        self.geometry = (stride, padding, dilation)
        self.groups = groups
        self.depthwise = _is_depthwise(x.shape, w.shape, groups)
        self.x_shape, self.w_shape = x.shape, w.shape
        # The uint8 codes are kept (a quarter of the float activations) and de-quantised in backward.
        if self.needs_grad(1):
            self.x_codes = x_codes
        if self.needs_grad(0):
            self.w_codes = w_codes
        return y

    def backward(self, g):
        g = np.ascontiguousarray(g)
        gx = gw = None
        w_deq = dequantize_codes(*self.w_codes) if self.needs_grad(0) else None
        x_deq = dequantize_codes(*self.x_codes) if self.needs_grad(1) else None
        if self.depthwise:
            if w_deq is not None:
                gx = kdw.depthwise_conv2d_grad_input(g, w_deq, self.x_shape, *self.geometry)
            if x_deq is not None:
                gw = kdw.depthwise_conv2d_grad_weight(g, x_deq, self.w_shape, *self.geometry)
        else:
            if w_deq is not None:
                gx = kconv.conv2d_grad_input(g, w_deq, self.x_shape, *self.geometry, self.groups)
            if x_deq is not None:
                gw = kconv.conv2d_grad_weight(g, x_deq, self.w_shape, *self.geometry, self.groups)
        return gx, gw


class QuantizedArithmetic:
    """8-bit arithmetic with one multiplier: what a layer's ``arithmetic`` attribute holds.

    Built once per multiplier (the table's plan, e.g. its low-rank
    decomposition, is computed here, not per batch) and shared by every layer
    that uses it.
    """

    def __init__(self, multiplier: Multiplier):
        self.multiplier = multiplier
        self.plan = make_lut_plan(multiplier.table)

    @property
    def name(self) -> str:
        return self.multiplier.name

    def conv2d(self, x: Tensor, w: Tensor, stride=1, padding=0, dilation=1, groups=1) -> Tensor:
        return ApproxConv2d.apply(x, w, plan=self.plan, stride=stride, padding=padding,
                                  dilation=dilation, groups=groups)

    def __repr__(self) -> str:
        # the engine "auto" starts from; per shape choose_engine may still pick the gather
        return f"QuantizedArithmetic({self.name}, engine={self.plan.engine})"
