"""2-D batch normalisation (float32, NCHW), statistics per channel over (N, H, W).

Training mode normalises with the batch mean and the *biased* variance and returns
``(y, mean, var, invstd)``: ``var`` is that biased variance, so a layer keeping torch-style
running statistics updates ``running_var`` with the unbiased ``var * n / (n - 1)``,
n = N*H*W, and ``running_mean`` with ``mean``. ``gamma``/``beta`` may be None (affine off).

Accuracy: per-channel sums are accumulated in float64 (mean first, then squared deviations
from it; for the gradient sum(gy) and sum(gy * (x - mean))). The forward and eval outputs are
evaluated in float64 and rounded once to float32; the gradient's elementwise pass runs in
float32 with coefficients rounded from the float64 sums, as torch's does.

Parallelism: ``prange`` over channels. A channel's sums run over a fixed pattern of
``_LANES`` float64 partial sums (elementwise, so they vectorise without reassociating
anything) that are added in lane order at the end: the results are bit-reproducible and do
not depend on the number of threads.
"""
import numpy as np
from numba import njit, prange

from ._util import check_float32_4d, pick_kernel, serial_twin
from ._util import unsigned as _u

__all__ = ["batch_norm_train", "batch_norm_grad", "batch_norm_eval", "batch_moments", "batch_grad_sums",
           "batch_norm_grad_from_sums"]

# Partial sums per channel: lane k accumulates elements k, k + _LANES, ... of each image's
# plane (64 lanes ran faster than 8; more gave nothing).
_LANES = 64


# ----------------------------------------------------------------------------- Numba kernels

@njit(cache=True)
def _lane_total(lanes):
    """Sum the partial sums in lane order."""
    total = 0.0
    for i in range(lanes.shape[0]):
        total += lanes[i]
    return total


@njit(cache=True)
def _channel_sum(xf, shape, c, mean, square, lanes):
    """Return the float64 sum over channel c of the flat (N, C, HW) array ``xf`` of (x - mean), or
    with ``square`` of (x - mean)**2, in fixed lanes (mean 0 gives the sum of x or of x**2)."""
    n_img, n_ch, size = shape
    n_lanes = lanes.shape[0]
    body = size - size % n_lanes
    lanes[:] = 0.0
    for n in range(n_img):
        base = (n * n_ch + c) * size
        for i in range(base, base + body, n_lanes):
            for k in range(n_lanes):
                d = np.float64(xf[_u(i + k)]) - mean
                lanes[_u(k)] += d * d if square else d
        for i in range(body, size):
            d = np.float64(xf[_u(base + i)]) - mean
            lanes[_u(i - body)] += d * d if square else d
    return _lane_total(lanes)


@njit(cache=True)
def _channel_grad_sums(gf, xf, shape, c, mean, lanes_g, lanes_gx):
    """Return float64 (sum gy, sum gy * (x - mean)) over channel c, fixed lanes."""
    n_img, n_ch, size = shape
    n_lanes = lanes_g.shape[0]
    body = size - size % n_lanes
    lanes_g[:] = 0.0
    lanes_gx[:] = 0.0
    for n in range(n_img):
        base = (n * n_ch + c) * size
        for i in range(base, base + body, n_lanes):
            for k in range(n_lanes):
                g = np.float64(gf[_u(i + k)])
                lanes_g[_u(k)] += g
                lanes_gx[_u(k)] += g * (np.float64(xf[_u(i + k)]) - mean)
        for i in range(body, size):
            g = np.float64(gf[_u(base + i)])
            lanes_g[_u(i - body)] += g
            lanes_gx[_u(i - body)] += g * (np.float64(xf[_u(base + i)]) - mean)
    return _lane_total(lanes_g), _lane_total(lanes_gx)


@njit(cache=True)
def _channel_grad_apply(gf, xf, of, shape, c, sum_g, sum_gx, count, m, s, gamma_c):
    """Channel c of ``of`` = (gy - sum_g/n - (x - m) * s**2 * sum_gx/n) * s * gamma_c, n = ``count``.

    The coefficients come from the float64 sums, rounded once; the elementwise pass runs in
    float32 (as torch's does), faster than in float64.
    """
    n_img, n_ch, size = shape
    mean_g = np.float32(sum_g / count)
    proj = np.float32(sum_gx * s * s / count)
    scale = np.float32(s * gamma_c)
    m32 = np.float32(m)
    for n in range(n_img):
        base = (n * n_ch + c) * size
        for i in range(base, base + size):
            of[_u(i)] = (gf[_u(i)] - mean_g - (xf[_u(i)] - m32) * proj) * scale


