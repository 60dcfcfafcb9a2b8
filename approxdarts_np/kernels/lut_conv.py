"""Integer convolutions through a 256 x 256 product table (approximate 8-bit multipliers).

Operands are quantised codes: activations ``qx`` uint8 with zero point ``zx``, weights ``qw``
uint8 with zero point ``zw``, and the table ``M[a, b]`` gives the (approximate) product of the
activation code ``a`` and the weight code ``b``. Every output element is the exact integer

    acc = sum over the receptive field of ( M[qx, qw] - zw*qx - zx*qw + zx*zw ),

padding positions holding the code ``zx`` (the value 0). With ``M[a, b] = a*b`` this is the
ordinary integer convolution of ``qx - zx`` with ``qw - zw``.

Kernels, all deterministic (integer sums, each output element written by one thread):

* :func:`lut_bag_conv` - the "bag" gather for pointwise and dense convolutions. The convolution
  is first written as columns: ``cols[n, k, p]`` is the code seen by tap ``k`` (input channel x
  kernel offset) at output position ``p``. For every tap the table rows are laid out once per
  call as ``rows[k, a, :] = M[a, qw[:, k]]`` (one contiguous row of Co products per activation
  code), so an output pixel is the sum of K contiguous rows: the inner loop is a vector add over
  output channels instead of a gather per multiply-accumulate. Rows are stored as uint16 when
  the table fits (EvoApprox tables do), halving the memory the rows occupy.
* :func:`lut_depthwise_conv` - the packed-tap kernel of
  :mod:`approxdarts_np.kernels.packed_taps` (three taps' products per 64-bit load, or up to
  eight per vector); for a table whose columns do not fit its lanes, one table lookup per
  multiply-accumulate, from a small per-channel table that already holds the zero-point terms
  (``taps x 256`` int32 values, in L1).
* :func:`lut_conv_codes` - the depthwise or pointwise table conv of float input in one pass
  (quantised inside the kernel).
* :func:`lowrank_bag_conv` - the low-rank engine's pointwise/dense step: code features gathered
  per output-pixel block (the exact part ``code - zx`` computed, the R error features looked
  up), then a single-threaded BLAS GEMM per block inside the parallel loop.
* :func:`code_features` and :func:`feature_sum` - the low-rank engine's passes around the float
  kernels (:mod:`approxdarts_np.kernels.conv`, :mod:`approxdarts_np.kernels.depthwise`): the
  integer features of the codes, and the sum of the J feature outputs plus a per-channel
  constant, scaled (the quantised conv's output) or not (the exact integers).
* :func:`im2col_codes` - the column layout of the codes, padded with ``zx``.

Where the CPU has AVX-512 VBMI or AVX2, :func:`lut_depthwise_conv`, :func:`lut_bag_conv` and
:func:`lut_conv_codes` run the shuffle kernels of :mod:`approxdarts_np.kernels.byte_shuffle`
(64 lookups per ``vpermi2b``, or 32 per ``vpshufb`` of a nibble window; the same integers bit
for bit); the loops below are the scalar kernels every CPU runs, and the fallback for columns
or tap counts the shuffles do not take (``APPROXDARTS_NP_TABLE_KERNELS=scalar`` selects them
everywhere).
"""
import numpy as np
from llvmlite import ir
from numba import get_num_threads, njit, prange
from numba.core import types
from numba.extending import intrinsic

from . import byte_shuffle, packed_taps
from .codes import codes_plane, float32_inverse
from ._util import (NO_INPUT_3D, as_pair, block_bounds, check_code_value, check_codes,
                    check_float32_4d, conv_geometry, conv_output_hw, parallel_pays, pick_kernel,
                    serial_twin, unsigned)

__all__ = [
    "code_features",
    "feature_sum",
    "im2col_codes",
    "lut_bag_conv",
    "lut_depthwise_conv",
    "lut_conv_codes",
    "lowrank_bag_conv",
    "table_peak",
]

# Output pixels per job in the bag kernels: the int32 accumulator block (pixels x Co) is kept
# to about 256 KiB, so that it stays in L2 while the rows of each tap (256 x Co) are read.
_BAG_ACC_BYTES = 1 << 18
# Gathered low-rank features per job: about 512 KiB of float32 (or float64) per thread.
_LOWRANK_X_BYTES = 1 << 19
# Element-wise passes over fewer elements than this run on one thread (a thread team costs more,
# see the same constant in approxdarts_np.approx.quantize).
_PARALLEL_MIN = 1 << 20

# Outputs are allocated by the NumPy wrappers and filled by the kernels: NumPy asks the kernel
# for huge pages on large buffers, Numba's allocator does not, and the first touch of a fresh
# 32 MiB int64 output (B64 C64 32x32) then costs about half as much.


# ----------------------------------------------------------------------------- kernels (Numba)

@njit(cache=True, parallel=True)
def _im2col_codes_kernel(qx, pad_code, k_h, k_w, s_h, s_w, p_h, p_w, d_h, d_w, out_h, out_w,
                         cols):
    n_img, n_ch, h, wd = qx.shape
    n_taps = k_h * k_w
    for job in prange(n_img * n_ch):
        ni = job // n_ch
        ci = job % n_ch
        plane = qx[ni, ci]
        for i in range(k_h):
            for j in range(k_w):
                dst = cols[ni, ci * n_taps + i * k_w + j]
                for oh in range(out_h):
                    r = oh * s_h + i * d_h - p_h
                    base = oh * out_w
                    if r < 0 or r >= h:
                        for ow in range(out_w):
                            dst[base + ow] = pad_code
                        continue
                    src = plane[r]
                    for ow in range(out_w):
                        c = ow * s_w + j * d_w - p_w
                        if c < 0 or c >= wd:
                            dst[base + ow] = pad_code
                        else:
                            dst[base + ow] = src[c]
    return cols


