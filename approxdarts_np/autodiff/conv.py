"""Convolution, pooling and batch-norm ops over the Numba kernels, one Function each."""
from __future__ import annotations

import threading

import numpy as np

from approxdarts_np.autodiff.functional import mean
from approxdarts_np.autodiff.tensor import DTYPE, Function, Tensor
from approxdarts_np.kernels import batchnorm as kbn
from approxdarts_np.kernels import conv as kconv
from approxdarts_np.kernels import depthwise as kdw
from approxdarts_np.kernels import pool as kpool


class Conv2d(Function):
    """Dense or grouped convolution without bias, ``w`` of shape (Co, Ci/groups, kh, kw)."""

    def forward(self, x, w, stride=1, padding=0, dilation=1, groups=1):
        self.geometry = (stride, padding, dilation, groups)
        self.x = x if self.needs_grad(1) else None
        self.x_shape = x.shape
        self.w = w
        return kconv.conv2d(x, w, stride, padding, dilation, groups)

    def backward(self, g):
        g = np.ascontiguousarray(g)
        gx = (kconv.conv2d_grad_input(g, self.w, self.x_shape, *self.geometry)
              if self.needs_grad(0) else None)
        gw = (kconv.conv2d_grad_weight(g, self.x, self.w.shape, *self.geometry)
              if self.needs_grad(1) else None)
        return gx, gw


class DepthwiseConv2d(Function):
    """Depthwise convolution, ``w`` of shape (C, 1, kh, kw)."""

    def forward(self, x, w, stride=1, padding=0, dilation=1):
        self.geometry = (stride, padding, dilation)
        self.x = x if self.needs_grad(1) else None
        self.x_shape = x.shape
        self.w = w
        return kdw.depthwise_conv2d(x, w, stride, padding, dilation)

    def backward(self, g):
        g = np.ascontiguousarray(g)
        gx = (kdw.depthwise_conv2d_grad_input(g, self.w, self.x_shape, *self.geometry)
              if self.needs_grad(0) else None)
        gw = (kdw.depthwise_conv2d_grad_weight(g, self.x, self.w.shape, *self.geometry)
              if self.needs_grad(1) else None)
        return gx, gw


class MaxPool2d(Function):
    """Max pooling; backward keeps the argmax (the max's index in its input plane) as uint16 when it fits."""

    def forward(self, x, kernel_size=3, stride=1, padding=1):
        y, argmax = kpool.max_pool2d(x, kernel_size, stride, padding)
        if self.needs_grad(0):
            plane = x.shape[2] * x.shape[3]
            self.argmax = argmax.astype(np.uint16) if plane <= 1 << 16 else argmax
        self.x_shape = x.shape
        return y

    def backward(self, g):
        return kpool.max_pool2d_grad(np.ascontiguousarray(g), self.argmax.astype(np.int32, copy=False),
                                     self.x_shape)


class AvgPool2d(Function):
    """Average pooling; padding is left out of the count unless ``count_include_pad``."""

    def forward(self, x, kernel_size=3, stride=1, padding=1, count_include_pad=False):
        self.args = (kernel_size, stride, padding, count_include_pad)
        self.x_shape = x.shape
        return kpool.avg_pool2d(x, kernel_size, stride, padding, count_include_pad)

    def backward(self, g):
        return kpool.avg_pool2d_grad(np.ascontiguousarray(g), self.x_shape, *self.args)


# How batch statistics are summed over the replicas that split a batch (approxdarts_np.runs.replicas),
# per thread: ``reduce``, a function from a float64 array (this replica's sums) to the sum of every
# replica's in a fixed replica order; absent in one process. Set with :func:`sum_batch_statistics_with`.
_BATCH_SUMS = threading.local()


def sum_batch_statistics_with(reduce) -> None:
    """Make batch norm in training mode, in this thread, normalise with statistics summed by ``reduce``
    over every replica of a split batch (None: the batch is this thread's alone)."""
    _BATCH_SUMS.reduce = reduce


