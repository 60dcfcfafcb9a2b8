"""Dense and grouped 2-D convolution (float32, no bias): forward, input gradient, weight gradient.

Layout: x (N, Ci, H, W), w (Co, Ci/groups, kh, kw), y (N, Co, OH, OW), float32 C-contiguous.
Padding is symmetric zero padding; stride, padding and dilation are an int or an (h, w) pair.
The convolution is a cross-correlation, as in torch.

How it is computed. The work is split into *items*, one per (image, group). For each item the
input patch matrix ``col`` (Ci/groups * kh * kw, OH * OW) is built by a Numba im2col and
multiplied by the group's weight matrix with one BLAS GEMM (``np.dot`` inside the Numba kernel):

* forward        y[n, g]   = W[g] @ col(x[n, g])
* input gradient gcol      = W[g]^T @ gy[n, g], then col2im adds gcol back into gx[n, g]
* weight grad.   part[n,g] = gy[n, g] @ col(x[n, g])^T, then gw[g] = sum over n of part[n, g]

Pointwise fast path: a 1x1 kernel without padding needs no patch matrix. With stride 1 the
image's (Ci/groups, H*W) block is the GEMM operand itself (and the input gradient is written by
the GEMM directly); with stride s the patch matrix is just the strided sample x[:, ::s, ::s].

Parallelism and BLAS threads. ``prange`` runs over contiguous blocks of items, one scratch
buffer per block, and every GEMM is a single-threaded BLAS call made from a Numba thread: the
only thread pool that runs is Numba's. The run holds BLAS at one thread for its whole length
(:func:`approxdarts_np.kernels.threads.configure_threads`); these functions change no thread
setting themselves (a threadpoolctl limit per call has a fixed cost that showed in profiles
of small steps). The alternative, a multithreaded OpenBLAS GEMM next to parallel Numba
kernels, loses on a 2-core machine both ways: OpenBLAS worker threads keep spinning after a
call and slow the parallel Numba kernel that follows, GNU OpenMP workers spinning after a
Numba kernel slow the GEMM that follows, and a 2-thread OpenBLAS called concurrently from two
Numba threads is slower than two single-threaded GEMMs. Callers that use numpy's own
multithreaded BLAS elsewhere still pay that spin cost in the kernels that follow; limiting
BLAS to one thread for the whole process avoids it. Results do not depend on the BLAS thread
count, only the speed does.

Determinism. Every output element of the forward and the input gradient is written by one
thread, by one GEMM whose inner order does not depend on the thread count. The weight
gradient keeps one partial product per image and adds them in image order, in float64, so it
is bit-reproducible and independent of the number of threads as well.
"""
import numpy as np
from numba import njit, prange

from ._util import (block_bounds, check_float32_4d, check_shape4, conv_geometry, conv_output_hw,
                    pick_kernel, serial_twin)
from ._util import unsigned as _u
from .codes import check_code_args, codes_and_feature0, feature_plane, scale_row

__all__ = ["conv2d", "conv2d_grad_input", "conv2d_grad_weight", "pointwise_conv2d_codes"]

# Elements of the weight gradient summed over the batch per float64 accumulator block.
_REDUCE_BLOCK = 4096


# ----------------------------------------------------------------------------- Numba kernels

@njit(cache=True)
def _valid_range(n_out, offset, stride, size):
    """Return [lo, hi) of outputs o with 0 <= o*stride + offset < size (lo <= hi <= n_out)."""
    if offset >= 0:
        lo = 0
    else:
        lo = (-offset + stride - 1) // stride
    last = size - 1 - offset
    if last < 0:
        hi = 0
    else:
        hi = last // stride + 1
    lo = min(lo, n_out)
    hi = min(max(hi, lo), n_out)
    return lo, hi