@njit(cache=True)
def _bag_rows(table, qw_taps, rows, lo, hi):
    """rows[k, a, co] = table[a, qw_taps[k, co]] for taps lo..hi (rows has the table's dtype)."""
    n_out = qw_taps.shape[1]
    for k in range(lo, hi):
        w = qw_taps[k]
        for a in range(256):
            src = table[a]
            dst = rows[k, a]
            for co in range(n_out):
                dst[co] = src[w[co]]


@njit(cache=True)
def _bag_rows_serial(table, qw_taps, rows):
    _bag_rows(table, qw_taps, rows, 0, qw_taps.shape[0])


@njit(cache=True, parallel=True)
def _bag_rows_parallel(table, qw_taps, rows, n_blocks):
    for b in prange(n_blocks):
        lo, hi = block_bounds(b, n_blocks, qw_taps.shape[0])
        _bag_rows(table, qw_taps, rows, lo, hi)


@njit(cache=True, parallel=True)
def _lut_bag_kernel(cols, x, x_scale, x_inv, zx, rows, n_out, cst, zw, scale, block, n_threads,
                    out):
    """out[n, co, p] = scale * (sum_k rows[k, cols[n, k, p], co] - zw * sum_k cols[n, k, p]
    + cst[co]), the product taken in float64 and stored in ``out``'s dtype. With ``x``
    (float32, cols' shape; empty otherwise) each job first quantises its pixels of x into
    ``cols`` (scale ``x_scale``, float32 inverse ``x_inv``, zero point ``zx``).

    ``rows`` (K padded to a multiple of 4, 256, n_pad) with n_pad >= n_out a multiple of 8
    (:func:`lut_bag_conv` lays it out, the padding zeros).

    Jobs are (image, block of ``block`` pixels), split into ``n_threads`` contiguous ranges with
    one scratch accumulator each. Sums run in int32 (the caller guarantees K * max|row| <
    2**31), four taps per pass over an accumulator row, taps in increasing order; the result is
    exact, hence independent of the thread count.
    """
    n_img, n_taps, n_pix = cols.shape
    n_pad = rows.shape[2]
    rows_flat = rows.reshape(-1)
    n_blk = (n_pix + block - 1) // block
    n_jobs = n_img * n_blk
    for thread in prange(n_threads):
        acc_buf = np.empty(block * n_pad, np.int32)
        sum_buf = np.empty(block, np.int32)
        near = np.empty(block if x.size else 0, np.uint8)
        lo, hi = block_bounds(thread, n_threads, n_jobs)
        for job in range(lo, hi):
            ni = job // n_blk
            p0 = (job % n_blk) * block
            m = min(n_pix, p0 + block) - p0
            if x.size:
                for k in range(n_taps):
                    codes_plane(x[ni, k, p0:p0 + m], x_scale, x_inv, zx, cols[ni, k, p0:p0 + m],
                                near)
            _bag_block(cols[ni], rows_flat, n_out, n_pad, cst, zw, scale, p0, m, acc_buf,
                       sum_buf, out[ni])
    return out


@intrinsic
def _bag_add8(typingctx, acc, oa, rows_flat, o0, o1, o2, o3):
    """acc[oa + j] += rows_flat[o0 + j] + rows_flat[o1 + j] + rows_flat[o2 + j] +
    rows_flat[o3 + j] for j < 8, as one 8-lane vector add (``acc`` int32, ``rows_flat``
    uint16 or int32, offsets in elements; no bounds checks).

    Written as vector IR because LLVM left the plain loop scalar: its trip count (the
    output channels, 8 or 16 in the searched cells) is below the vector loop's, and an
    unrolled eight-statement version was not combined either (``acc`` might alias the rows).
    """
    sig = types.void(acc, oa, rows_flat, o0, o1, o2, o3)

    def codegen(context, builder, signature, args):
        acc_arr = context.make_array(signature.args[0])(context, builder, args[0])
        rows_arr = context.make_array(signature.args[2])(context, builder, args[2])
        elem = context.get_value_type(signature.args[2].dtype)
        v32 = ir.VectorType(ir.IntType(32), 8)
        vrow = ir.VectorType(elem, 8)

        def vload(arr, offset, vtype):
            ptr = builder.bitcast(builder.gep(arr.data, [offset]), vtype.as_pointer())
            return builder.load(ptr, align=1)

        total = vload(acc_arr, args[1], v32)
        for offset in args[3:]:
            row = vload(rows_arr, offset, vrow)
            if vrow != v32:
                row = builder.zext(row, v32)
            total = builder.add(total, row)
        ptr = builder.bitcast(builder.gep(acc_arr.data, [args[1]]), v32.as_pointer())
        builder.store(total, ptr, align=1)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True)