@njit(cache=True)
def _channel_affine(xf, yf, shape, c, scale, shift):
    """Channel c of ``yf`` = x * scale + shift, evaluated in float64."""
    n_img, n_ch, size = shape
    for n in range(n_img):
        base = (n * n_ch + c) * size
        for i in range(base, base + size):
            yf[_u(i)] = np.float64(xf[_u(i)]) * scale + shift


@njit(cache=True)
def _channels(x3):
    """(shape (N, C, HW), values per channel N*HW, x3 flat) of a C-contiguous (N, C, HW) array."""
    return x3.shape, x3.shape[0] * x3.shape[2], x3.reshape(x3.size)


@njit(parallel=True, cache=True)
def _batch_norm_train_kernel(x3, gamma, beta, eps, n_lanes):
    """Return (y, mean, var, invstd) for x3 (N, C, HW); gamma/beta float64 (C,)."""
    shape, count, xf = _channels(x3)
    n_ch = shape[1]
    y = np.empty_like(x3)
    yf = y.reshape(y.size)
    mean_out = np.empty(n_ch, np.float32)
    var_out = np.empty(n_ch, np.float32)
    invstd_out = np.empty(n_ch, np.float32)
    for c in prange(n_ch):
        lanes = np.empty(n_lanes, np.float64)
        mean = _channel_sum(xf, shape, c, 0.0, False, lanes) / count
        var = _channel_sum(xf, shape, c, mean, True, lanes) / count
        invstd = 1.0 / np.sqrt(var + eps)
        scale = invstd * gamma[c]
        _channel_affine(xf, yf, shape, c, scale, beta[c] - mean * scale)
        mean_out[c] = mean
        var_out[c] = var
        invstd_out[c] = invstd
    return y, mean_out, var_out, invstd_out


@njit(parallel=True, cache=True)
def _batch_norm_grad_kernel(gy3, x3, mean, invstd, gamma, n_lanes):
    """Return (gx, ggamma, gbeta) for gy3, x3 (N, C, HW); mean/invstd/gamma float64 (C,).

    gx = (gy - sum(gy)/n - (x - mean) * invstd**2 * sum(gy*(x - mean))/n) * invstd * gamma.
    """
    shape, count, xf = _channels(x3)
    n_ch = shape[1]
    gx = np.empty_like(x3)
    gf = gy3.reshape(gy3.size)
    of = gx.reshape(gx.size)
    ggamma = np.empty(n_ch, np.float32)
    gbeta = np.empty(n_ch, np.float32)
    for c in prange(n_ch):
        lanes_g = np.empty(n_lanes, np.float64)
        lanes_gx = np.empty(n_lanes, np.float64)
        sum_g, sum_gx = _channel_grad_sums(gf, xf, shape, c, mean[c], lanes_g, lanes_gx)
        _channel_grad_apply(gf, xf, of, shape, c, sum_g, sum_gx, count, mean[c], invstd[c], gamma[c])
        ggamma[c] = sum_gx * invstd[c]
        gbeta[c] = sum_g
    return gx, ggamma, gbeta


@njit(parallel=True, cache=True)
def _batch_norm_eval_kernel(x3, scale, shift):
    """Return y = x3 * scale[c] + shift[c] for x3 (N, C, HW); scale/shift float64 (C,)."""
    n_ch = x3.shape[1]
    shape = x3.shape
    y = np.empty_like(x3)
    xf = x3.reshape(x3.size)
    yf = y.reshape(y.size)
    for c in prange(n_ch):
        _channel_affine(xf, yf, shape, c, scale[c], shift[c])
    return y


# Kernels of a batch split over replicas (approxdarts_np.runs.replicas): the per-channel sums of
# each replica's share are summed over the replicas between the two passes.

@njit(parallel=True, cache=True)
def _moments_kernel(x3, n_lanes):
    """(C, 2) float64: per channel, sum(x) and sum(x**2), fixed lanes."""
    shape, _, xf = _channels(x3)
    out = np.empty((shape[1], 2), np.float64)
    for c in prange(shape[1]):
        lanes = np.empty(n_lanes, np.float64)
        out[c, 0] = _channel_sum(xf, shape, c, 0.0, False, lanes)
        out[c, 1] = _channel_sum(xf, shape, c, 0.0, True, lanes)
    return out


