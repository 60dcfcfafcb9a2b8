"""The DARTS candidate operations (``PRIMITIVES``, ``OPS``) and their building blocks.

Vocabulary follows the DARTS paper and code so readers can find their way:
ReLUConvBN, DilConv, SepConv, FactorizedReduce, Zero. The depthwise and
pointwise convolutions inside SepConv and DilConv are the *searched
convolutions*: the only layers that run through an 8-bit multiplier in exact or
approximate mode (:meth:`searched_convs`).
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from approxdarts_np.autodiff import Tensor
from approxdarts_np.autodiff import functional as F
from approxdarts_np.nn import (AvgPool2d, BatchNorm2d, Conv2d, DepthwiseConv2d, Identity, MaxPool2d,
                               Module, ReLU, Sequential)

PRIMITIVES = (
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)


def check_network_size(layers: int, channels: int) -> None:
    """ValueError unless there are 3 cells or more (two reductions and a normal cell) and channels."""
    if layers < 3:
        raise ValueError(f"the network needs at least 3 cells (2 reductions and a normal cell), got {layers}")
    if channels <= 0:
        raise ValueError(f"channels must be positive, got {channels}")


def cifar_stem(c_out: int, rng) -> Sequential:
    """DARTS's stem: a 3x3 conv from the RGB image to ``c_out`` channels, then an affine BN (the cells'
    BNs are not affine)."""
    return Sequential(Conv2d(3, c_out, 3, padding=1, rng=rng), BatchNorm2d(c_out))


class ReLUConvBN(Module):
    """ReLU, k×k convolution, batch norm (cell preprocessing)."""

    def __init__(self, c_in, c_out, kernel_size, stride, padding, affine=True, rng=None):
        super().__init__()
        self.op = Sequential(ReLU(), Conv2d(c_in, c_out, kernel_size, stride, padding, rng=rng),
                             BatchNorm2d(c_out, affine=affine))

    def forward(self, x):
        return self.op(x)


class DilConv(Module):
    """ReLU, depthwise k×k (with stride and dilation), pointwise 1×1, batch norm."""

    def __init__(self, c_in, c_out, kernel_size, stride, padding, dilation, affine=True, rng=None):
        super().__init__()
        self.depthwise = DepthwiseConv2d(c_in, kernel_size, stride, padding, dilation, rng=rng)
        self.pointwise = Conv2d(c_in, c_out, 1, rng=rng)
        self.op = Sequential(ReLU(), self.depthwise, self.pointwise, BatchNorm2d(c_out, affine=affine))

    def forward(self, x):
        return self.op(x)

    def searched_convs(self) -> Iterator[Module]:
        yield self.depthwise
        yield self.pointwise


class SepConv(Module):
    """Two DilConv blocks without dilation; the first carries the stride."""

    def __init__(self, c_in, c_out, kernel_size, stride, padding, affine=True, rng=None):
        super().__init__()
        self.first = DilConv(c_in, c_in, kernel_size, stride, padding, 1, affine, rng)
        self.second = DilConv(c_in, c_out, kernel_size, 1, padding, 1, affine, rng)

    def forward(self, x):
        return self.second(self.first(x))

    def searched_convs(self) -> Iterator[Module]:
        yield from self.first.searched_convs()
        yield from self.second.searched_convs()


class Zero(Module):
    """The ``none`` operation: zeros of the output shape."""

    def __init__(self, stride):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        s = self.stride
        return Tensor(np.zeros_like(x.data[:, :, ::s, ::s]))


class FactorizedReduce(Module):
    """Halve the resolution with two 1×1 stride-2 convolutions offset by one pixel, concatenated."""

    def __init__(self, c_in, c_out, affine=True, rng=None):
        super().__init__()
        if c_out % 2:
            raise ValueError(f"FactorizedReduce needs an even number of output channels, got {c_out}")
        self.relu = ReLU()
        self.conv_1 = Conv2d(c_in, c_out // 2, 1, stride=2, rng=rng)
        self.conv_2 = Conv2d(c_in, c_out // 2, 1, stride=2, rng=rng)
        self.bn = BatchNorm2d(c_out, affine=affine)

    def forward(self, x):
        x = self.relu(x)
        return self.bn(F.concat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], axis=1))


OpFactory = Callable[[int, int, bool, "np.random.Generator | None"], Module]

OPS: dict[str, OpFactory] = {
    "none": lambda c, stride, affine, rng: Zero(stride),
    "avg_pool_3x3": lambda c, stride, affine, rng: AvgPool2d(3, stride, 1, count_include_pad=False),
    "max_pool_3x3": lambda c, stride, affine, rng: MaxPool2d(3, stride, 1),
    "skip_connect": lambda c, stride, affine, rng: (
        Identity() if stride == 1 else FactorizedReduce(c, c, affine, rng)),
    "sep_conv_3x3": lambda c, stride, affine, rng: SepConv(c, c, 3, stride, 1, affine, rng),
    "sep_conv_5x5": lambda c, stride, affine, rng: SepConv(c, c, 5, stride, 2, affine, rng),
    "dil_conv_3x3": lambda c, stride, affine, rng: DilConv(c, c, 3, stride, 2, 2, affine, rng),
    "dil_conv_5x5": lambda c, stride, affine, rng: DilConv(c, c, 5, stride, 4, 2, affine, rng),
}


def searched_convs(module: Module) -> Iterator[Module]:
    """Every convolution inside a SepConv or DilConv below ``module`` (the 8-bit candidates)."""
    for m in module.modules():
        if isinstance(m, DilConv):
            yield from m.searched_convs()


def set_arithmetic(module: Module, arithmetic) -> None:
    """Make every searched convolution below ``module`` compute with ``arithmetic`` (None = float32)."""
    for conv in searched_convs(module):
        conv.arithmetic = arithmetic
