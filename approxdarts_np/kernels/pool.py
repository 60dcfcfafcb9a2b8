"""Max and average 2-D pooling (float32, NCHW): forward and gradient.

Padding is symmetric; max pooling treats padded positions as -inf (they never win) and
average pooling leaves them out of the divisor unless ``count_include_pad`` (torch semantics,
no ceil mode). ``kernel_size``, ``stride`` and ``padding`` are an int or an (h, w) pair;
padding may be at most half the kernel, so every window holds at least one input pixel.

How the forward kernels are laid out: each (image, channel) plane is copied into a scratch
buffer holding its padded version (border -inf for max, 0 for average) as s_h * s_w *phase
planes* (phase (a, b) holds padded rows a, a+s_h, ... and columns b, b+s_w, ...). Every window
tap (i, j) then reads one contiguous run per output row, and the loops over an output row
vectorise. Windows are scanned in row-major tap order, so results match a plain window loop
bit for bit. The average-pool gradient adds its shares into such a buffer and reads the
interior back. 3x3 windows (the DARTS pools) run on the depthwise kernels' stacked work items
instead (a channel's planes of several images in one buffer, one loop per tap over all of
them; :func:`_pool3x3_stacked_kernel`), with the same taps in the same order.

Parallelism: ``prange`` over contiguous blocks of (image, channel) planes, one scratch buffer
per block. Each plane of the output -- and, for the gradients, of the input gradient -- is
written by one thread in a fixed order, so overlapping windows accumulate deterministically and
results are bit-reproducible and independent of the thread count.
"""
import numpy as np
from numba import njit, prange

from ._util import (block_bounds, check_float32_4d, check_shape4, conv_output_hw, pair_at_least,
                    pick_kernel, serial_twin)
from ._util import unsigned as _u
from .depthwise import _item_blocks, _item_images, _stack_geometry, _stack_phases, _stack_size

__all__ = ["max_pool2d", "max_pool2d_grad", "avg_pool2d", "avg_pool2d_grad"]


# ----------------------------------------------------------------------------- Numba kernels