@njit(parallel=True, cache=True)
def _grad_sums_kernel(gy3, x3, mean, n_lanes):
    """(C, 2) float64: per channel, sum(gy) and sum(gy * (x - mean)), fixed lanes."""
    shape, _, xf = _channels(x3)
    gf = gy3.reshape(gy3.size)
    out = np.empty((shape[1], 2), np.float64)
    for c in prange(shape[1]):
        lanes_g = np.empty(n_lanes, np.float64)
        lanes_gx = np.empty(n_lanes, np.float64)
        out[c, 0], out[c, 1] = _channel_grad_sums(gf, xf, shape, c, mean[c], lanes_g, lanes_gx)
    return out


@njit(parallel=True, cache=True)
def _grad_from_sums_kernel(gy3, x3, mean, invstd, gamma, sums, count):
    """gx of :func:`_batch_norm_grad_kernel` from given (C, 2) sums over ``count`` values."""
    shape = x3.shape
    gx = np.empty_like(x3)
    for c in prange(shape[1]):
        _channel_grad_apply(gy3.reshape(gy3.size), x3.reshape(x3.size), gx.reshape(gx.size), shape, c,
                            sums[c, 0], sums[c, 1], count, mean[c], invstd[c], gamma[c])
    return gx


# Serial twins of the parallel kernels, for calls too small to wake the thread team
# (kernels._util.SERIAL_BELOW).
_batch_norm_train_kernel_serial = serial_twin(_batch_norm_train_kernel)
_batch_norm_grad_kernel_serial = serial_twin(_batch_norm_grad_kernel)
_batch_norm_eval_kernel_serial = serial_twin(_batch_norm_eval_kernel)
_moments_kernel_serial = serial_twin(_moments_kernel)
_grad_sums_kernel_serial = serial_twin(_grad_sums_kernel)
_grad_from_sums_kernel_serial = serial_twin(_grad_from_sums_kernel)


# ----------------------------------------------------------------------------- validation

def _check_x(x, name):
    """Validate a float32 4-D array; return it as a C-contiguous (N, C, H*W) view."""
    x = check_float32_4d(x, name)
    return x.reshape(x.shape[0], x.shape[1], -1)


def _channel_vector(v, n_ch, name):
    """Validate a per-channel floating vector (C,); return it as float64."""
    if not isinstance(v, np.ndarray) or not np.issubdtype(v.dtype, np.floating):
        raise ValueError(f"{name} must be a floating numpy array of shape ({n_ch},)")
    if v.shape != (n_ch,):
        raise ValueError(f"{name} must have shape ({n_ch},), got {v.shape}")
    return v.astype(np.float64)


def _affine(gamma, beta, n_ch):
    """Return float64 (gamma, beta), ones and zeros when both are None (affine off)."""
    if (gamma is None) != (beta is None):
        raise ValueError("gamma and beta must both be given or both be None")
    if gamma is None:
        return np.ones(n_ch), np.zeros(n_ch)
    return _channel_vector(gamma, n_ch, "gamma"), _channel_vector(beta, n_ch, "beta")


def _check_eps(eps):
    eps = float(eps)
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return eps


# ----------------------------------------------------------------------------- public API

def batch_norm_train(x, gamma, beta, eps=1e-5):
    """Return (y, mean, var, invstd): x (N, C, H, W) normalised with its own batch statistics.

    y = (x - mean) * invstd * gamma + beta, invstd = 1 / sqrt(var + eps). ``mean``, ``var``
    (biased: divided by n = N*H*W) and ``invstd`` are float32 (C,). For a torch-style running
    variance use the unbiased ``var * n / (n - 1)``. Needs n > 1, as torch does.
    """
    x3 = _check_x(x, "x")
    n_img, n_ch, size = x3.shape
    if n_img * size < 2:
        raise ValueError(
            f"batch norm in training mode needs more than one value per channel, got input "
            f"shape {x.shape}")
    g, b = _affine(gamma, beta, n_ch)
    kernel, _ = pick_kernel(_batch_norm_train_kernel, _batch_norm_train_kernel_serial, x3.size)
    y, mean, var, invstd = kernel(x3, g, b, _check_eps(eps), _LANES)
    return y.reshape(x.shape), mean, var, invstd