def _bag_block(cols, rows_flat, n_out, n_pad, cst, zw, scale, p0, m, acc_buf, sum_buf, out):
    """One job of :func:`_lut_bag_kernel`: pixels p0 .. p0+m of one image (cols (K, P)).

    ``rows_flat`` holds rows of ``n_pad`` values (n_out rounded up to whole runs of 8, the
    padding zeros), added 8 output channels at a time (:func:`_bag_add8`); the padding lanes
    are summed and dropped. Four taps per pass over the accumulator (one more zero row
    stands in for missing taps when K is not a multiple of 4).
    """
    n_taps = cols.shape[0]
    acc = acc_buf[:m * n_pad]
    code_sum = sum_buf[:m]
    acc[:] = 0
    code_sum[:] = 0
    for k in range(n_taps):
        xk = cols[k, p0:p0 + m]
        for q in range(m):
            code_sum[q] += np.int32(xk[q])
    for k in range(0, n_taps, 4):
        x0 = cols[k, p0:p0 + m]
        x1 = cols[min(k + 1, n_taps - 1), p0:p0 + m]
        x2 = cols[min(k + 2, n_taps - 1), p0:p0 + m]
        x3 = cols[min(k + 3, n_taps - 1), p0:p0 + m]
        b0 = k * 256
        for q in range(m):
            o0 = unsigned((b0 + np.int64(x0[q])) * n_pad)
            o1 = unsigned((b0 + 256 + np.int64(x1[q])) * n_pad)
            o2 = unsigned((b0 + 512 + np.int64(x2[q])) * n_pad)
            o3 = unsigned((b0 + 768 + np.int64(x3[q])) * n_pad)
            oa = unsigned(q * n_pad)
            for cb in range(0, n_pad, 8):
                c = unsigned(cb)
                _bag_add8(acc, oa + c, rows_flat, o0 + c, o1 + c, o2 + c, o3 + c)
    for co in range(n_out):
        dst = out[co]
        c = cst[co]
        for q in range(m):
            v = np.int64(acc[q * n_pad + co]) - zw * np.int64(code_sum[q]) + c
            dst[p0 + q] = np.float64(v) * scale


@njit(cache=True)
def _taps_kernel(table, w, zx, zw, taps):
    """taps[t, a] = table[a, w[t]] - zw*a - zx*w[t] + zx*zw (in taps' dtype)."""
    for t in range(w.shape[0]):
        b = np.int64(w[t])
        base = zx * zw - zx * b
        dst = taps[t]
        for a in range(256):
            dst[a] = np.int64(table[a, b]) - zw * a + base


@njit(cache=True)
def _pad_plane(src, xpad, p_h, p_w, wp):
    """Copy the plane src (H, W) into the flat bordered plane xpad (row stride wp)."""
    h, wd = src.shape
    for r in range(h):
        row = src[r]
        dst = xpad[(r + p_h) * wp + p_w:(r + p_h) * wp + p_w + wd]
        for c in range(wd):
            dst[c] = row[c]


@njit(cache=True)
def _plane_strided(acc, xpad, taps_c, k_h, k_w, s_h, s_w, d_h, d_w, wp, scale, dst):
    """One plane at any stride, one output row at a time: dst[oh, ow] = scale * the sum over taps
    (i, j) of taps_c[i*k_w + j, xpad[(oh*s_h + i*d_h)*wp + ow*s_w + j*d_w]] (summed in ``acc``'s
    dtype, the product taken in float64)."""
    out_h, out_w = dst.shape
    for oh in range(out_h):
        for ow in range(out_w):
            acc[ow] = 0
        for i in range(k_h):
            base = (oh * s_h + i * d_h) * wp
            for j in range(k_w):
                t = taps_c[i * k_w + j]
                off = base + j * d_w
                for ow in range(out_w):
                    acc[ow] += t[xpad[off + ow * s_w]]
        for ow in range(out_w):
            dst[oh, ow] = np.float64(acc[ow]) * scale