@njit(cache=True)
def _patch_copy(img, col, scatter, k_h, k_w, s_h, s_w, p_h, p_w, d_h, d_w, out_h, out_w):
    """Between one image block ``img`` (channels, H, W) and its patch matrix ``col``.

    im2col (``scatter`` False): col[(c*k_h + i)*k_w + j, oh*out_w + ow] = imgpad[c, oh*s_h + i*d_h,
    ow*s_w + j*d_w], padded positions giving 0. Its adjoint (``scatter`` True, col2im): every col
    entry is added onto the image position it was read from, in a fixed (channel, tap, position)
    order; entries from the padding are dropped.

    Indexing is flat (no per-row views): rows are short, and per-row overhead would dominate. When
    s_w == 1 and s_h * W == out_w (stride 1 with "same" padding), a col row is the image plane
    shifted by a constant, so it moves as one run: im2col copies the run and then zeroes the
    columns that fall in the padding; col2im zeroes those columns of ``col`` (scratch then) first
    and adds the run.
    """
    n_ch, h, wd = img.shape
    xf = img.reshape(n_ch * h * wd)
    cf = col.reshape(col.shape[0] * col.shape[1])
    n_out = out_h * out_w
    linear = s_w == 1 and s_h * wd == out_w
    for c in range(n_ch):
        for i in range(k_h):
            off_h = i * d_h - p_h
            oh_lo, oh_hi = _valid_range(out_h, off_h, s_h, h)
            for j in range(k_w):
                off_w = j * d_w - p_w
                ow_lo, ow_hi = _valid_range(out_w, off_w, s_w, wd)
                base = ((c * k_h + i) * k_w + j) * n_out
                if oh_lo >= oh_hi or ow_lo >= ow_hi:
                    if not scatter:
                        _zero(cf, base, base + n_out)
                    continue
                q_lo = oh_lo * out_w + ow_lo
                q_hi = (oh_hi - 1) * out_w + ow_hi
                if linear:
                    # image index = q + shift for every q; [q_lo, q_hi) lies inside the plane.
                    shift = (c * h + off_h) * wd + off_w
                    if scatter:
                        _zero_outside_columns(cf, base, oh_lo, oh_hi, ow_lo, ow_hi, out_w)
                        for q in range(q_lo, q_hi):
                            xf[_u(q + shift)] += cf[_u(base + q)]
                    else:
                        for q in range(q_lo, q_hi):
                            cf[_u(base + q)] = xf[_u(q + shift)]
                        _zero_outside_columns(cf, base, oh_lo, oh_hi, ow_lo, ow_hi, out_w)
                else:
                    for oh in range(oh_lo, oh_hi):
                        row = base + oh * out_w
                        src = (c * h + oh * s_h + off_h) * wd + off_w
                        if scatter:
                            for ow in range(ow_lo, ow_hi):
                                xf[_u(src + ow * s_w)] += cf[_u(row + ow)]
                        elif s_w == 1:
                            for ow in range(ow_lo, ow_hi):
                                cf[_u(row + ow)] = xf[_u(src + ow)]
                        else:
                            for ow in range(ow_lo, ow_hi):
                                cf[_u(row + ow)] = xf[_u(src + ow * s_w)]
                    if not scatter:
                        _zero_outside_columns(cf, base, oh_lo, oh_hi, ow_lo, ow_hi, out_w)
                if not scatter:
                    _zero(cf, base, base + q_lo)
                    _zero(cf, base + q_hi, base + n_out)


@njit(cache=True)
def _zero(a, lo, hi):
    for q in range(lo, hi):
        a[_u(q)] = 0.0


@njit(cache=True)
def _zero_outside_columns(cf, base, oh_lo, oh_hi, ow_lo, ow_hi, out_w):
    """Zero columns [0, ow_lo) and [ow_hi, out_w) of rows oh_lo .. oh_hi - 1 of the col row at ``base``."""
    for oh in range(oh_lo, oh_hi):
        row = base + oh * out_w
        _zero(cf, row, row + ow_lo)
        _zero(cf, row + ow_hi, row + out_w)


@njit(cache=True)
def _patch_matrix(xg, col, direct, k_h, k_w, s_h, s_w, p_h, p_w, d_h, d_w, out_h, out_w):
    """The GEMM operand of one item ``xg`` (Ci/G, H, W): with ``direct`` (1x1, stride 1, no padding) the
    image block itself, else its patch matrix, built in ``col``."""
    if direct:
        return xg.reshape(xg.shape[0], xg.shape[1] * xg.shape[2])
    _patch_copy(xg, col, False, k_h, k_w, s_h, s_w, p_h, p_w, d_h, d_w, out_h, out_w)
    return col


