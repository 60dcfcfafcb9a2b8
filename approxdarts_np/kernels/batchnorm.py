"""2-D batch normalisation (float32, NCHW), statistics per channel over (N, H, W).

Training mode normalises with the batch mean and the *biased* variance and returns
``(y, mean, var, invstd)``: ``var`` is that biased variance, so a layer keeping torch-style
running statistics updates ``running_var`` with the unbiased ``var * n / (n - 1)``,
n = N*H*W, and ``running_mean`` with ``mean``. ``gamma``/``beta`` may be None (affine off).

Accuracy: per-channel sums are accumulated in float64 (mean first, then squared deviations
from it), and the elementwise formulas are evaluated in float64 and rounded once to float32.

Parallelism: ``prange`` over channels. A channel's sums run over a fixed pattern of
``_LANES`` float64 partial sums (elementwise, so they vectorise without reassociating
anything) that are added in lane order at the end: the results are bit-reproducible and do
not depend on the number of threads.
"""
import numpy as np
from numba import njit, prange

__all__ = ["batch_norm_train", "batch_norm_grad", "batch_norm_eval"]

_LANES = 8


# ----------------------------------------------------------------------------- Numba kernels

@njit(cache=True)
def _lane_total(lanes):
    """Sum the partial sums in lane order."""
    total = 0.0
    for i in range(lanes.shape[0]):
        total += lanes[i]
    return total


@njit(cache=True)
def _channel_sum(x3, c, lanes):
    """Return sum over n, i of x3[n, c, i] in float64, with a fixed lane pattern."""
    n_lanes = lanes.shape[0]
    lanes[:] = 0.0
    size = x3.shape[2]
    body = size - size % n_lanes
    for n in range(x3.shape[0]):
        row = x3[n, c]
        for i in range(0, body, n_lanes):
            for k in range(n_lanes):
                lanes[k] += row[i + k]
        for i in range(body, size):
            lanes[i - body] += row[i]
    return _lane_total(lanes)


@njit(cache=True)
def _channel_sq_dev(x3, c, mean, lanes):
    """Return sum over n, i of (x3[n, c, i] - mean)**2 in float64, with a fixed lane pattern."""
    n_lanes = lanes.shape[0]
    lanes[:] = 0.0
    size = x3.shape[2]
    body = size - size % n_lanes
    for n in range(x3.shape[0]):
        row = x3[n, c]
        for i in range(0, body, n_lanes):
            for k in range(n_lanes):
                d = np.float64(row[i + k]) - mean
                lanes[k] += d * d
        for i in range(body, size):
            d = np.float64(row[i]) - mean
            lanes[i - body] += d * d
    return _lane_total(lanes)


@njit(cache=True)
def _channel_grad_sums(gy3, x3, c, mean, lanes_g, lanes_gx):
    """Return (sum gy, sum gy * (x - mean)) over channel c, float64, fixed lane pattern."""
    n_lanes = lanes_g.shape[0]
    lanes_g[:] = 0.0
    lanes_gx[:] = 0.0
    size = x3.shape[2]
    body = size - size % n_lanes
    for n in range(x3.shape[0]):
        g_row = gy3[n, c]
        x_row = x3[n, c]
        for i in range(0, body, n_lanes):
            for k in range(n_lanes):
                g = np.float64(g_row[i + k])
                lanes_g[k] += g
                lanes_gx[k] += g * (np.float64(x_row[i + k]) - mean)
        for i in range(body, size):
            g = np.float64(g_row[i])
            lanes_g[i - body] += g
            lanes_gx[i - body] += g * (np.float64(x_row[i]) - mean)
    return _lane_total(lanes_g), _lane_total(lanes_gx)


@njit(cache=True)
def _channel_affine(x3, y3, c, scale, shift):
    """y3[:, c] = x3[:, c] * scale + shift, evaluated in float64."""
    for n in range(x3.shape[0]):
        x_row = x3[n, c]
        y_row = y3[n, c]
        for i in range(x_row.shape[0]):
            y_row[i] = np.float64(x_row[i]) * scale + shift