@njit(cache=True, parallel=True)
def _lut_depthwise_strided_kernel(qx, taps, zx, k_h, k_w, s_h, s_w, p_h, p_w, d_h, d_w, scale,
                                  n_blocks, out):
    """out[n, c, oh, ow] = scale * sum_{i,j} taps[c, i*k_w + j, xpad[n, c, oh*s_h + i*d_h,
    ow*s_w + j*d_w]] at any stride, one output row at a time (the product taken in float64,
    stored in ``out``'s dtype).

    ``taps`` already holds the zero-point terms; ``xpad`` is the plane bordered with code zx.
    Accumulation in the taps' dtype (int32 when the caller proved it cannot overflow). The
    planes are split into ``n_blocks`` contiguous blocks, one scratch row per block (the count
    comes from the caller: ``get_num_threads()`` inside a kernel stops Numba from caching it).
    """
    n_ch, wp = qx.shape[1], qx.shape[3] + 2 * p_w
    for blk in prange(n_blocks):
        xpad = np.full((qx.shape[2] + 2 * p_h) * wp, zx, np.uint8)
        acc = np.zeros(out.shape[3], taps.dtype)
        start, stop = block_bounds(blk, n_blocks, qx.shape[0] * n_ch)
        for pl in range(start, stop):
            _pad_plane(qx[pl // n_ch, pl % n_ch], xpad, p_h, p_w, wp)
            _plane_strided(acc, xpad, taps[pl % n_ch], k_h, k_w, s_h, s_w, d_h, d_w, wp, scale,
                           out[pl // n_ch, pl % n_ch])
    return out


@njit(cache=True, parallel=True)
def _lowrank_bag_kernel(cols, zx, err_feat_t, w_chunks, cst, chunk_taps, block, n_threads, out):
    """out[n, co, p] = sum over chunks of w_chunks[c] @ X_c (exact integers) + cst[co].

    X_c holds the features of the taps k of chunk c, J = 1 + R rows per tap:
    X_c[(k - c*chunk_taps)*J, q] = code - zx and X_c[(k - c*chunk_taps)*J + 1 + r, q] =
    err_feat_t[r, code], code = cols[n, k, p0 + q]; rows past the last tap are zero (as are the
    matching weight columns). Each chunk's GEMM gives exact integers in the float type (the
    caller checked the bound); they are converted to int64 and added. Jobs (image, pixel block)
    are split into ``n_threads`` contiguous ranges with one scratch each; the GEMM runs
    single-threaded inside this parallel loop.
    """
    n_img, n_taps, n_pix = cols.shape
    n_chunks, n_out, chunk_rows = w_chunks.shape
    n_blk = (n_pix + block - 1) // block
    n_jobs = n_img * n_blk
    for thread in prange(n_threads):
        x_buf = np.empty(n_chunks * chunk_rows * block, err_feat_t.dtype)
        y_buf = np.empty(n_out * block, err_feat_t.dtype)
        lo, hi = block_bounds(thread, n_threads, n_jobs)
        for job in range(lo, hi):
            ni = job // n_blk
            p0 = (job % n_blk) * block
            m = min(n_pix, p0 + block) - p0
            x = x_buf[:n_chunks * chunk_rows * m].reshape((n_chunks, chunk_rows, m))
            y = y_buf[:n_out * m].reshape((n_out, m))
            _lowrank_features(cols[ni], zx, err_feat_t, chunk_taps, p0, m, x)
            for c in range(n_chunks):
                np.dot(w_chunks[c], x[c], y)
                for co in range(n_out):
                    dst = out[ni, co, p0:p0 + m]
                    yc = y[co]
                    if c == 0:
                        base = cst[co]
                        for q in range(m):
                            dst[q] = np.int64(yc[q]) + base
                    else:
                        for q in range(m):
                            dst[q] += np.int64(yc[q])
    return out


@njit(cache=True)
def _lowrank_features(cols, zx, err_feat_t, chunk_taps, p0, m, x):
    """Fill x (n_chunks, chunk_taps*J, m) with the features of pixels p0 .. p0+m (cols (K, P)).

    Rows past the last tap are zeroed.
    """
    n_taps = cols.shape[0]
    n_err = err_feat_t.shape[0]
    n_feat = 1 + n_err
    n_chunks, chunk_rows = x.shape[0], x.shape[1]
    shift = err_feat_t.dtype.type(zx)
    for k in range(n_taps):
        c = k // chunk_taps
        r0 = (k - c * chunk_taps) * n_feat
        codes = cols[k, p0:p0 + m]
        dst = x[c, r0]
        for q in range(m):
            dst[q] = codes[q] - shift
        for r in range(n_err):
            f = err_feat_t[r]
            dst = x[c, r0 + 1 + r]
            for q in range(m):
                dst[q] = f[codes[q]]
    used = (n_taps - (n_chunks - 1) * chunk_taps) * n_feat
    for r in range(used, chunk_rows):
        x[n_chunks - 1, r, :] = 0


@njit(cache=True)
def _feature_sum_rows(y, n_feat, cst, scale, out, lo, hi):
    """Rows lo..hi of (image, channel): out[n, c] = (cst[c] + sum_j y[n, c*J + j]) * scale.

    The sum is taken in float64: every term is an integer below 2**53, so it is exact.
    """
    n_ch, n_pix = out.shape[1], out.shape[2]
    acc = np.empty(n_pix, np.float64)
    for job in range(lo, hi):
        ni = job // n_ch
        c = job % n_ch
        base = np.float64(cst[c])
        for p in range(n_pix):
            acc[p] = base
        for j in range(n_feat):
            src = y[ni, c * n_feat + j]
            for p in range(n_pix):
                acc[p] += np.float64(src[p])
        dst = out[ni, c]
        for p in range(n_pix):
            dst[p] = acc[p] * scale
    return out


@njit(cache=True)
def _feature_sum_serial(y, n_feat, cst, scale, out):
    return _feature_sum_rows(y, n_feat, cst, scale, out, 0, out.shape[0] * out.shape[1])


@njit(cache=True, parallel=True)
def _feature_sum_parallel(y, n_feat, cst, scale, out, n_blocks):
    n_rows = out.shape[0] * out.shape[1]
    for b in prange(n_blocks):
        lo, hi = block_bounds(b, n_blocks, n_rows)
        _feature_sum_rows(y, n_feat, cst, scale, out, lo, hi)
    return out


@njit(cache=True)
def _code_features_rows(codes, table_t, feats, lo, hi):
    """Planes lo..hi: feats[p, j, i] = table_t[j, codes[p, i]]."""
    for p in range(lo, hi):
        src = codes[p]
        for j in range(table_t.shape[0]):
            col = table_t[j]
            dst = feats[p, j]
            for i in range(src.shape[0]):
                dst[i] = col[src[i]]
    return feats


@njit(cache=True)
def _code_features_serial(codes, table_t, feats):
    return _code_features_rows(codes, table_t, feats, 0, codes.shape[0])


# Serial twins of the parallel kernels, for calls too small to wake the thread team
# (kernels._util.SERIAL_BELOW).
_im2col_codes_kernel_serial = serial_twin(_im2col_codes_kernel)
_lut_bag_kernel_serial = serial_twin(_lut_bag_kernel)
_lut_depthwise_strided_kernel_serial = serial_twin(_lut_depthwise_strided_kernel)


# ----------------------------------------------------------------------------- public API

def table_peak(table):
    """An upper bound of |table| (the dtype's for uint16 tables, which all EvoApprox tables are)."""
    if table.dtype == np.uint16:
        return 65535
    return int(np.abs(table.astype(np.int64)).max()) if table.size else 0


def _check_table(table):
    if (not isinstance(table, np.ndarray) or table.shape != (256, 256)
            or table.dtype not in (np.uint16, np.int32)):
        raise ValueError("table must be a (256, 256) uint16 or int32 array, got "
                         f"{getattr(table, 'dtype', type(table).__name__)} "
                         f"{getattr(table, 'shape', '')}")
    return np.ascontiguousarray(table)


def _transposed(table, table_t):
    """``table_t`` checked against ``table``'s dtype and shape, or ``table`` transposed."""
    if table_t is None:
        return np.ascontiguousarray(table.T)
    if (not isinstance(table_t, np.ndarray) or table_t.shape != (256, 256)
            or table_t.dtype != table.dtype):
        raise ValueError(f"table_t must be the (256, 256) {table.dtype} transposed table")
    return np.ascontiguousarray(table_t)


def im2col_codes(qx, pad_code, kernel_size, stride=1, padding=0, dilation=1):
    """Return cols (N, C*kh*kw, OH*OW) uint8: cols[n, c*kh*kw + i*kw + j, oh*OW + ow] is the code
    at padded position (oh*s_h + i*d_h, ow*s_w + j*d_w) of qx[n, c]; padding reads ``pad_code``.

    ``kernel_size``, ``stride``, ``padding``, ``dilation`` are ints or (h, w) pairs.
    """
    qx = check_codes(qx, "qx", 4)
    pad_code = check_code_value(pad_code, "pad_code")
    k_h, k_w = as_pair(kernel_size, "kernel_size")
    if k_h < 1 or k_w < 1:
        raise ValueError(f"kernel_size must be >= 1, got {(k_h, k_w)}")
    geom = conv_geometry(stride, padding, dilation)
    out_h, out_w = conv_output_hw(qx.shape[2], qx.shape[3], k_h, k_w, geom)
    s_h, s_w, p_h, p_w, d_h, d_w = geom
    cols = np.empty((qx.shape[0], qx.shape[1] * k_h * k_w, out_h * out_w), np.uint8)
    kernel, _ = pick_kernel(_im2col_codes_kernel, _im2col_codes_kernel_serial, cols.size)
    return kernel(qx, np.uint8(pad_code), k_h, k_w, s_h, s_w, p_h, p_w, d_h, d_w, out_h, out_w,
                  cols)


def lut_bag_conv(cols, zx, qw_cols, zw, table, scale=None, table_t=None):
    """Return out (N, Co, P) int64, the table convolution of code columns with weight codes.

    out[n, co, p] = sum_k ( table[cols[n,k,p], qw_cols[co,k]] - zw*cols[n,k,p] - zx*qw_cols[co,k]
    + zx*zw ). ``cols`` (N, K, P) uint8 (padding already holds zx), ``qw_cols`` (Co, K) uint8,
    ``table`` (256, 256) uint16 or int32. Returns int64, or with ``scale`` (a float)
    float32(out * scale), the product taken in float64. Raises ValueError if K * max|table|
    could overflow the int32 accumulator (split K and add the parts instead). ``table_t``,
    optional, is ``table`` transposed and C-contiguous, for callers that keep one (the byte-
    shuffle kernel builds its per-tap tables from columns; computed here when not given).
    """
    cols = check_codes(cols, "cols", 3)
    qw_cols = check_codes(qw_cols, "qw_cols", 2)
    table = _check_table(table)
    zx = check_code_value(zx, "zx")
    zw = check_code_value(zw, "zw")
    n_img, n_taps, n_pix = cols.shape
    n_out = qw_cols.shape[0]
    if qw_cols.shape[1] != n_taps:
        raise ValueError(f"qw_cols must be (Co, {n_taps}), got {qw_cols.shape}")
    peak = table_peak(table)
    if n_taps * peak + 255 * n_taps >= 2 ** 31:
        raise ValueError(f"K={n_taps} taps with table values up to {peak} could overflow int32")
    out_dtype = np.int64 if scale is None else np.float32
    if n_img == 0 or n_pix == 0 or n_out == 0:
        return np.zeros((n_img, n_out, n_pix), out_dtype)
    # float64 holds the int64 sums exactly (|out| < K * 2**32 < 2**53)
    out = np.empty((n_img, n_out, n_pix), np.float64 if scale is None else np.float32)
    factor = 1.0 if scale is None else float(scale)
    shuffled = None
    if byte_shuffle.available() and n_taps:
        shuffled = byte_shuffle.tap_tables(_transposed(table, table_t), qw_cols, zx, zw,
                                           max_windows=byte_shuffle.column_windows(n_out))
    if shuffled is not None:
        # one table per (output channel, tap): byte planes (VBMI) or nibble windows (AVX2)
        byte_shuffle.columns_lookup(cols, shuffled[0], shuffled[1], factor, out)
        return out.astype(np.int64) if scale is None else out
    _bag_run(cols, qw_cols, zx, zw, table, factor, out)
    return out.astype(np.int64) if scale is None else out


def _bag_run(cols, qw_cols, zx, zw, table, factor, out, x=None, x_scale=1.0, x_inv=1.0):
    """The scalar bag kernel's part of :func:`lut_bag_conv` (operands checked there), into
    ``out``; with ``x`` (float32, cols' shape) it first quantises x into ``cols``."""
    n_img, n_taps, n_pix = cols.shape
    n_out = qw_cols.shape[0]
    # rows padded to whole runs of 8 channels, and to whole groups of 4 taps (zero rows)
    n_pad = -(-n_out // 8) * 8
    rows = np.zeros((-(-n_taps // 4) * 4, 256, n_pad), table.dtype)
    if n_taps and n_out:
        qw_taps = np.ascontiguousarray(qw_cols.T)
        if parallel_pays(rows.size, _PARALLEL_MIN):
            _bag_rows_parallel(table, qw_taps, rows, min(get_num_threads(), n_taps))
        else:
            _bag_rows_serial(table, qw_taps, rows)
    cst = (n_taps * zx * zw - zx * qw_cols.astype(np.int64).sum(axis=1)).astype(np.int64)
    block = max(16, min(n_pix, _BAG_ACC_BYTES // (4 * n_pad)))
    # work in element-equivalents of SERIAL_BELOW, a rough rate (it only decides whether the
    # thread team is woken, never the result)
    work = n_img * n_pix * n_taps * n_out // 16
    kernel, n_threads = pick_kernel(_lut_bag_kernel, _lut_bag_kernel_serial, work)
    n_threads = min(n_threads, n_img * (-(-n_pix // block)))
    x = NO_INPUT_3D if x is None else x
    kernel(cols, x, float(x_scale), np.float32(x_inv), np.uint8(zx), rows, n_out, cst,
           np.int64(zw), factor, block, n_threads, out)


def _packed_rows(table, table_t, qw, zx, zw, geom):
    """``(rows, cst, plan)`` for :func:`~approxdarts_np.kernels.packed_taps.depthwise_packed`
    of a depthwise ``qw`` (C, 1, kh, kw), or None when the table's columns do not fit its
    lanes."""
    n_ch, _, k_h, k_w = qw.shape
    plan = packed_taps.group_plan((k_h, k_w), geom)
    packed = packed_taps.tap_rows(_transposed(table, table_t), qw.reshape(n_ch, k_h * k_w), zx,
                                  zw, plan[0])
    return None if packed is None else packed + (plan,)


def lut_depthwise_conv(qx, zx, qw, zw, table, stride=1, padding=0, dilation=1, scale=None,
                       table_t=None):
    """Return the depthwise table conv of qx (N, C, H, W) with qw (C, 1, kh, kw): (N, C, OH, OW).

    acc[n, c, oh, ow] = sum_{i,j} ( table[xpad, w] - zw*xpad - zx*w + zx*zw ) with
    xpad = qx[n, c] bordered by code zx, w = qw[c, 0, i, j]; ``stride``, ``padding``,
    ``dilation`` are ints or (h, w) pairs. Returns acc as int64, or with ``scale`` (a float)
    float32(acc * scale), the product taken in float64 (the quantised conv's output).
    ``table_t`` as in :func:`lut_bag_conv`.
    """
    qx = check_codes(qx, "qx", 4)
    qw = check_codes(qw, "qw", 4)
    table = _check_table(table)
    zx = check_code_value(zx, "zx")
    zw = check_code_value(zw, "zw")
    n_img, n_ch, h, wd = qx.shape
    if qw.shape[0] != n_ch or qw.shape[1] != 1:
        raise ValueError(f"qw must be ({n_ch}, 1, kh, kw), got {qw.shape}")
    k_h, k_w = qw.shape[2], qw.shape[3]
    geom = conv_geometry(stride, padding, dilation)
    out_h, out_w = conv_output_hw(h, wd, k_h, k_w, geom)
    s_h, s_w, p_h, p_w, d_h, d_w = geom
    out_dtype = np.int64 if scale is None else np.float32
    if n_img * n_ch == 0:
        return np.zeros((n_img, n_ch, out_h, out_w), out_dtype)
    # work in element-equivalents of SERIAL_BELOW, a rough rate (it only decides whether the
    # thread team is woken, never the result)
    work = n_img * n_ch * out_h * out_w * k_h * k_w // 4
    # float64 holds every int32/int64 sum of these kernels exactly (|acc| < 2**53)
    out = np.empty((n_img, n_ch, out_h, out_w), np.float64 if scale is None else np.float32)
    factor = 1.0 if scale is None else float(scale)
    shuffled = None
    if byte_shuffle.available():
        shuffled = byte_shuffle.tap_tables(_transposed(table, table_t),
                                           qw.reshape(n_ch, k_h * k_w), zx, zw)
    if shuffled is not None:
        # 64 lookups per vpermi2b, or 32 per vpshufb of a window (kernels/byte_shuffle.py)
        byte_shuffle.depthwise_lookup(qx, shuffled[0], shuffled[1], zx, (k_h, k_w), geom,
                                      (out_h, out_w), factor, out)
        return out.astype(np.int64) if scale is None else out
    packed = _packed_rows(table, table_t, qw, zx, zw, geom)
    if packed is not None:
        # three taps per 64-bit load, or up to eight per vector (kernels/packed_taps.py)
        packed_taps.depthwise_packed(qx, *packed, zx, (k_h, k_w), geom, (out_h, out_w),
                                     factor, out)
        return out.astype(np.int64) if scale is None else out
    # taps[c, t, a] = M[a, w] - zw*a - zx*w + zx*zw, one 256-entry row per (channel, tap);
    # int32 sums when no sum of k_h*k_w taps can overflow (bound from the table's peak)
    peak = table_peak(table) + 255 * (zw + zx) + zx * zw
    dtype = np.int32 if k_h * k_w * peak < 2 ** 31 else np.int64
    taps = np.empty((n_ch * k_h * k_w, 256), dtype)
    _taps_kernel(table, qw.reshape(n_ch * k_h * k_w), zx, zw, taps)
    taps = taps.reshape(n_ch, k_h * k_w, 256)
    kernel, n_threads = pick_kernel(_lut_depthwise_strided_kernel,
                                    _lut_depthwise_strided_kernel_serial, work)
    kernel(qx, taps, np.uint8(zx), k_h, k_w, s_h, s_w, p_h, p_w, d_h, d_w, factor,
           min(n_img * n_ch, n_threads), out)
    return out.astype(np.int64) if scale is None else out


def lut_conv_codes(x, x_scale, zx, qw, zw, table, stride=1, padding=0, dilation=1,
                   out_scale=1.0, table_t=None):
    """The depthwise or pointwise table conv of float32 x in one pass: ``(y, qx)``, or None.

    The kernel quantises x as it reads it (``qx``: x's uint8 codes with ``x_scale`` and
    ``zx``, exactly the quantisation pass's, kept for backward) and returns y =
    float32(acc * out_scale) with acc as in :func:`lut_depthwise_conv` (``qw`` (C, 1, kh,
    kw)) or :func:`lut_bag_conv` (``qw`` (Co, Ci, 1, 1), stride 1, no padding). The shuffle
    kernels (:mod:`~approxdarts_np.kernels.byte_shuffle`) run it where they take the table's
    columns; otherwise a depthwise convolution runs the packed-tap kernel
    (:mod:`~approxdarts_np.kernels.packed_taps`) and a pointwise one the scalar bag kernel,
    each quantising as it reads. None for another kind of convolution, a depthwise one whose
    columns do not fit the packed lanes, a pointwise one whose int32 sums could overflow, or
    a scale without a normal float32 inverse; the caller then quantises and calls the kernels
    above.
    """
    x = check_float32_4d(x, "x")
    qw = check_codes(qw, "qw", 4)
    table = _check_table(table)
    zx = check_code_value(zx, "zx")
    zw = check_code_value(zw, "zw")
    inv = float32_inverse(float(x_scale)) if float(x_scale) > 0 else None
    if inv is None:
        return None
    n_img, n_ch, h, wd = x.shape
    n_out, n_in_g, k_h, k_w = qw.shape
    geom = conv_geometry(stride, padding, dilation)
    depthwise = n_in_g == 1 and n_out == n_ch
    pointwise = n_in_g == n_ch and (k_h, k_w) == (1, 1) and geom[:4] == (1, 1, 0, 0)
    if not (depthwise or pointwise) or n_img * n_ch * n_out == 0:
        return None
    out_h, out_w = conv_output_hw(h, wd, k_h, k_w, geom)
    taps = packed = None
    if byte_shuffle.available():
        windows = 3 if depthwise else byte_shuffle.column_windows(n_out)
        taps = byte_shuffle.tap_tables(_transposed(table, table_t),
                                       qw.reshape(n_out, n_in_g * k_h * k_w), zx, zw,
                                       max_windows=windows)
    if taps is None and depthwise:
        packed = _packed_rows(table, table_t, qw, zx, zw, geom)
        if packed is None:
            return None
    if taps is None and not depthwise and n_ch * (table_peak(table) + 255) >= 2 ** 31:
        return None             # the scalar bag's int32 sums: the caller splits the taps
    qx = np.empty(x.shape, np.uint8)
    out = np.empty((n_img, n_out, out_h, out_w), np.float32)
    if packed is not None:
        packed_taps.depthwise_packed(qx, *packed, zx, (k_h, k_w), geom, (out_h, out_w),
                                     float(out_scale), out, x=x, x_scale=float(x_scale),
                                     x_inv=inv)
        return out, qx
    if depthwise:
        byte_shuffle.depthwise_lookup(qx, taps[0], taps[1], zx, (k_h, k_w), geom,
                                      (out_h, out_w), float(out_scale), out, x=x,
                                      x_scale=float(x_scale), x_inv=inv)
        return out, qx
    # pointwise: (N, C, H*W) views
    n_pix = h * wd
    flat = (qx.reshape(n_img, n_ch, n_pix), out.reshape(n_img, n_out, n_pix),
            x.reshape(n_img, n_ch, n_pix))
    if taps is not None:
        byte_shuffle.columns_lookup(flat[0], taps[0], taps[1], float(out_scale), flat[1],
                                    x=flat[2], x_scale=float(x_scale), x_inv=inv, zx=zx)
    else:
        _bag_run(flat[0], qw.reshape(n_out, n_ch), zx, zw, table, float(out_scale), flat[1],
                 x=flat[2], x_scale=float(x_scale), x_inv=inv)
    return out, qx


def lowrank_bag_conv(cols, zx, err_feat_t, w_chunks, cst, chunk_taps):
    """Return out (N, Co, P) int64 = sum over tap chunks of the GEMM of gathered code features.

    ``cols`` (N, K, P) uint8; each code has J = 1 + R features, ``code - zx`` then
    ``err_feat_t[:, code]`` (``err_feat_t`` (R, 256) float32/float64); ``w_chunks``
    (n_chunks, Co, chunk_taps*J), same float dtype, the weight features of each chunk of
    ``chunk_taps`` consecutive taps (tap-major, feature-minor, zero past K); ``cst`` (Co,) int64
    is added to every pixel. Every chunk product must be an exact integer in the float type (the
    caller's bound); call with BLAS limited to one thread (the GEMMs run inside Numba threads).
    """
    cols = check_codes(cols, "cols", 3)
    zx = check_code_value(zx, "zx")
    n_img, n_taps, n_pix = cols.shape
    n_feat = 1 + err_feat_t.shape[0]
    n_chunks, n_out, chunk_rows = w_chunks.shape
    if (err_feat_t.dtype != w_chunks.dtype or err_feat_t.dtype not in (np.float32, np.float64)
            or err_feat_t.ndim != 2 or err_feat_t.shape[1] != 256
            or chunk_rows != chunk_taps * n_feat
            or n_chunks != max(1, -(-n_taps // chunk_taps)) or cst.shape != (n_out,)):
        raise ValueError("inconsistent low-rank operands: err_feat_t "
                         f"{err_feat_t.dtype}{err_feat_t.shape}, w_chunks {w_chunks.dtype}"
                         f"{w_chunks.shape}, cst {cst.shape}, K={n_taps}, chunk={chunk_taps}")
    if n_img == 0 or n_pix == 0 or n_out == 0:
        return np.zeros((n_img, n_out, n_pix), np.int64)
    itemsize = err_feat_t.dtype.itemsize
    block = max(16, min(n_pix, _LOWRANK_X_BYTES // (itemsize * max(1, n_chunks * chunk_rows))))
    out = np.empty((n_img, n_out, n_pix), np.int64)
    n_threads = min(get_num_threads(), n_img * (-(-n_pix // block)))
    return _lowrank_bag_kernel(cols, zx, np.ascontiguousarray(err_feat_t),
                               np.ascontiguousarray(w_chunks),
                               np.ascontiguousarray(cst, dtype=np.int64), chunk_taps, block,
                               n_threads, out)


def code_features(codes, table):
    """Return float32 (N, C*J, ...) features ``table[codes]`` of uint8 codes (N, C, ...).

    ``table`` (256, J) float32; channel ``c*J + j`` holds feature j of channel c (the layout of
    :func:`approxdarts_np.approx.quantize.quantize_to_features`).
    """
    if not isinstance(codes, np.ndarray) or codes.dtype != np.uint8 or codes.ndim < 2:
        raise ValueError("codes must be a uint8 array (N, C, ...), got "
                         f"{getattr(codes, 'dtype', type(codes).__name__)} "
                         f"{getattr(codes, 'shape', '')}")
    table = np.asarray(table)
    if table.dtype != np.float32 or table.ndim != 2 or table.shape[0] != 256:
        raise ValueError(f"table must be (256, J) float32, got {table.dtype} {table.shape}")
    n_feat = table.shape[1]
    planes = codes.shape[0] * codes.shape[1]
    c2 = np.ascontiguousarray(codes).reshape(planes, -1)
    feats = np.empty((planes, n_feat, c2.shape[1]), np.float32)
    _code_features_serial(c2, np.ascontiguousarray(table.T), feats)
    return feats.reshape((codes.shape[0], codes.shape[1] * n_feat) + codes.shape[2:])


def feature_sum(y, n_feat, cst, scale, dtype=np.float32):
    """Return out (N, C, ...) = (cst[c] + sum_j y[:, c*J + j]) * scale, summed in float64.

    ``y`` (N, C*J, ...) holds exact integers (float32 from a convolution of integer features, or
    int64), ``cst`` (C,) integers, ``scale`` a float; ``dtype`` float32 (the quantised conv's
    output: one float64 product rounded once) or float64 (scale 1: the exact integers).
    """
    n_feat = int(n_feat)
    if not isinstance(y, np.ndarray) or y.ndim < 2 or y.dtype not in (np.float32, np.int64):
        raise ValueError("y must be a float32 or int64 array (N, C*J, ...), got "
                         f"{getattr(y, 'dtype', type(y).__name__)} {getattr(y, 'shape', '')}")
    if n_feat < 1 or y.shape[1] % n_feat:
        raise ValueError(f"y has {y.shape[1]} channels, not a multiple of J={n_feat}")
    n_ch = y.shape[1] // n_feat
    cst = np.ascontiguousarray(cst, dtype=np.int64)
    if cst.shape != (n_ch,):
        raise ValueError(f"cst must have shape ({n_ch},), got {cst.shape}")
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    y3 = np.ascontiguousarray(y).reshape(y.shape[0], y.shape[1], -1)
    out = np.empty((y.shape[0], n_ch, y3.shape[2]), dtype)
    if parallel_pays(y.size, _PARALLEL_MIN) and out.shape[0] * n_ch > 1:
        _feature_sum_parallel(y3, n_feat, cst, float(scale), out,
                              min(get_num_threads(), out.shape[0] * n_ch))
    else:
        _feature_sum_serial(y3, n_feat, cst, float(scale), out)
    return out.reshape((y.shape[0], n_ch) + y.shape[2:])