@njit(cache=True)
def _plane_phases(plane, buf, p_h, p_w, s_h, s_w, hq, wq, to_buf):
    """Write ``plane`` into the interior of the phase layout of its padded version (``to_buf``), or
    read that interior back into ``plane``.

    Padded pixel (r, c) lives in phase (r % s_h, c % s_w) at (r // s_h, c // s_w); each phase
    is an hq x wq block of the flat ``buf``. The border keeps whatever value it was given.
    """
    h, wd = plane.shape
    pf = plane.reshape(h * wd)
    for r in range(h):
        rp = r + p_h
        for b in range(s_w):
            c0 = (b - p_w) % s_w
            if c0 >= wd:
                continue
            count = (wd - c0 + s_w - 1) // s_w
            at = (((rp % s_h) * s_w + b) * hq + rp // s_h) * wq + (c0 + p_w) // s_w
            src = r * wd + c0
            if to_buf:
                for k in range(count):
                    buf[_u(at + k)] = pf[_u(src + k * s_w)]
            else:
                for k in range(count):
                    pf[_u(src + k * s_w)] = buf[_u(at + k)]


@njit(cache=True, inline="always")
def _tap_offset(oh, i, j, s_h, s_w, hq, wq):
    """Flat offset in the phase buffer of tap (i, j) of output row oh at ow = 0."""
    return ((((i % s_h) * s_w + j % s_w) * hq + oh + i // s_h) * wq + j // s_w)


# The 3x3 stride-1 average-pool gradient sums all nine taps per element in registers, one
# pass over a row (:func:`_sum3x3_row`); the 3x3 forward pools run on stacked planes
# (:func:`_pool3x3_stacked_kernel`, below).

@njit(cache=True, inline="always")
def _take(v, best, arg, cand):
    """The running maximum after tap value v at flat index cand (greater or NaN wins)."""
    take = (v > best) | (v != v)
    return (v if take else best), (cand if take else arg)


@njit(cache=True, inline="always")
def _taps3x3(oh, s_h, s_w, hq, wq):
    """The nine buffer offsets of output row oh's 3x3 taps at ow = 0, row-major order."""
    return (_tap_offset(oh, 0, 0, s_h, s_w, hq, wq), _tap_offset(oh, 0, 1, s_h, s_w, hq, wq),
            _tap_offset(oh, 0, 2, s_h, s_w, hq, wq), _tap_offset(oh, 1, 0, s_h, s_w, hq, wq),
            _tap_offset(oh, 1, 1, s_h, s_w, hq, wq), _tap_offset(oh, 1, 2, s_h, s_w, hq, wq),
            _tap_offset(oh, 2, 0, s_h, s_w, hq, wq), _tap_offset(oh, 2, 1, s_h, s_w, hq, wq),
            _tap_offset(oh, 2, 2, s_h, s_w, hq, wq))


@njit(cache=True)
def _sum3x3_row(buf, yf, o0, out_w, oh, s_h, s_w, hq, wq):
    """Window sums of output row oh of a 3x3 pool, taps in row-major order from 0."""
    t0, t1, t2, t3, t4, t5, t6, t7, t8 = _taps3x3(oh, s_h, s_w, hq, wq)
    for ow in range(out_w):
        acc = np.float32(0.0)
        acc += buf[_u(t0 + ow)]
        acc += buf[_u(t1 + ow)]
        acc += buf[_u(t2 + ow)]
        acc += buf[_u(t3 + ow)]
        acc += buf[_u(t4 + ow)]
        acc += buf[_u(t5 + ow)]
        acc += buf[_u(t6 + ow)]
        acc += buf[_u(t7 + ow)]
        acc += buf[_u(t8 + ow)]
        yf[_u(o0 + ow)] = acc


@njit(parallel=True, cache=True)
def _max_pool2d_kernel(x3, k_h, k_w, s_h, s_w, p_h, p_w, out_h, out_w, hq, wq, n_threads):
    """Return (y, argmax) over planes x3 (P, H, W); argmax is the flat index ih*W + iw.

    Each plane is copied into a phase buffer whose border is -inf, so every tap (i, j) reads
    one contiguous run per output row; taps are visited in row-major window order and a value
    replaces the running maximum when it is greater or NaN. Hence ties keep the first maximum,
    a NaN wins and the last NaN is kept, and a window of -inf keeps its first input pixel --
    torch's CPU semantics.
    """
    n_planes, h, wd = x3.shape
    y = np.empty((n_planes, out_h, out_w), np.float32)
    arg = np.empty((n_planes, out_h, out_w), np.int32)
    n_blocks = min(n_threads, n_planes)
    for block in prange(n_blocks):
        lo, hi = block_bounds(block, n_blocks, n_planes)
        buf = np.full(s_h * s_w * hq * wq, -np.inf, np.float32)
        for p in range(lo, hi):
            _plane_phases(x3[p], buf, p_h, p_w, s_h, s_w, hq, wq, True)
            yf = y[p].reshape(out_h * out_w)
            af = arg[p].reshape(out_h * out_w)
            for oh in range(out_h):
                o0 = oh * out_w
                ih0 = max(oh * s_h - p_h, 0)
                for ow in range(out_w):
                    yf[_u(o0 + ow)] = -np.inf
                    af[_u(o0 + ow)] = ih0 * wd + max(ow * s_w - p_w, 0)
                for i in range(k_h):
                    for j in range(k_w):
                        src = _tap_offset(oh, i, j, s_h, s_w, hq, wq)
                        flat = (oh * s_h + i - p_h) * wd + j - p_w
                        for ow in range(out_w):
                            v = buf[_u(src + ow)]
                            best = yf[_u(o0 + ow)]
                            take = (v > best) | (v != v)
                            yf[_u(o0 + ow)] = v if take else best
                            af[_u(o0 + ow)] = np.int32(flat + ow * s_w) if take else af[_u(o0 + ow)]
    return y, arg


@njit(parallel=True, cache=True)
def _max_pool2d_grad_kernel(gy3, arg3, h, wd):
    """Return gx (P, H, W) with gx[p].flat[arg3[p, o]] += gy3[p, o], outputs in row-major order."""
    n_planes, out_h, out_w = gy3.shape
    gx = np.zeros((n_planes, h * wd), np.float32)
    for p in prange(n_planes):
        dst = gx[p]
        g = gy3[p].reshape(out_h * out_w)
        a = arg3[p].reshape(out_h * out_w)
        for o in range(out_h * out_w):
            dst[_u(a[_u(o)])] += g[_u(o)]
    return gx.reshape(n_planes, h, wd)


@njit(cache=True, inline="always")
def _window_count(oh, ow, k_h, k_w, s_h, s_w, p_h, p_w, h, wd, count_include_pad):
    """Divisor of window (oh, ow): input pixels it covers, or k_h*k_w with the padding."""
    if count_include_pad:
        return np.float32(k_h * k_w)
    rows = min(oh * s_h - p_h + k_h, h) - max(oh * s_h - p_h, 0)
    cols = min(ow * s_w - p_w + k_w, wd) - max(ow * s_w - p_w, 0)
    return np.float32(rows * cols)


@njit(parallel=True, cache=True)
def _avg_pool2d_kernel(x3, k_h, k_w, s_h, s_w, p_h, p_w, out_h, out_w, count_include_pad,
                       hq, wq, n_threads):
    """Return y (P, OH, OW): window sums in row-major tap order divided by the window count.

    The phase buffer's border is 0, and adding 0 leaves a partial sum unchanged, so each
    window is summed over its input pixels in row-major order.
    """
    n_planes, h, wd = x3.shape
    y = np.empty((n_planes, out_h, out_w), np.float32)
    n_blocks = min(n_threads, n_planes)
    for block in prange(n_blocks):
        lo, hi = block_bounds(block, n_blocks, n_planes)
        buf = np.zeros(s_h * s_w * hq * wq, np.float32)
        for p in range(lo, hi):
            _plane_phases(x3[p], buf, p_h, p_w, s_h, s_w, hq, wq, True)
            yf = y[p].reshape(out_h * out_w)
            for oh in range(out_h):
                o0 = oh * out_w
                for ow in range(out_w):
                    yf[_u(o0 + ow)] = 0.0
                for i in range(k_h):
                    for j in range(k_w):
                        src = _tap_offset(oh, i, j, s_h, s_w, hq, wq)
                        for ow in range(out_w):
                            yf[_u(o0 + ow)] += buf[_u(src + ow)]
                for ow in range(out_w):
                    yf[_u(o0 + ow)] /= _window_count(oh, ow, k_h, k_w, s_h, s_w, p_h, p_w, h,
                                                     wd, count_include_pad)
    return y


@njit(parallel=True, cache=True)
def _avg_pool2d_grad_kernel(gy3, h, wd, k_h, k_w, s_h, s_w, p_h, p_w, count_include_pad,
                            hq, wq, n_threads):
    """Return gx (P, H, W): each gy / count added over its window, in a fixed order.

    Shares are added into a zeroed phase buffer (outputs row by row, taps in row-major order)
    and the interior is read back; whatever lands on the border is dropped. The 3x3 stride-1
    case gathers instead (below): the same shares, added in the opposite tap order.
    """
    n_planes, out_h, out_w = gy3.shape
    gx = np.empty((n_planes, h, wd), np.float32)
    n_blocks = min(n_threads, n_planes)
    # 3x3, stride 1, padding 1 (the DARTS pool): a pixel's gradient is the sum of the shares of
    # the 3x3 outputs around it, so it is gathered from a zero-bordered share plane with the
    # forward's 3x3 row sums (one pass per row, no scattered read-modify-writes).
    gather = k_h == 3 and k_w == 3 and s_h == 1 and s_w == 1 and p_h == 1 and p_w == 1
    for block in prange(n_blocks):
        lo, hi = block_bounds(block, n_blocks, n_planes)
        buf = np.empty(s_h * s_w * hq * wq, np.float32)
        share = np.empty(out_w, np.float32)
        shares = np.empty((out_h, out_w), np.float32)
        if gather:
            buf[:] = 0.0
        for p in range(lo, hi):
            if gather:
                gf = gy3[p].reshape(out_h * out_w)
                for oh in range(out_h):
                    row = shares[oh]
                    for ow in range(out_w):
                        row[_u(ow)] = gf[_u(oh * out_w + ow)] / _window_count(
                            oh, ow, k_h, k_w, s_h, s_w, p_h, p_w, h, wd, count_include_pad)
                # p_h = p_w = s_h = s_w = 1 here; passed as the int64 arguments they are (a
                # literal 1 would compile _plane_phases a second time)
                _plane_phases(shares, buf, p_h, p_w, s_h, s_w, hq, wq, True)
                gxf = gx[p].reshape(h * wd)
                for r in range(h):
                    _sum3x3_row(buf, gxf, r * wd, wd, r, 1, 1, hq, wq)
                continue
            buf[:] = 0.0
            gf = gy3[p].reshape(out_h * out_w)
            for oh in range(out_h):
                o0 = oh * out_w
                for ow in range(out_w):
                    share[_u(ow)] = gf[_u(o0 + ow)] / _window_count(
                        oh, ow, k_h, k_w, s_h, s_w, p_h, p_w, h, wd, count_include_pad)
                for i in range(k_h):
                    for j in range(k_w):
                        dst = _tap_offset(oh, i, j, s_h, s_w, hq, wq)
                        for ow in range(out_w):
                            buf[_u(dst + ow)] += share[_u(ow)]
            _plane_phases(gx[p], buf, p_h, p_w, s_h, s_w, hq, wq, False)
    return gx


# 3x3 windows on stacked planes. The forward kernels above walk one plane and one output row at
# a time (32 outputs per call at 32x32); the DARTS pools are laid out as the depthwise kernels
# lay out their work items instead (:mod:`approxdarts_np.kernels.depthwise`: a channel's planes
# of a group of images one after another in a bordered scratch buffer, tap (i, j) at a constant
# offset), so each tap is one loop over the whole item. Same taps, same order, same rule as the
# row kernels: the results are the same bits, and both pools run faster.

_NO_TAKE = np.int32(-1)   # a window whose running maximum was never replaced (all -inf)


@njit(cache=True, inline="always")
def _tap_runs(buf, offs, n):
    """The runs buf[offs[t]:offs[t] + n] of the nine taps of a 3x3 window, t row-major."""
    return (buf[offs[0]:offs[0] + n], buf[offs[1]:offs[1] + n], buf[offs[2]:offs[2] + n],
            buf[offs[3]:offs[3] + n], buf[offs[4]:offs[4] + n], buf[offs[5]:offs[5] + n],
            buf[offs[6]:offs[6] + n], buf[offs[7]:offs[7] + n], buf[offs[8]:offs[8] + n])


@njit(cache=True)
def _max9(best, tap, n, buf, offs, deltas):
    """best[q], tap[q] = maximum over taps t of buf[offs[t] + q] (row-major, greater or NaN
    wins) and the winning tap's ``deltas[t]`` (_NO_TAKE if none won), for q < n."""
    b = best[:n]
    a = tap[:n]
    s0, s1, s2, s3, s4, s5, s6, s7, s8 = _tap_runs(buf, offs, n)
    d0, d1, d2, d3, d4, d5, d6, d7, d8 = (deltas[0], deltas[1], deltas[2], deltas[3], deltas[4],
                                          deltas[5], deltas[6], deltas[7], deltas[8])
    for q in range(n):
        v, k = _take(s0[q], np.float32(-np.inf), _NO_TAKE, d0)
        v, k = _take(s1[q], v, k, d1)
        v, k = _take(s2[q], v, k, d2)
        v, k = _take(s3[q], v, k, d3)
        v, k = _take(s4[q], v, k, d4)
        v, k = _take(s5[q], v, k, d5)
        v, k = _take(s6[q], v, k, d6)
        v, k = _take(s7[q], v, k, d7)
        v, k = _take(s8[q], v, k, d8)
        b[q] = v
        a[q] = k


@njit(cache=True)
def _sum9(acc, n, buf, offs):
    """acc[q] = sum over taps t of buf[offs[t] + q], from 0 in row-major tap order, q < n."""
    o = acc[:n]
    s0, s1, s2, s3, s4, s5, s6, s7, s8 = _tap_runs(buf, offs, n)
    for q in range(n):
        t = np.float32(0.0)
        t += s0[q]
        t += s1[q]
        t += s2[q]
        t += s3[q]
        t += s4[q]
        t += s5[q]
        t += s6[q]
        t += s7[q]
        t += s8[q]
        o[q] = t


@njit(parallel=True, cache=True)
def _pool3x3_stacked_kernel(x, is_max, s_h, s_w, p_h, p_w, out_h, out_w, count_include_pad,
                            stack, n_threads):
    """3x3 max (``is_max``: returns y, argmax) or average pool (y, each window's sum divided
    by its :func:`_window_count`; argmax empty) of x (N, C, H, W) on stacked work items."""
    n_img, n_ch, h, wd = x.shape
    # int64 (not literal) dilation and size: the depthwise kernels' geometry compiled once
    one, three = np.int64(1), np.int64(3)
    wq, lead, plane, phase_stride, offs = _stack_geometry(h, wd, out_h, out_w, s_h, s_w, p_h,
                                                          p_w, one, one, three, three, stack)
    deltas = np.empty(9, np.int32)
    for t in range(9):
        deltas[t] = (t // 3) * wd + t % 3
    counts = np.empty(0 if is_max else out_h * out_w, np.float32)
    for o in range(counts.shape[0]):
        counts[o] = _window_count(o // out_w, o % out_w, 3, 3, s_h, s_w, p_h, p_w, h, wd,
                                  count_include_pad)
    y = np.empty((n_img, n_ch, out_h, out_w), np.float32)
    arg = np.empty((n_img, n_ch, out_h, out_w) if is_max else (0, 0, 0, 0), np.int32)
    n_items, n_blocks = _item_blocks(n_img, n_ch, stack, n_threads)
    for blk in prange(n_blocks):
        border = np.float32(-np.inf) if is_max else np.float32(0.0)
        xbuf = np.full(lead + s_h * s_w * phase_stride, border, np.float32)
        acc = np.empty(phase_stride, np.float32)
        tap = np.empty(phase_stride if is_max else 0, np.int32)
        start, stop = block_bounds(blk, n_blocks, n_items)
        for item in range(start, stop):
            ci, n0, count = _item_images(item, n_ch, stack, n_img)
            _stack_phases(x, n0, count, ci, xbuf, p_h, p_w, s_h, s_w, wq, plane, phase_stride, True)
            length = (count - 1) * plane + (out_h - 1) * wq + out_w
            if is_max:
                _max9(acc, tap, length, xbuf, offs, deltas)
            else:
                _sum9(acc, length, xbuf, offs)
            for g in range(count):
                for oh in range(out_h):
                    q0 = g * plane + oh * wq
                    src = acc[q0:q0 + out_w]
                    dst = y[n0 + g, ci, oh]
                    if is_max:
                        won = tap[q0:q0 + out_w]
                        a_row = arg[n0 + g, ci, oh]
                        ih = oh * s_h - p_h
                        first = max(ih, 0) * wd
                        for ow in range(out_w):
                            dst[ow] = src[ow]
                            iw = ow * s_w - p_w
                            k = won[ow]
                            a_row[ow] = (ih * wd + iw + k) if k != _NO_TAKE else (first
                                                                                 + max(iw, 0))
                    else:
                        cnt = counts[oh * out_w:(oh + 1) * out_w]
                        for ow in range(out_w):
                            dst[ow] = src[ow] / cnt[ow]
    return y, arg


def _stacked_3x3(x, geom, out_h, out_w, is_max, count_include_pad=False):
    """:func:`_pool3x3_stacked_kernel` on x (N, C, H, W) for a 3x3 ``geom``."""
    _, _, s_h, s_w, p_h, p_w = geom
    n_img, n_ch, h, wd = x.shape
    stack = _stack_size(n_img, h, wd, out_h, out_w, s_h, s_w, p_h, p_w, s_h == 1 and s_w == 1)
    kernel, n_threads = pick_kernel(_pool3x3_stacked_kernel, _pool3x3_stacked_kernel_serial,
                                    x.size)
    return kernel(x, is_max, s_h, s_w, p_h, p_w, out_h, out_w, count_include_pad, stack,
                  n_threads)


# Serial twins of the parallel kernels, for calls too small to wake the thread team
# (kernels._util.SERIAL_BELOW).
_max_pool2d_kernel_serial = serial_twin(_max_pool2d_kernel)
_max_pool2d_grad_kernel_serial = serial_twin(_max_pool2d_grad_kernel)
_avg_pool2d_kernel_serial = serial_twin(_avg_pool2d_kernel)
_avg_pool2d_grad_kernel_serial = serial_twin(_avg_pool2d_grad_kernel)
_pool3x3_stacked_kernel_serial = serial_twin(_pool3x3_stacked_kernel)


# ----------------------------------------------------------------------------- validation

def _geometry(kernel_size, stride, padding):
    k_h, k_w = pair_at_least(kernel_size, "kernel_size", 1)
    s_h, s_w = pair_at_least(stride, "stride", 1)
    p_h, p_w = pair_at_least(padding, "padding", 0)
    if 2 * p_h > k_h or 2 * p_w > k_w:
        raise ValueError(
            f"padding must be between 0 and half the kernel size {(k_h, k_w)}, got {(p_h, p_w)}")
    return k_h, k_w, s_h, s_w, p_h, p_w


def _output_hw(h, wd, geom):
    k_h, k_w, s_h, s_w, p_h, p_w = geom
    return conv_output_hw(h, wd, k_h, k_w, (s_h, s_w, p_h, p_w, 1, 1))


def _phase_size(h, wd, geom):
    """(hq, wq): rows and columns of one phase plane of the padded input."""
    k_h, k_w, s_h, s_w, p_h, p_w = geom
    return -(-(h + 2 * p_h) // s_h), -(-(wd + 2 * p_w) // s_w)


def _check_grad(gy, input_shape, geom):
    """Validate gy against input_shape; return (gy, (N, C, H, W))."""
    gy = check_float32_4d(gy, "gy")
    n_img, n_ch, h, wd = check_shape4(input_shape, "input_shape")
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
    x = check_float32_4d(x, "x")
    n_img, n_ch, h, wd = x.shape
    out_h, out_w = _output_hw(h, wd, geom)
    if geom[:2] == (3, 3):
        return _stacked_3x3(x, geom, out_h, out_w, True)
    kernel, n_threads = pick_kernel(_max_pool2d_kernel, _max_pool2d_kernel_serial, x.size)
    y, arg = kernel(x.reshape(n_img * n_ch, h, wd), *geom, out_h, out_w,
                    *_phase_size(h, wd, geom), n_threads)
    return y.reshape(n_img, n_ch, out_h, out_w), arg.reshape(n_img, n_ch, out_h, out_w)


def max_pool2d_grad(gy, argmax, input_shape):
    """Return dL/dx (``input_shape``) of :func:`max_pool2d` given dL/dy and its ``argmax``.

    Where windows overlap, a pixel receives the sum of the gradients of every window it won.
    """
    gy = check_float32_4d(gy, "gy")
    n_img, n_ch, h, wd = check_shape4(input_shape, "input_shape")
    if not isinstance(argmax, np.ndarray) or argmax.dtype != np.int32:
        raise ValueError("argmax must be the int32 array returned by max_pool2d")
    if argmax.shape != gy.shape or gy.shape[:2] != (n_img, n_ch):
        raise ValueError(
            f"gy {gy.shape} and argmax {argmax.shape} must have the same shape, with "
            f"(N, C) = {(n_img, n_ch)} from input_shape")
    if argmax.size and (argmax.min() < 0 or argmax.max() >= h * wd):
        raise ValueError(f"argmax holds indices outside the {h}x{wd} input plane")
    out_h, out_w = gy.shape[2:]
    kernel, _ = pick_kernel(_max_pool2d_grad_kernel, _max_pool2d_grad_kernel_serial,
                            max(gy.size, n_img * n_ch * h * wd))
    gx = kernel(gy.reshape(n_img * n_ch, out_h, out_w),
                np.ascontiguousarray(argmax).reshape(n_img * n_ch, out_h, out_w), h, wd)
    return gx.reshape(n_img, n_ch, h, wd)


def avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False):
    """Return the window means of x (N, C, H, W).

    The divisor is the number of input pixels in the window, or the full kernel area when
    ``count_include_pad`` is true.
    """
    geom = _geometry(kernel_size, stride, padding)
    x = check_float32_4d(x, "x")
    n_img, n_ch, h, wd = x.shape
    out_h, out_w = _output_hw(h, wd, geom)
    if geom[:2] == (3, 3):
        return _stacked_3x3(x, geom, out_h, out_w, False, bool(count_include_pad))[0]
    kernel, n_threads = pick_kernel(_avg_pool2d_kernel, _avg_pool2d_kernel_serial, x.size)
    y = kernel(x.reshape(n_img * n_ch, h, wd), *geom, out_h, out_w, bool(count_include_pad),
               *_phase_size(h, wd, geom), n_threads)
    return y.reshape(n_img, n_ch, out_h, out_w)


def avg_pool2d_grad(gy, input_shape, kernel_size=3, stride=1, padding=1,
                    count_include_pad=False):
    """Return dL/dx (``input_shape``) of :func:`avg_pool2d` given dL/dy ``gy``."""
    geom = _geometry(kernel_size, stride, padding)
    gy, (n_img, n_ch, h, wd) = _check_grad(gy, input_shape, geom)
    out_h, out_w = gy.shape[2:]
    kernel, n_threads = pick_kernel(_avg_pool2d_grad_kernel, _avg_pool2d_grad_kernel_serial,
                                    max(gy.size, n_img * n_ch * h * wd))
    gx = kernel(gy.reshape(n_img * n_ch, out_h, out_w), h, wd, *geom, bool(count_include_pad),
                *_phase_size(h, wd, geom), n_threads)
    return gx.reshape(n_img, n_ch, h, wd)
