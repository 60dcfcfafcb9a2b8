"""Layers: convolutions (float or through a multiplier table), batch norm, pools, linear, ReLU.

Weights are initialised as PyTorch does by default (uniform in ±1/sqrt(fan_in)),
drawn from the ``rng`` the caller passes so that a seed fixes a network.
"""
from __future__ import annotations

import numpy as np

from approxdarts_np.autodiff import Tensor
from approxdarts_np.autodiff import conv as C
from approxdarts_np.autodiff import functional as F
from approxdarts_np.kernels._util import as_pair, conv_output_size
from approxdarts_np.nn.costs import note_call
from approxdarts_np.nn.module import Module, Parameter


def _uniform(rng: np.random.Generator | None, shape, fan_in: int) -> np.ndarray:
    rng = rng if rng is not None else np.random.default_rng()
    bound = 1.0 / np.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=shape).astype(np.float32)


class _ConvBase(Module):
    """Shared state of the convolutions: geometry and the arithmetic.

    ``arithmetic`` is None for float32, or an object from
    :mod:`approxdarts_np.approx` that quantises the operands to 8 bit and
    multiplies through its multiplier's table. It is a per-layer attribute so a
    network can mix multipliers.
    """

    def __init__(self, stride, padding, dilation):
        super().__init__()
        self.stride = as_pair(stride, "stride")
        self.padding = as_pair(padding, "padding")
        self.dilation = as_pair(dilation, "dilation")
        # What each call hands the kernels: a plain int where h and w agree (checked faster there).
        self._geometry = tuple(p[0] if p[0] == p[1] else p for p in (self.stride, self.padding, self.dilation))
        self.arithmetic = None

    def macs(self, x_shape) -> int:
        """Multiply-accumulates of one forward pass on input ``x_shape`` (N, C, H, W)."""
        n, _, h, w = x_shape
        ho, wo = self.output_hw(h, w)
        co, ci_g, kh, kw = self.weight.shape
        return int(n * co * ho * wo * ci_g * kh * kw)

    def __repr__(self) -> str:
        co, ci_g, kh, kw = self.weight.shape
        arithmetic = "float32" if self.arithmetic is None else repr(self.arithmetic)
        return (f"{type(self).__name__}({co}x{ci_g}x{kh}x{kw}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, {arithmetic})")

    def output_hw(self, h: int, w: int) -> tuple[int, int]:
        kh, kw = self.weight.shape[2:]
        return (conv_output_size(h, kh, self.stride[0], self.padding[0], self.dilation[0]),
                conv_output_size(w, kw, self.stride[1], self.padding[1], self.dilation[1]))


class Conv2d(_ConvBase):
    """Dense or grouped 2-D convolution without bias."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, rng=None):
        super().__init__(stride, padding, dilation)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} "
                             f"and out_channels={out_channels}")
        kh, kw = as_pair(kernel_size, "kernel_size")
        self.groups = groups
        fan_in = in_channels // groups * kh * kw
        self.weight = Parameter(_uniform(rng, (out_channels, in_channels // groups, kh, kw), fan_in))

    def forward(self, x: Tensor) -> Tensor:
        note_call(self, x.shape)
        if self.arithmetic is not None:
            return self.arithmetic.conv2d(x, self.weight, *self._geometry, self.groups)
        return C.conv2d(x, self.weight, *self._geometry, self.groups)


class DepthwiseConv2d(_ConvBase):
    """Depthwise convolution: one k×k filter per channel."""

    def __init__(self, channels, kernel_size, stride=1, padding=0, dilation=1, rng=None):
        super().__init__(stride, padding, dilation)
        kh, kw = as_pair(kernel_size, "kernel_size")
        self.weight = Parameter(_uniform(rng, (channels, 1, kh, kw), kh * kw))

    def forward(self, x: Tensor) -> Tensor:
        note_call(self, x.shape)
        if self.arithmetic is not None:
            return self.arithmetic.conv2d(x, self.weight, *self._geometry, self.weight.shape[0])
        return C.depthwise_conv2d(x, self.weight, *self._geometry)


class BatchNorm2d(Module):
    """Batch normalisation over (N, H, W) per channel, with PyTorch's running-average update."""

    def __init__(self, channels: int, affine: bool = True, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.channels, self.affine, self.momentum, self.eps = channels, affine, momentum, eps
        if affine:
            self.weight = Parameter(np.ones(channels, dtype=np.float32))
            self.bias = Parameter(np.zeros(channels, dtype=np.float32))
        self.register_buffer("running_mean", np.zeros(channels))
        self.register_buffer("running_var", np.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        affine = (self.weight, self.bias) if self.affine else ()
        if not self.training:
            return C.BatchNormEval.apply(x, *affine, running_mean=self._buffers["running_mean"],
                                         running_var=self._buffers["running_var"], eps=self.eps)
        stats: list = []
        y = C.BatchNormTrain.apply(x, *affine, eps=self.eps, stats_out=stats)
        mean, var, n = stats[0]  # n: values per channel in the whole batch (all replicas' shares)
        unbiased = var * (n / max(n - 1, 1))
        m = self.momentum
        rm, rv = self._buffers["running_mean"], self._buffers["running_var"]
        rm *= 1 - m
        rm += m * mean
        rv *= 1 - m
        rv += m * unbiased
        return y


class ReLU(Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x)


class Identity(Module):
    def forward(self, x: Tensor) -> Tensor:
        return x


class MaxPool2d(Module):
    def __init__(self, kernel_size=3, stride=1, padding=1):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def forward(self, x: Tensor) -> Tensor:
        return C.max_pool2d(x, self.kernel_size, self.stride, self.padding)


class AvgPool2d(Module):
    """Average pooling; padding is not counted unless ``count_include_pad``."""

    def __init__(self, kernel_size=3, stride=1, padding=1, count_include_pad=False):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.count_include_pad = count_include_pad

    def forward(self, x: Tensor) -> Tensor:
        return C.avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.count_include_pad)


class GlobalAvgPool2d(Module):
    """Mean over the spatial axes: (N, C, H, W) -> (N, C)."""

    def forward(self, x: Tensor) -> Tensor:
        return C.global_avg_pool2d(x)


class Linear(Module):
    """``y = x @ W.T + b`` with W of shape (out, in)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, rng=None):
        super().__init__()
        self.weight = Parameter(_uniform(rng, (out_features, in_features), in_features))
        self.bias = Parameter(_uniform(rng, (out_features,), in_features)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        note_call(self, x.shape)
        y = F.matmul(x, F.transpose(self.weight))
        return y + self.bias if self.bias is not None else y

    def macs(self, x_shape) -> int:
        return int(x_shape[0] * self.weight.shape[0] * self.weight.shape[1])
