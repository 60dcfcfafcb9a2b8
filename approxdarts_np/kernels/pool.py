"""Max and average 2-D pooling (float32, NCHW): forward and gradient.

Padding is symmetric; max pooling treats padded positions as -inf (they never win) and
average pooling leaves them out of the divisor unless ``count_include_pad`` (torch semantics,
no ceil mode). ``kernel_size``, ``stride`` and ``padding`` are an int or an (h, w) pair;
padding may be at most half the kernel, so every window holds at least one input pixel.

Parallelism: ``prange`` over (image, channel) planes. Each plane of the output -- and, for
the gradients, of the input gradient -- is written by one thread in a fixed order, so
overlapping windows accumulate deterministically and results are bit-reproducible.
"""
import numpy as np
from numba import njit, prange

from ._util import as_pair, conv_output_size

__all__ = ["max_pool2d", "max_pool2d_grad", "avg_pool2d", "avg_pool2d_grad"]


# ----------------------------------------------------------------------------- Numba kernels

@njit(parallel=True, cache=True)
def _max_pool2d_kernel(x3, k_h, k_w, s_h, s_w, p_h, p_w, out_h, out_w):
    """Return (y, argmax) over planes x3 (P, H, W); argmax is the flat index ih*W + iw.

    Ties keep the first maximum in row-major window order; a NaN wins and the last NaN is
    kept (as torch's CPU kernel does).
    """
    n_planes, h, wd = x3.shape
    y = np.empty((n_planes, out_h, out_w), np.float32)
    arg = np.empty((n_planes, out_h, out_w), np.int32)
    for p in prange(n_planes):
        plane = x3[p]
        for oh in range(out_h):
            ih0 = max(oh * s_h - p_h, 0)
            ih1 = min(oh * s_h - p_h + k_h, h)
            for ow in range(out_w):
                iw0 = max(ow * s_w - p_w, 0)
                iw1 = min(ow * s_w - p_w + k_w, wd)
                best = -np.inf
                best_idx = ih0 * wd + iw0
                for ih in range(ih0, ih1):
                    row = plane[ih]
                    for iw in range(iw0, iw1):
                        v = row[iw]
                        if v > best or np.isnan(v):
                            best = v
                            best_idx = ih * wd + iw
                y[p, oh, ow] = best
                arg[p, oh, ow] = best_idx
    return y, arg


@njit(parallel=True, cache=True)
def _max_pool2d_grad_kernel(gy3, arg3, h, wd):
    """Return gx (P, H, W) with gx[p].flat[arg3[p, o]] += gy3[p, o], outputs in row-major order."""
    n_planes, out_h, out_w = gy3.shape
    gx = np.zeros((n_planes, h * wd), np.float32)
    for p in prange(n_planes):
        dst = gx[p]
        g = gy3[p]
        a = arg3[p]
        for oh in range(out_h):
            for ow in range(out_w):
                dst[a[oh, ow]] += g[oh, ow]
    return gx.reshape(n_planes, h, wd)


@njit(parallel=True, cache=True)
def _avg_pool2d_kernel(x3, k_h, k_w, s_h, s_w, p_h, p_w, out_h, out_w, count_include_pad):
    """Return y (P, OH, OW): window sums in row-major order divided by the window count."""
    n_planes, h, wd = x3.shape
    y = np.empty((n_planes, out_h, out_w), np.float32)
    full = np.float32(k_h * k_w)
    for p in prange(n_planes):
        plane = x3[p]
        for oh in range(out_h):
            ih0 = max(oh * s_h - p_h, 0)
            ih1 = min(oh * s_h - p_h + k_h, h)
            for ow in range(out_w):
                iw0 = max(ow * s_w - p_w, 0)
                iw1 = min(ow * s_w - p_w + k_w, wd)
                acc = np.float32(0.0)
                for ih in range(ih0, ih1):
                    row = plane[ih]
                    for iw in range(iw0, iw1):
                        acc += row[iw]
                if count_include_pad:
                    y[p, oh, ow] = acc / full
                else:
                    y[p, oh, ow] = acc / np.float32((ih1 - ih0) * (iw1 - iw0))
    return y


@njit(parallel=True, cache=True)
def _avg_pool2d_grad_kernel(gy3, h, wd, k_h, k_w, s_h, s_w, p_h, p_w, count_include_pad):
    """Return gx (P, H, W): each gy / count spread over its window, outputs in row-major order."""
    n_planes, out_h, out_w = gy3.shape
    gx = np.zeros((n_planes, h, wd), np.float32)
    full = np.float32(k_h * k_w)
    for p in prange(n_planes):
        dst = gx[p]
        g = gy3[p]
        for oh in range(out_h):
            ih0 = max(oh * s_h - p_h, 0)
            ih1 = min(oh * s_h - p_h + k_h, h)
            for ow in range(out_w):
                iw0 = max(ow * s_w - p_w, 0)
                iw1 = min(ow * s_w - p_w + k_w, wd)
                if count_include_pad:
                    share = g[oh, ow] / full
                else:
                    share = g[oh, ow] / np.float32((ih1 - ih0) * (iw1 - iw0))
                for ih in range(ih0, ih1):
                    row = dst[ih]
                    for iw in range(iw0, iw1):
                        row[iw] += share
    return gx


# ----------------------------------------------------------------------------- validation