class BatchNormTrain(Function):
    """Batch normalisation with the batch's statistics; ``gamma``/``beta`` optional (affine off).

    The batch mean, the biased variance and the number of values per channel are appended to
    ``stats_out`` (when given) so that the layer can update its running averages. When the batch
    is split over replicas (:func:`sum_batch_statistics_with`), the per-channel sums and sums of
    squares of every replica's share are summed before normalising, and so are the gradient's
    sums in backward: every replica computes the step of the whole batch. ``gamma``/``beta``
    then get this share's part of their gradient (the replicas sum those with the others).
    """

    def forward(self, x, *affine, eps=1e-5, stats_out=None):
        gamma, beta = affine if affine else (None, None)
        reduce = getattr(_BATCH_SUMS, "reduce", None)
        self.collective = reduce is not None  # its backward exchanges sums too (see Tensor.backward)
        count = x.shape[0] * x.shape[2] * x.shape[3]
        if reduce is None:
            y, mean, var, invstd = kbn.batch_norm_train(x, gamma, beta, eps)
        else:
            total = reduce(np.append(kbn.batch_moments(x).ravel(), float(count)))
            count = total[-1]
            sums = total[:-1].reshape(-1, 2)
            mean64 = sums[:, 0] / count
            var64 = np.maximum(sums[:, 1] / count - mean64 * mean64, 0.0)
            y = kbn.batch_norm_eval(x, mean64, var64, gamma, beta, eps)
            mean, var = mean64.astype(DTYPE), var64.astype(DTYPE)
            invstd = (1.0 / np.sqrt(var64 + eps)).astype(DTYPE)
        self.x, self.mean, self.invstd, self.gamma, self.count = x, mean, invstd, gamma, count
        if stats_out is not None:
            stats_out.append((mean, var, count))
        return y

    def backward(self, g):
        g = np.ascontiguousarray(g)
        if not self.collective:
            gx, ggamma, gbeta = kbn.batch_norm_grad(g, self.x, self.mean, self.invstd, self.gamma)
        else:
            reduce = getattr(_BATCH_SUMS, "reduce", None)  # this thread's: backward may run in another
            if reduce is None:
                raise RuntimeError("the backward of a batch split over replicas ran outside them")
            local = kbn.batch_grad_sums(g, self.x, self.mean)
            total = reduce(local.ravel()).reshape(local.shape)
            gx = kbn.batch_norm_grad_from_sums(g, self.x, self.mean, self.invstd, self.gamma, total, self.count)
            ggamma = (local[:, 1] * self.invstd).astype(DTYPE)
            gbeta = local[:, 0].astype(DTYPE)
        if self.gamma is None:
            return gx
        return (gx, ggamma if self.needs_grad(1) else None, gbeta if self.needs_grad(2) else None)


class BatchNormEval(Function):
    """Batch normalisation with fixed running statistics."""

    def forward(self, x, *affine, running_mean=None, running_var=None, eps=1e-5):
        gamma, beta = affine if affine else (None, None)
        self.x = x
        self.scale = (1.0 / np.sqrt(running_var.astype(np.float64) + eps)).astype(DTYPE)
        self.gamma = gamma
        self.mean = running_mean
        return kbn.batch_norm_eval(x, running_mean, running_var, gamma, beta, eps)

    def backward(self, g):
        scale = self.scale if self.gamma is None else self.scale * self.gamma
        gx = (g * scale[None, :, None, None]).astype(DTYPE)
        if self.gamma is None:
            return gx
        xhat = (self.x - self.mean[None, :, None, None]) * self.scale[None, :, None, None]
        ggamma = (g * xhat).sum(axis=(0, 2, 3), dtype=DTYPE)
        gbeta = g.sum(axis=(0, 2, 3), dtype=DTYPE)
        return gx, ggamma, gbeta


# ------------------------------------------------------------------ public functions


def conv2d(x, w, stride=1, padding=0, dilation=1, groups=1) -> Tensor:
    return Conv2d.apply(x, w, stride=stride, padding=padding, dilation=dilation, groups=groups)


def depthwise_conv2d(x, w, stride=1, padding=0, dilation=1) -> Tensor:
    return DepthwiseConv2d.apply(x, w, stride=stride, padding=padding, dilation=dilation)


def max_pool2d(x, kernel_size=3, stride=1, padding=1) -> Tensor:
    return MaxPool2d.apply(x, kernel_size=kernel_size, stride=stride, padding=padding)


def avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False) -> Tensor:
    return AvgPool2d.apply(x, kernel_size=kernel_size, stride=stride, padding=padding,
                           count_include_pad=count_include_pad)


def global_avg_pool2d(x) -> Tensor:
    """Mean over the spatial axes, keeping (N, C)."""
    return mean(x, axis=(2, 3))