@njit(parallel=True, cache=True)
def _batch_norm_train_kernel(x3, gamma, beta, eps, n_lanes):
    """Return (y, mean, var, invstd) for x3 (N, C, HW); gamma/beta float64 (C,)."""
    n_img, n_ch, size = x3.shape
    count = n_img * size
    y = np.empty_like(x3)
    mean_out = np.empty(n_ch, np.float32)
    var_out = np.empty(n_ch, np.float32)
    invstd_out = np.empty(n_ch, np.float32)
    for c in prange(n_ch):
        lanes = np.empty(n_lanes, np.float64)
        mean = _channel_sum(x3, c, lanes) / count
        var = _channel_sq_dev(x3, c, mean, lanes) / count
        invstd = 1.0 / np.sqrt(var + eps)
        scale = invstd * gamma[c]
        _channel_affine(x3, y, c, scale, beta[c] - mean * scale)
        mean_out[c] = mean
        var_out[c] = var
        invstd_out[c] = invstd
    return y, mean_out, var_out, invstd_out


@njit(parallel=True, cache=True)
def _batch_norm_grad_kernel(gy3, x3, mean, invstd, gamma, n_lanes):
    """Return (gx, ggamma, gbeta) for gy3, x3 (N, C, HW); mean/invstd/gamma float64 (C,).

    gx = (gy - sum(gy)/n - (x - mean) * invstd**2 * sum(gy*(x - mean))/n) * invstd * gamma.
    """
    n_img, n_ch, size = x3.shape
    count = n_img * size
    gx = np.empty_like(x3)
    ggamma = np.empty(n_ch, np.float32)
    gbeta = np.empty(n_ch, np.float32)
    for c in prange(n_ch):
        lanes_g = np.empty(n_lanes, np.float64)
        lanes_gx = np.empty(n_lanes, np.float64)
        m = mean[c]
        s = invstd[c]
        sum_g, sum_gx = _channel_grad_sums(gy3, x3, c, m, lanes_g, lanes_gx)
        mean_g = sum_g / count
        proj = sum_gx * s * s / count
        scale = s * gamma[c]
        for n in range(n_img):
            g_row = gy3[n, c]
            x_row = x3[n, c]
            out = gx[n, c]
            for i in range(size):
                out[i] = (np.float64(g_row[i]) - mean_g
                          - (np.float64(x_row[i]) - m) * proj) * scale
        ggamma[c] = sum_gx * s
        gbeta[c] = sum_g
    return gx, ggamma, gbeta


@njit(parallel=True, cache=True)
def _batch_norm_eval_kernel(x3, scale, shift):
    """Return y = x3 * scale[c] + shift[c] for x3 (N, C, HW); scale/shift float64 (C,)."""
    n_ch = x3.shape[1]
    y = np.empty_like(x3)
    for c in prange(n_ch):
        _channel_affine(x3, y, c, scale[c], shift[c])
    return y


# ----------------------------------------------------------------------------- validation

def _check_x(x, name):
    """Validate a float32 4-D array; return it as a C-contiguous (N, C, H*W) view."""
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise ValueError(f"{name} must be float32, got {x.dtype}")
    if x.ndim != 4:
        raise ValueError(f"{name} must be 4-D (N, C, H, W), got shape {x.shape}")
    x = np.ascontiguousarray(x)
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
    y, mean, var, invstd = _batch_norm_train_kernel(x3, g, b, _check_eps(eps), _LANES)
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
    gx, ggamma, gbeta = _batch_norm_grad_kernel(gy3, x3, m, s, g, _LANES)
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
    y = _batch_norm_eval_kernel(x3, scale, b - rm * scale)
    return y.reshape(x.shape)