@njit(parallel=True, cache=True)
def _patch_products_kernel(x5, lhs, out, weight_grad, k_h, k_w, s_h, s_w, p_h, p_w, d_h, d_w, out_h,
                           out_w, direct, n_blocks):
    """Per item (n, g) of x5 (N, G, Ci/G, H, W), one GEMM with its patch matrix col(x5[n, g]):

    * forward:            out[n, g] = lhs[0, g] @ col, lhs (1, G, Co/G, K) holding the weights;
    * ``weight_grad``:    out[n, g] = lhs[n, g] @ col^T, lhs (N, G, Co/G, OH*OW) holding gy --
      the image's part of the weight gradient.

    Items are split into ``n_blocks`` contiguous blocks, one scratch buffer each.
    """
    n_grp = x5.shape[1]
    k_dim = x5.shape[2] * k_h * k_w
    for block in prange(n_blocks):
        lo, hi = block_bounds(block, n_blocks, x5.shape[0] * n_grp)
        col = np.empty((0 if direct else k_dim, out_h * out_w), np.float32)
        for item in range(lo, hi):
            n, g = item // n_grp, item % n_grp
            src = _patch_matrix(x5[n, g], col, direct, k_h, k_w, s_h, s_w, p_h, p_w, d_h, d_w,
                                out_h, out_w)
            if weight_grad:
                np.dot(lhs[n, g], src.T, out[n, g])
            else:
                np.dot(lhs[0, g], src, out[n, g])


@njit(parallel=True, cache=True)
def _pointwise_codes_kernel(x3, scale, inv, zero_point, table_t, affine, w_mat, cst, out_scale,
                            n_threads):
    """:func:`pointwise_conv2d_codes`: per image, codes and features into a scratch block, one
    GEMM, then cst added and the scale applied while the image's output is in cache.

    The scratch block is feature-major (row j*Ci + c: feature j of channel c), so the codes
    and each feature are one long loop over the image's Ci*P values; the weight columns are
    permuted to match. The sums are exact integers (the caller's bound), so their order does
    not change the result.
    """
    n_img, c_in, n_pix = x3.shape
    n_feat = table_t.shape[0]
    c_out = w_mat.shape[0]
    w_fm = np.ascontiguousarray(
        w_mat.reshape(c_out, c_in, n_feat).transpose(0, 2, 1)).reshape(c_out, n_feat * c_in)
    y = np.empty((n_img, c_out, n_pix), np.float32)
    codes = np.empty((n_img, c_in * n_pix), np.uint8)
    x2 = x3.reshape(n_img, c_in * n_pix)
    n_blocks = min(n_threads, n_img)
    for block in prange(n_blocks):
        lo, hi = block_bounds(block, n_blocks, n_img)
        feats = np.empty((n_feat, c_in * n_pix), np.float32)
        near = np.empty(c_in * n_pix, np.uint8)
        for n in range(lo, hi):
            codes_and_feature0(x2[n], scale, inv, zero_point, codes[n], near, table_t, affine,
                               feats[0])
            for j in range(1, n_feat):
                feature_plane(codes[n], table_t, affine, j, feats[j])
            np.dot(w_fm, feats.reshape(n_feat * c_in, n_pix), y[n])
            for o in range(c_out):
                scale_row(y[n, o], cst[o], out_scale)
    return y, codes.reshape(n_img, c_in, n_pix)