def _geometry(kernel_size, stride, padding):
    k_h, k_w = as_pair(kernel_size, "kernel_size")
    s_h, s_w = as_pair(stride, "stride")
    p_h, p_w = as_pair(padding, "padding")
    if k_h < 1 or k_w < 1:
        raise ValueError(f"kernel_size must be >= 1, got {(k_h, k_w)}")
    if s_h < 1 or s_w < 1:
        raise ValueError(f"stride must be >= 1, got {(s_h, s_w)}")
    if p_h < 0 or p_w < 0 or 2 * p_h > k_h or 2 * p_w > k_w:
        raise ValueError(
            f"padding must be between 0 and half the kernel size {(k_h, k_w)}, got {(p_h, p_w)}")
    return k_h, k_w, s_h, s_w, p_h, p_w


def _check_float32_4d(a, name):
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype != np.float32:
        raise ValueError(f"{name} must be float32, got {a.dtype}")
    if a.ndim != 4:
        raise ValueError(f"{name} must be 4-D, got shape {a.shape}")
    return np.ascontiguousarray(a)


def _check_shape(shape, name):
    try:
        dims = tuple(int(d) for d in shape)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of 4 ints, got {shape!r}") from None
    if len(dims) != 4 or any(d < 1 for d in dims):
        raise ValueError(f"{name} must be 4 positive ints, got {shape!r}")
    return dims


def _output_hw(h, wd, geom):
    k_h, k_w, s_h, s_w, p_h, p_w = geom
    out_h = conv_output_size(h, k_h, s_h, p_h, 1)
    out_w = conv_output_size(wd, k_w, s_w, p_w, 1)
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"empty output: input {h}x{wd}, kernel {k_h}x{k_w}, stride {(s_h, s_w)}, "
            f"padding {(p_h, p_w)} give {out_h}x{out_w}")
    return out_h, out_w


def _check_grad(gy, input_shape, geom):
    """Validate gy against input_shape; return (gy, (N, C, H, W))."""
    gy = _check_float32_4d(gy, "gy")
    n_img, n_ch, h, wd = _check_shape(input_shape, "input_shape")
    out_h, out_w = _output_hw(h, wd, geom)
    if gy.shape != (n_img, n_ch, out_h, out_w):
        raise ValueError(
            f"gy must have shape {(n_img, n_ch, out_h, out_w)} for input_shape "
            f"{(n_img, n_ch, h, wd)}, got {gy.shape}")
    return gy, (n_img, n_ch, h, wd)


# ----------------------------------------------------------------------------- public API

def max_pool2d(x, kernel_size=3, stride=1, padding=1):
    """Return (y, argmax): the window maxima of x (N, C, H, W) and where each was found.

    ``argmax`` (int32, shape of y) is the flat index ih*W + iw of the maximum within its
    input plane; :func:`max_pool2d_grad` routes gradients through it.
    """
    geom = _geometry(kernel_size, stride, padding)
    x = _check_float32_4d(x, "x")
    n_img, n_ch, h, wd = x.shape
    out_h, out_w = _output_hw(h, wd, geom)
    y, arg = _max_pool2d_kernel(x.reshape(n_img * n_ch, h, wd), *geom, out_h, out_w)
    return y.reshape(n_img, n_ch, out_h, out_w), arg.reshape(n_img, n_ch, out_h, out_w)


def max_pool2d_grad(gy, argmax, input_shape):
    """Return dL/dx (``input_shape``) of :func:`max_pool2d` given dL/dy and its ``argmax``.

    Where windows overlap, a pixel receives the sum of the gradients of every window it won.
    """
    gy = _check_float32_4d(gy, "gy")
    n_img, n_ch, h, wd = _check_shape(input_shape, "input_shape")
    if not isinstance(argmax, np.ndarray) or argmax.dtype != np.int32:
        raise ValueError("argmax must be the int32 array returned by max_pool2d")
    if argmax.shape != gy.shape or gy.shape[:2] != (n_img, n_ch):
        raise ValueError(
            f"gy {gy.shape} and argmax {argmax.shape} must have the same shape, with "
            f"(N, C) = {(n_img, n_ch)} from input_shape")
    if argmax.size and (argmax.min() < 0 or argmax.max() >= h * wd):
        raise ValueError(f"argmax holds indices outside the {h}x{wd} input plane")
    out_h, out_w = gy.shape[2:]
    gx = _max_pool2d_grad_kernel(gy.reshape(n_img * n_ch, out_h, out_w),
                                 np.ascontiguousarray(argmax).reshape(n_img * n_ch, out_h, out_w),
                                 h, wd)
    return gx.reshape(n_img, n_ch, h, wd)


def avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False):
    """Return the window means of x (N, C, H, W).

    The divisor is the number of input pixels in the window, or the full kernel area when
    ``count_include_pad`` is true.
    """
    geom = _geometry(kernel_size, stride, padding)
    x = _check_float32_4d(x, "x")
    n_img, n_ch, h, wd = x.shape
    out_h, out_w = _output_hw(h, wd, geom)
    y = _avg_pool2d_kernel(x.reshape(n_img * n_ch, h, wd), *geom, out_h, out_w,
                           bool(count_include_pad))
    return y.reshape(n_img, n_ch, out_h, out_w)


def avg_pool2d_grad(gy, input_shape, kernel_size=3, stride=1, padding=1,
                    count_include_pad=False):
    """Return dL/dx (``input_shape``) of :func:`avg_pool2d` given dL/dy ``gy``."""
    geom = _geometry(kernel_size, stride, padding)
    gy, (n_img, n_ch, h, wd) = _check_grad(gy, input_shape, geom)
    out_h, out_w = gy.shape[2:]
    gx = _avg_pool2d_grad_kernel(gy.reshape(n_img * n_ch, out_h, out_w), h, wd, *geom,
                                 bool(count_include_pad))
    return gx.reshape(n_img, n_ch, h, wd)