def batch_norm_grad(gy, x, mean, invstd, gamma):
    """Return (gx, ggamma, gbeta), the gradients of :func:`batch_norm_train` given dL/dy ``gy``.

    ``mean`` and ``invstd`` are the values batch_norm_train returned for x. With ``gamma``
    None (affine off) ``ggamma`` and ``gbeta`` are None.
    """
    x3 = _check_x(x, "x")
    gy3 = _check_x(gy, "gy")
    if gy3.shape != x3.shape or gy.shape != x.shape:
        raise ValueError(f"gy must have the shape of x {x.shape}, got {gy.shape}")
    n_ch = x3.shape[1]
    m = _channel_vector(mean, n_ch, "mean")
    s = _channel_vector(invstd, n_ch, "invstd")
    g = np.ones(n_ch) if gamma is None else _channel_vector(gamma, n_ch, "gamma")
    kernel, _ = pick_kernel(_batch_norm_grad_kernel, _batch_norm_grad_kernel_serial, x3.size)
    gx, ggamma, gbeta = kernel(gy3, x3, m, s, g, _LANES)
    if gamma is None:
        return gx.reshape(x.shape), None, None
    return gx.reshape(x.shape), ggamma, gbeta


def batch_norm_eval(x, running_mean, running_var, gamma, beta, eps=1e-5):
    """Return y = (x - running_mean) / sqrt(running_var + eps) * gamma + beta, per channel.

    The running statistics may be float32 or float64; ``gamma``/``beta`` may be None.
    """
    x3 = _check_x(x, "x")
    n_ch = x3.shape[1]
    rm = _channel_vector(running_mean, n_ch, "running_mean")
    rv = _channel_vector(running_var, n_ch, "running_var")
    if np.any(rv < 0):
        raise ValueError("running_var must be >= 0")
    g, b = _affine(gamma, beta, n_ch)
    scale = g / np.sqrt(rv + _check_eps(eps))
    kernel, _ = pick_kernel(_batch_norm_eval_kernel, _batch_norm_eval_kernel_serial, x3.size)
    y = kernel(x3, scale, b - rm * scale)
    return y.reshape(x.shape)


def batch_moments(x):
    """(C, 2) float64: per channel of x (N, C, H, W), the sum and the sum of squares over (N, H, W).

    A replica's share of a split batch: summed over the replicas, they give the batch's mean and
    biased variance (sum_sq / n - mean**2), which :func:`batch_norm_eval` then applies.
    """
    x3 = _check_x(x, "x")
    kernel, _ = pick_kernel(_moments_kernel, _moments_kernel_serial, x3.size)
    return kernel(x3, _LANES)


def batch_grad_sums(gy, x, mean):
    """(C, 2) float64: per channel, sum(gy) and sum(gy * (x - mean)) over (N, H, W); the sums that
    :func:`batch_norm_grad` takes over the whole batch, here over one replica's share."""
    x3 = _check_x(x, "x")
    gy3 = _check_x(gy, "gy")
    if gy.shape != x.shape:
        raise ValueError(f"gy must have the shape of x {x.shape}, got {gy.shape}")
    m = _channel_vector(mean, x3.shape[1], "mean")
    kernel, _ = pick_kernel(_grad_sums_kernel, _grad_sums_kernel_serial, x3.size)
    return kernel(gy3, x3, m, _LANES)


def batch_norm_grad_from_sums(gy, x, mean, invstd, gamma, sums, count):
    """dL/dx of batch normalisation whose batch statistics and gradient sums span ``count`` values,
    of which ``x`` and ``gy`` are a share: ``sums`` (C, 2) float64 are :func:`batch_grad_sums`
    summed over every share. With ``count`` = n and the share's own sums it equals the ``gx`` of
    :func:`batch_norm_grad` bit for bit."""
    x3 = _check_x(x, "x")
    gy3 = _check_x(gy, "gy")
    if gy.shape != x.shape:
        raise ValueError(f"gy must have the shape of x {x.shape}, got {gy.shape}")
    n_ch = x3.shape[1]
    sums = np.asarray(sums, dtype=np.float64)
    if sums.shape != (n_ch, 2):
        raise ValueError(f"sums must have shape ({n_ch}, 2), got {sums.shape}")
    if not count >= x3.shape[0] * x3.shape[2]:
        raise ValueError(f"count must be at least the share's {x3.shape[0] * x3.shape[2]} values, got {count}")
    m = _channel_vector(mean, n_ch, "mean")
    s = _channel_vector(invstd, n_ch, "invstd")
    g = np.ones(n_ch) if gamma is None else _channel_vector(gamma, n_ch, "gamma")
    kernel, _ = pick_kernel(_grad_from_sums_kernel, _grad_from_sums_kernel_serial, x3.size)
    return kernel(gy3, x3, m, s, g, np.ascontiguousarray(sums), float(count)).reshape(x.shape)