@njit(parallel=True, cache=True)
def _conv2d_grad_input_kernel(gy4, w_t, gx, k_h, k_w, s_h, s_w, p_h, p_w, d_h, d_w, out_h, out_w,
                              direct, n_blocks):
    """gx[n, g] = col2im(w_t[g] @ gy4[n, g]) for gy4 (N, G, Co/G, OH*OW), w_t (G, K, Co/G), gx
    (N, G, Ci/G, H, W). ``direct`` as in the forward: the GEMM writes gx itself."""
    n_grp, c_grp, h, wd = gx.shape[1], gx.shape[2], gx.shape[3], gx.shape[4]
    for block in prange(n_blocks):
        lo, hi = block_bounds(block, n_blocks, gx.shape[0] * n_grp)
        gcol = np.empty((0 if direct else w_t.shape[1], out_h * out_w), np.float32)
        for item in range(lo, hi):
            n, g = item // n_grp, item % n_grp
            gxg = gx[n, g]
            if direct:
                np.dot(w_t[g], gy4[n, g], gxg.reshape(c_grp, h * wd))
            else:
                np.dot(w_t[g], gy4[n, g], gcol)
                gxg[:] = 0.0
                _patch_copy(gxg, gcol, True, k_h, k_w, s_h, s_w, p_h, p_w, d_h, d_w, out_h, out_w)


@njit(parallel=True, cache=True)
def _sum_images_kernel(parts, reduce_block):
    """sum over n (in order) of parts[n], in float64 per element, returned as float32: the weight
    gradient from the per-image parts, independent of the thread count."""
    n_img, n_elem = parts.shape
    total = np.empty(n_elem, np.float32)
    n_chunks = (n_elem + reduce_block - 1) // reduce_block
    for chunk in prange(n_chunks):
        e0 = chunk * reduce_block
        e1 = min(e0 + reduce_block, n_elem)
        acc = np.zeros(e1 - e0, np.float64)
        for n in range(n_img):
            src_n = parts[n, e0:e1]
            for e in range(e1 - e0):
                acc[e] += src_n[e]
        for e in range(e1 - e0):
            total[e0 + e] = acc[e]
    return total


# ----------------------------------------------------------------------------- validation


def _check_groups(groups, c_in, c_out):
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if c_in % groups or c_out % groups:
        raise ValueError(
            f"groups={groups} must divide both input channels ({c_in}) and output channels "
            f"({c_out})")
    return int(groups)


def _check_layout(x_shape, w_shape, groups):
    """Check x/w channel agreement; return (k_h, k_w, groups)."""
    c_out, c_w, k_h, k_w = w_shape
    c_in = x_shape[1]
    groups = _check_groups(groups, c_in, c_out)
    if c_out < 1 or k_h < 1 or k_w < 1 or c_w != c_in // groups:
        raise ValueError(
            f"weight must be (Co, Ci/groups, kh, kw) = (Co, {c_in // groups}, kh, kw) with "
            f"Co, kh, kw >= 1 for {c_in} input channels and groups={groups}, got "
            f"{tuple(w_shape)}")
    return k_h, k_w, groups


def _is_direct(k_h, k_w, geom):
    """True when the image block itself is the patch matrix: 1x1, stride 1, no padding."""
    s_h, s_w, p_h, p_w, _, _ = geom
    return k_h == 1 and k_w == 1 and s_h == 1 and s_w == 1 and p_h == 0 and p_w == 0


# Serial twins of the parallel kernels, for calls too small to wake the thread team
# (kernels._util.SERIAL_BELOW).
_patch_products_kernel_serial = serial_twin(_patch_products_kernel)
_pointwise_codes_kernel_serial = serial_twin(_pointwise_codes_kernel)
_conv2d_grad_input_kernel_serial = serial_twin(_conv2d_grad_input_kernel)
_sum_images_kernel_serial = serial_twin(_sum_images_kernel)


def _pick(kernel, twin, size, n_items):
    """:func:`pick_kernel`, with the thread count as a number of blocks of ``n_items`` items."""
    kernel, n_threads = pick_kernel(kernel, twin, size)
    return kernel, min(n_threads, n_items)


# ----------------------------------------------------------------------------- public API

def conv2d(x, w, stride=1, padding=0, dilation=1, groups=1):
    """Return y (N, Co, OH, OW), the convolution of x (N, Ci, H, W) with w (Co, Ci/groups, kh, kw).

    y[n, g*Cog + o, oh, ow] = sum_{c, i, j} w[g*Cog + o, c, i, j]
                              * xpad[n, g*Cig + c, oh*s_h + i*d_h, ow*s_w + j*d_w],
    xpad being x zero-padded by ``padding`` on each side (Cig = Ci/groups, Cog = Co/groups).
    """
    geom = conv_geometry(stride, padding, dilation)
    x = check_float32_4d(x, "x")
    w = check_float32_4d(w, "w")
    n_img, c_in, h, wd = x.shape
    k_h, k_w, groups = _check_layout(x.shape, w.shape, groups)
    out_h, out_w = conv_output_hw(h, wd, k_h, k_w, geom)
    c_out = w.shape[0]
    s_h, s_w, p_h, p_w, d_h, d_w = geom
    x5 = x.reshape(n_img, groups, c_in // groups, h, wd)
    w_mat = w.reshape(groups, c_out // groups, -1)
    y = np.empty((n_img, groups, c_out // groups, out_h * out_w), np.float32)
    kernel, n_blocks = _pick(_patch_products_kernel, _patch_products_kernel_serial,
                             max(x.size, y.size), n_img * groups)
    kernel(x5, w_mat[None], y, False, k_h, k_w, s_h, s_w, p_h, p_w, d_h, d_w, out_h, out_w,
           _is_direct(k_h, k_w, geom), n_blocks)
    return y.reshape(n_img, c_out, out_h, out_w)


def conv2d_grad_input(gy, w, input_shape, stride=1, padding=0, dilation=1, groups=1):
    """Return dL/dx (``input_shape``) of :func:`conv2d` given dL/dy ``gy`` and the weights w.

    Input positions that no window reaches (stride larger than the kernel's reach, or rows and
    columns beyond the last window) get 0.
    """
    geom = conv_geometry(stride, padding, dilation)
    gy = check_float32_4d(gy, "gy")
    w = check_float32_4d(w, "w")
    n_img, c_in, h, wd = check_shape4(input_shape, "input_shape")
    k_h, k_w, groups = _check_layout((n_img, c_in, h, wd), w.shape, groups)
    out_h, out_w = conv_output_hw(h, wd, k_h, k_w, geom)
    c_out = w.shape[0]
    if gy.shape != (n_img, c_out, out_h, out_w):
        raise ValueError(
            f"gy must have shape {(n_img, c_out, out_h, out_w)} for input_shape "
            f"{(n_img, c_in, h, wd)} and weight {w.shape}, got {gy.shape}")
    s_h, s_w, p_h, p_w, d_h, d_w = geom
    gy4 = gy.reshape(n_img, groups, c_out // groups, out_h * out_w)
    w_t = np.ascontiguousarray(w.reshape(groups, c_out // groups, -1).transpose(0, 2, 1))
    gx = np.empty((n_img, groups, c_in // groups, h, wd), np.float32)
    kernel, n_blocks = _pick(_conv2d_grad_input_kernel, _conv2d_grad_input_kernel_serial,
                             max(gy.size, gx.size), n_img * groups)
    kernel(gy4, w_t, gx, k_h, k_w, s_h, s_w, p_h, p_w, d_h, d_w, out_h, out_w,
           _is_direct(k_h, k_w, geom), n_blocks)
    return gx.reshape(n_img, c_in, h, wd)


def conv2d_grad_weight(gy, x, weight_shape, stride=1, padding=0, dilation=1, groups=1):
    """Return dL/dw (``weight_shape`` = (Co, Ci/groups, kh, kw)) of :func:`conv2d` given gy and x.

    The sum over the batch runs image by image in a fixed order (float64 accumulation), so the
    result does not depend on the number of threads.
    """
    geom = conv_geometry(stride, padding, dilation)
    gy = check_float32_4d(gy, "gy")
    x = check_float32_4d(x, "x")
    w_shape = check_shape4(weight_shape, "weight_shape")
    n_img, c_in, h, wd = x.shape
    k_h, k_w, groups = _check_layout(x.shape, w_shape, groups)
    out_h, out_w = conv_output_hw(h, wd, k_h, k_w, geom)
    c_out = w_shape[0]
    if gy.shape != (n_img, c_out, out_h, out_w):
        raise ValueError(
            f"gy must have shape {(n_img, c_out, out_h, out_w)} for x {x.shape} and "
            f"weight_shape {w_shape}, got {gy.shape}")
    s_h, s_w, p_h, p_w, d_h, d_w = geom
    x5 = x.reshape(n_img, groups, c_in // groups, h, wd)
    gy4 = gy.reshape(n_img, groups, c_out // groups, out_h * out_w)
    parts = np.empty((n_img, groups, c_out // groups, w_shape[1] * k_h * k_w), np.float32)
    kernel, n_blocks = _pick(_patch_products_kernel, _patch_products_kernel_serial, max(gy.size, x.size),
                             n_img * groups)
    kernel(x5, gy4, parts, True, k_h, k_w, s_h, s_w, p_h, p_w, d_h, d_w, out_h, out_w,
           _is_direct(k_h, k_w, geom), n_blocks)
    kernel, _ = pick_kernel(_sum_images_kernel, _sum_images_kernel_serial, max(gy.size, x.size))
    return kernel(parts.reshape(n_img, -1), _REDUCE_BLOCK).reshape(w_shape)


def pointwise_conv2d_codes(x, scale, zero_point, table_t, w_feats, cst, out_scale,
                           affine=None):
    """The quantised 1x1 convolution (stride 1, no padding, one group) in one pass: ``(y, codes)``.

    ``codes`` (uint8, x's shape) are x's 8-bit codes with ``scale`` and ``zero_point``
    (:mod:`approxdarts_np.kernels.codes`); ``table_t`` (J, 256) float32 maps a code to its J
    integer features (``affine``: its :func:`~approxdarts_np.kernels.codes.affine_offset`,
    computed when None); ``w_feats`` (Co, Ci*J, 1, 1) float32 (input channel c*J + j: feature
    j of channel c); ``cst`` (Co,) integers. y[n, o] = float32((cst[o] + sum_{c,j}
    w_feats[o, c*J + j] * F_j[codes[n, c]]) * out_scale), the product taken in float64 -- what
    quantising, :func:`conv2d` on the features and ``feature_sum`` give, without their passes
    over memory. Exact only while the float32 sums stay below 2**24 (the caller checks). x must
    be finite float32; ValueError for a scale without a normal float32 inverse or bad shapes.
    """
    x = check_float32_4d(x, "x")
    w_feats = check_float32_4d(w_feats, "w_feats")
    inv, zero_point, table_t, affine = check_code_args(scale, zero_point, table_t, affine)
    n_img, c_in, h, wd = x.shape
    n_feat = table_t.shape[0]
    if w_feats.shape[1:] != (c_in * n_feat, 1, 1):
        raise ValueError(
            f"w_feats must be (Co, Ci*J = {c_in * n_feat}, 1, 1), got {w_feats.shape}")
    c_out = w_feats.shape[0]
    cst = np.ascontiguousarray(cst, dtype=np.int64)
    if cst.shape != (c_out,):
        raise ValueError(f"cst must have shape ({c_out},), got {cst.shape}")
    return pointwise_codes_unchecked(x, scale, inv, zero_point, table_t, affine, w_feats, cst,
                                     out_scale)


def pointwise_codes_unchecked(x, scale, inv, zero_point, table_t, affine, w_feats, cst,
                              out_scale):
    """:func:`pointwise_conv2d_codes` for arguments already checked (the quantised
    convolution's hot path): ``inv`` = float32(1/scale), ``affine`` known, arrays C-contiguous
    with the shapes and dtypes it requires."""
    n_img, c_in, h, wd = x.shape
    n_feat = table_t.shape[0]
    c_out = w_feats.shape[0]
    kernel, n_threads = pick_kernel(_pointwise_codes_kernel, _pointwise_codes_kernel_serial,
                                    max(x.size * n_feat, n_img * c_out * h * wd))
    y, codes = kernel(x.reshape(n_img, c_in, h * wd), float(scale), inv, zero_point, table_t,
                      affine, w_feats.reshape(c_out, c_in * n_feat), cst, float(out_scale),
                      n_threads)
    return y.reshape(n_img, c_out, h, wd), codes.reshape(x.shape)
