"""Table convolutions by 64-byte shuffles, for CPUs with AVX-512 VBMI.

The table convolutions (:mod:`approxdarts_np.kernels.lut_conv`) look up one product per
multiply-accumulate, one scalar load each. Each (output channel, tap) pair only reads one
256-entry column of the table, ``M[:, w]``. Stored as two 256-byte planes (low and high byte
of a 16-bit value) such a column fits in eight 512-bit registers, and the VBMI instruction
``vpermi2b`` looks 64 bytes up in 128 at once, so 64 products take four shuffles and two
blends (``benchmarks/bench_avx2_lookup.py --target host`` times this path and the scalar
one side by side).

Two kernels use it: :func:`depthwise_lookup` (one pass per tap over a channel's planes) and
:func:`columns_lookup` (pointwise and im2col'd dense convolutions: one pass per input row and
output channel), each optionally quantising its float input as it reads it.

What is looked up per tap t (channel c, weight code w = qw[c, t]) is

    T[c, t, a] = M[a, w] - zw*a - lo[c, t],    lo[c, t] = min over a of (M[a, w] - zw*a),

which lies in 0..65535 (two byte planes) for most columns, and below 2**24 (three planes) for
every 8-bit table (:func:`tap_tables` takes the third plane only when some column needs it).
The zero-point terms that do not depend on a, and the lo offsets, are one constant per channel:

    acc = sum_t T[c, t, xpad] + sum_t ( lo[c, t] - zx*w + zx*zw ),

the same integer as the scalar kernel's sum, so the outputs are bit-identical (tested on every
bundled table). Per 64 outputs each byte plane is summed in 16-bit lanes (no overflow below
258 taps) and the planes are joined as ``sum_p plane_p << 8p`` in int32 at the end.

Strides: the bordered plane is split into s_h * s_w phase planes (rows r = ph mod s_h, columns
c = pw mod s_w), so a strided convolution reads every phase plane at stride 1 and every tap is,
again, one contiguous run of codes at one offset.

:func:`path` says which kernels run: "vbmi" when Numba compiles for a CPU with AVX-512 BW and
VBMI (the host's features, or those ``NUMBA_CPU_FEATURES`` lists), else "scalar" (the loops of
:mod:`approxdarts_np.kernels.lut_conv`); ``APPROXDARTS_NP_TABLE_KERNELS=scalar`` forces the
scalar kernels on any CPU. The kernels here are only compiled when first called, so importing
this module is safe on any CPU.

On CPUs with AVX2 but no VBMI the scalar loops win: a 16-entry ``vpshufb`` decomposition of
the columns and ``vpgatherdd`` lookups were both measured slower
(``benchmarks/bench_avx2_lookup.py``).
"""
import os
from functools import lru_cache

import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import cgutils, config, types
from numba.extending import intrinsic

from ._util import block_bounds, pick_kernel, serial_twin, tap_offsets, unsigned
from ..errors import UserError
from .codes import codes_plane

__all__ = ["available", "path", "tap_tables", "depthwise_lookup", "columns_lookup"]

_ENV = "APPROXDARTS_NP_TABLE_KERNELS"
PATHS = ("vbmi", "scalar")
# Taps per channel the 16-bit byte sums can take: 257 * 255 < 65536; with a third byte plane
# the int32 total (below taps * 2**24) bounds them.
MAX_TAPS = 257
MAX_TAPS_3 = 127
# Stand-ins for "no float input" (the kernels then read codes that are already there).
_NO_INPUT = np.zeros((0, 0, 0, 0), np.float32)
_NO_INPUT_3D = np.zeros((0, 0, 0), np.float32)
# Lookups that cost about one element-equivalent of SERIAL_BELOW (kernels/_util.py), and the
# fixed cost of a depthwise plane (border copy, output rows) in the same unit: rough rates
# that only decide whether the thread team is woken, never the result.
LOOKUPS_PER_ELEMENT = 8
PLANE_ELEMENTS = 64
# Codes per table pass the kernels aim for (images are grouped to reach it): fewer, longer
# passes over the same per-tap tables.
_GROUP_CODES = 1024


@lru_cache(maxsize=1)
def _cpu_has_vbmi():
    """Whether Numba compiles for a CPU with AVX-512 BW and VBMI.

    Numba compiles for the features ``NUMBA_CPU_FEATURES`` lists when it is set, whatever the
    host has (``NUMBA_CPU_NAME`` alone only changes the tuning), else for the host's.
    """
    if config.CPU_FEATURES is not None:
        return {"+avx512bw", "+avx512vbmi"} <= set(config.CPU_FEATURES.split(","))
    from llvmlite import binding

    try:
        feats = binding.get_host_cpu_features()
    except Exception:   # LLVM cannot tell on this host: take the scalar kernels
        return False
    return bool(feats.get("avx512bw") and feats.get("avx512vbmi"))


def path():
    """The table-kernel path calls take now: "vbmi" (the shuffles here) or "scalar".

    The best this CPU has, unless ``APPROXDARTS_NP_TABLE_KERNELS`` names one (read on every
    call, so tests and benchmarks can force each path the CPU can run). Naming a path the CPU
    cannot run, or no path, is a :class:`~approxdarts_np.errors.UserError`.
    """
    want = os.environ.get(_ENV, "auto") or "auto"
    if want == "auto":
        return "vbmi" if _cpu_has_vbmi() else "scalar"
    if want not in PATHS:
        raise UserError(f"{_ENV}={want!r}: expected auto, vbmi or scalar")
    if want == "vbmi" and not _cpu_has_vbmi():
        raise UserError(f"{_ENV}=vbmi: this CPU (or Numba target) has no AVX-512 VBMI")
    return want


def available():
    """True when the byte-shuffle kernels run now (:func:`path` is "vbmi")."""
    return path() == "vbmi"


# ----------------------------------------------------------------------------- the shuffle loop

_I64 = ir.IntType(64)
_V8 = ir.VectorType(ir.IntType(8), 64)
_V16 = ir.VectorType(ir.IntType(16), 64)
_V32 = ir.VectorType(ir.IntType(32), 64)


def lookup_operands(context, builder, signature, args):
    """In a lookup intrinsic's codegen (arguments ``xbuf, offs, tabs, acc, n_chunks``): the
    byte pointer of xbuf, the data pointer of offs, the tap count, the byte pointer of tabs,
    the int32 pointer of acc and n_chunks."""
    xa, oa, ta, aa = (context.make_array(signature.args[i])(context, builder, args[i])
                      for i in range(4))
    byte_ptr = ir.IntType(8).as_pointer()
    return (builder.bitcast(xa.data, byte_ptr), oa.data, builder.extract_value(oa.shape, 0),
            builder.bitcast(ta.data, byte_ptr), builder.bitcast(aa.data, ir.IntType(32).as_pointer()),
            args[4])


def _lookup_intrinsic(n_planes):
    """The shuffle loop for tables of ``n_planes`` byte planes (2: values below 2**16, 3: below
    2**24), as a Numba intrinsic ``f(xbuf, offs, tabs, acc, n_chunks)``:

        acc[64 k + l] = sum_t T_t[xbuf[offs[t] + 64 k + l]]   for k < n_chunks, l < 64.

    ``tabs`` holds, per tap t, ``n_planes`` x 256 bytes: byte 0 of T_t[0..255], then byte 1,
    ...; ``acc`` is int32 and ``xbuf`` uint8 (read up to offs[t] + 64 * n_chunks, exclusive).
    Per chunk of 64 codes, per tap and per plane: two ``vpermi2b`` look the bytes up in entries
    0..127 and 128..255 and the code's top bit picks one; the bytes add into 16-bit sums (per
    plane), joined as sum_p plane_p << 8p in int32 when the chunk's taps are done. Chunks go
    in pairs (then one alone if the count is odd), so that each tap's table registers serve
    128 codes per load (faster than one chunk at a time).
    """
    @intrinsic
    def lookup(typingctx, xbuf, offs, tabs, acc, n_chunks):
        sig = types.void(xbuf, offs, tabs, acc, n_chunks)

        def codegen(context, builder, signature, args):
            x_base, offs_data, n_taps, t_base, a_base, n_arg = lookup_operands(
                context, builder, signature, args)
            permute = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_V8, [_V8, _V8, _V8]),
                "llvm.x86.avx512.vpermi2var.qi.512")
            sums = [[cgutils.alloca_once(builder, _V16) for _ in range(n_planes)]
                    for _ in range(2)]

            def load(base, offset, vtype):
                ptr = builder.bitcast(builder.gep(base, [offset]), vtype.as_pointer())
                return builder.load(ptr, align=1)

            def const(v):
                return ir.Constant(_I64, v)

            def chunks(first, count):
                """Emit the taps loop for chunks first .. first + count - 1 (count 1 or 2)."""
                starts = [builder.mul(builder.add(first, const(u)), const(64))
                          for u in range(count)]
                for u in range(count):
                    for var in sums[u]:
                        builder.store(ir.Constant(_V16, None), var)
                with cgutils.for_range(builder, n_taps) as tap:
                    off = builder.load(builder.gep(offs_data, [tap.index]))
                    codes = [load(x_base, builder.add(off, st), _V8) for st in starts]
                    upper = [builder.icmp_signed("<", c, ir.Constant(_V8, None)) for c in codes]
                    row = builder.gep(t_base, [builder.mul(tap.index, const(256 * n_planes))])
                    for p in range(n_planes):
                        t = [load(row, const(256 * p + 64 * k), _V8) for k in range(4)]
                        for u in range(count):
                            byte = builder.select(
                                upper[u], builder.call(permute, [t[2], codes[u], t[3]]),
                                builder.call(permute, [t[0], codes[u], t[1]]))
                            var = sums[u][p]
                            builder.store(builder.add(builder.load(var),
                                                      builder.zext(byte, _V16)), var)
                for u in range(count):
                    total = builder.zext(builder.load(sums[u][0]), _V32)
                    for p in range(1, n_planes):
                        part = builder.shl(builder.zext(builder.load(sums[u][p]), _V32),
                                           ir.Constant(_V32, [8 * p] * 64))
                        total = builder.add(total, part)
                    dst = builder.bitcast(builder.gep(a_base, [starts[u]]), _V32.as_pointer())
                    builder.store(total, dst, align=4)

            n_pairs = builder.udiv(n_arg, const(2))
            with cgutils.for_range(builder, n_pairs) as pair:
                chunks(builder.mul(pair.index, const(2)), 2)
            with builder.if_then(builder.icmp_unsigned("!=", builder.urem(n_arg, const(2)),
                                                       const(0))):
                chunks(builder.sub(n_arg, const(1)), 1)
            return context.get_dummy_value()

        return sig, codegen

    return lookup


_lookup2 = _lookup_intrinsic(2)
_lookup3 = _lookup_intrinsic(3)


@njit(cache=True, inline="always")
def _lookup_chunks(xbuf, offs, tabs, acc, n_chunks):
    """The shuffle loop for ``tabs`` of 2 or 3 byte planes (its length tells which)."""
    if tabs.shape[0] == offs.shape[0] * 512:
        _lookup2(xbuf, offs, tabs, acc, n_chunks)
    else:
        _lookup3(xbuf, offs, tabs, acc, n_chunks)


# ----------------------------------------------------------------------------- kernels (Numba)

@njit(cache=True)
def _tap_tables_kernel(table_t, w, zx, zw, n_planes, tabs, cst):
    """Fill tabs[c] (taps x n_planes x 256 bytes) and cst[c] from the transposed table (row b
    holds M[:, b]); return the first channel that does not fit (spread over a of 2**(8 *
    n_planes) or more), or -1.

    The minimum, the maximum and the byte split are loops of their own: fused into one, LLVM
    vectorised none of them.
    """
    n_ch, n_taps = w.shape
    vals = np.empty(256, np.int32)
    ramp = np.arange(256).astype(np.int32) * np.int32(zw)
    width = 256 * n_planes
    for c in range(n_ch):
        total = np.int64(0)
        for t in range(n_taps):
            b = np.int64(w[c, t])
            col = table_t[b]
            for a in range(256):
                vals[unsigned(a)] = np.int32(col[unsigned(a)]) - ramp[unsigned(a)]
            lo = vals[0]
            for a in range(256):
                lo = min(lo, vals[unsigned(a)])
            hi = vals[0]
            for a in range(256):
                hi = max(hi, vals[unsigned(a)])
            if np.int64(hi) - lo >= np.int64(1) << (8 * n_planes):
                return c
            row = tabs[c, unsigned(t * width):unsigned(t * width + width)]
            for a in range(256):
                d = np.uint32(vals[unsigned(a)] - lo)
                row[unsigned(a)] = np.uint8(d)
                row[unsigned(a + 256)] = np.uint8(d >> np.uint32(8))
            if n_planes == 3:
                for a in range(256):
                    row[unsigned(a + 512)] = np.uint8(np.uint32(vals[unsigned(a)] - lo)
                                                      >> np.uint32(16))
            total += np.int64(lo) - zx * b + zx * zw
        cst[c] = total
    return -1


def tap_tables(table_t, qw_taps, zx, zw):
    """``(tabs, cst)`` for weight codes ``qw_taps`` (C, T): T taps for each output channel c.

    ``table_t`` is the product table transposed (``table_t[b, a] = M[a, b]``, C-contiguous, so
    a weight code's column is one row). ``tabs`` (C, T*P*256) uint8 holds the P = 2 byte
    planes of T[c, t, :] (3 when some column's spread needs 24 bits), ``cst`` (C,) int64 the
    per-channel constant (module docstring). None when a column's spread needs more than 24
    bits or there are more taps than the 16-bit byte sums and the int32 total allow
    (:data:`MAX_TAPS` with two planes, :data:`MAX_TAPS_3` with three); the caller then runs its
    scalar kernel.
    """
    n_ch, n_taps = qw_taps.shape
    cst = np.empty(n_ch, np.int64)
    for n_planes, limit in ((2, MAX_TAPS), (3, MAX_TAPS_3)):
        if n_taps > limit:
            return None
        tabs = np.empty((n_ch, n_taps * n_planes * 256), np.uint8)
        if _tap_tables_kernel(table_t, qw_taps, zx, zw, n_planes, tabs, cst) < 0:
            return tabs, cst
    return None


@njit(cache=True)
def _split_plane(src, buf, p_h, p_w, s_h, s_w, plane, wq, row0):
    """Write plane src (H, W) into its phase planes (``plane`` codes each, rows of wq) at the
    border offsets (p_h, p_w), from phase row ``row0`` on.

    Bordered row r goes to row row0 + r // s_h of the phase planes (r % s_h, *), bordered
    column c to column c // s_w of phase plane (*, c % s_w): one contiguous run per row and
    column phase.
    """
    h, wd = src.shape
    if s_w == 1:
        for r in range(h):
            pr = r + p_h
            base = unsigned((pr % s_h) * plane + (row0 + pr // s_h) * wq + p_w)
            row = src[r]
            dst = buf[base:base + unsigned(wd)]
            for c in range(wd):
                dst[unsigned(c)] = row[unsigned(c)]
        return
    for r in range(h):
        pr = r + p_h
        row_base = (pr % s_h) * s_w * plane + (row0 + pr // s_h) * wq
        row = src[r]
        for pw in range(s_w):
            c0 = (pw - p_w) % s_w           # first source column of this column phase
            if c0 >= wd:
                continue
            n_c = (wd - c0 + s_w - 1) // s_w
            base = unsigned(row_base + pw * plane + (c0 + p_w) // s_w)
            dst = buf[base:base + unsigned(n_c)]
            for m in range(n_c):
                dst[unsigned(m)] = row[unsigned(c0 + m * s_w)]


@njit(cache=True, parallel=True)
def _depthwise_kernel(qx, x, x_scale, x_inv, tabs, cst, zx, k_h, k_w, s_h, s_w, p_h, p_w, d_h,
                      d_w, out_h, out_w, scale, group, n_threads, out):
    """out[n, c, oh, ow] = (sum_t T[c, t, x] + cst[c]) * scale, the product in float64.

    Jobs are (channel, group of ``group`` images), split into ``n_threads`` contiguous ranges;
    a job stacks its images' phase planes (hq rows each) in one buffer and looks all of them up
    in one pass per tap (the rows between images are computed and dropped), so small planes
    still give long runs of codes. The buffer is bordered with code zx once per thread; only
    the interiors are rewritten. With ``x`` (float32, qx's shape; empty otherwise) each plane
    is quantised first, into ``qx`` (:func:`~approxdarts_np.kernels.codes.codes_plane`, scale
    ``x_scale``, zero point ``zx``).
    """
    n_img, n_ch, h, wd = qx.shape
    hq = (h + 2 * p_h + s_h - 1) // s_h
    wq = (wd + 2 * p_w + s_w - 1) // s_w
    rows = group * hq
    offs = tap_offsets(k_h, k_w, s_h, s_w, d_h, d_w, wq, rows * wq)
    length = ((group - 1) * hq + out_h - 1) * wq + out_w
    n_chunks = (length + 63) // 64
    size = max(s_h * s_w * rows * wq, offs.max() + n_chunks * 64)
    n_groups = (n_img + group - 1) // group
    n_jobs = n_ch * n_groups
    for thread in prange(n_threads):
        buf = np.full(size, zx, np.uint8)
        acc = np.empty(n_chunks * 64, np.int32)
        near = np.empty(h * wd if x.size else 0, np.uint8)
        lo, hi = block_bounds(thread, n_threads, n_jobs)
        for job in range(lo, hi):
            ci = job // n_groups
            n0 = (job % n_groups) * group
            n1 = min(n_img, n0 + group)
            for ni in range(n0, n1):
                if x.size:
                    codes_plane(x[ni, ci].reshape(h * wd), x_scale, x_inv, zx,
                                qx[ni, ci].reshape(h * wd), near)
                _split_plane(qx[ni, ci], buf, p_h, p_w, s_h, s_w, rows * wq, wq,
                             (ni - n0) * hq)
            _lookup_chunks(buf, offs, tabs[ci], acc, n_chunks)
            k = np.int64(cst[ci])
            for ni in range(n0, n1):
                for oh in range(out_h):
                    dst = out[ni, ci, oh]
                    q0 = ((ni - n0) * hq + oh) * wq
                    row = acc[unsigned(q0):unsigned(q0 + out_w)]
                    for ow in range(out_w):
                        dst[unsigned(ow)] = np.float64(row[unsigned(ow)] + k) * scale
    return out


_depthwise_kernel_serial = serial_twin(_depthwise_kernel)


def depthwise_lookup(qx, tabs, cst, zx, k_size, geom, out_hw, scale, out, x=None, x_scale=1.0,
                     x_inv=1.0):
    """Run the byte-shuffle depthwise kernel into ``out`` (float32 or float64, (N, C, OH, OW)).

    Arguments as checked by :func:`approxdarts_np.kernels.lut_conv.lut_depthwise_conv`, which
    is the public entry. With ``x`` (finite float32, qx's shape) the kernel first writes x's
    codes (scale ``x_scale``, its float32 inverse ``x_inv``, zero point ``zx``) into ``qx``.
    """
    k_h, k_w = k_size
    s_h, s_w, p_h, p_w, d_h, d_w = geom
    out_h, out_w = out_hw
    n_img, n_ch, h, wd = qx.shape
    phase_plane = -(-(h + 2 * p_h) // s_h) * -(-(wd + 2 * p_w) // s_w)
    group = max(1, min(n_img, _GROUP_CODES // phase_plane))
    work = (n_img * n_ch * (out_h * out_w * k_h * k_w // LOOKUPS_PER_ELEMENT
                             + PLANE_ELEMENTS))
    kernel, n_threads = pick_kernel(_depthwise_kernel, _depthwise_kernel_serial, work)
    n_threads = min(n_threads, n_ch * -(-n_img // group))
    x = _NO_INPUT if x is None else x
    return kernel(qx, x, float(x_scale), np.float32(x_inv), tabs, cst, np.uint8(zx), k_h, k_w,
                  s_h, s_w, p_h, p_w, d_h, d_w, out_h, out_w, scale, group, n_threads, out)


@njit(cache=True, parallel=True)
def _columns_kernel(cols, x, x_scale, x_inv, zx, tabs, cst, scale, group, n_threads, out):
    """out[n, co, p] = (sum_k T[co, k, cols[n, k, p]] + cst[co]) * scale, the product in float64.

    Jobs are (group of ``group`` images, output channel), group-major, split into ``n_threads``
    contiguous ranges. A thread copies a group's code rows side by side into a buffer padded to
    whole 64-code chunks (row k holds the group's images one after another; the padding codes'
    sums are computed and dropped) when its jobs reach a new group: small images then still
    give long runs of codes per table. With ``x`` (float32, cols' shape; empty otherwise) a
    thread quantises the group's rows straight into its buffer (as in
    :func:`_depthwise_kernel`), and the thread holding job (group, 0) also writes them into
    ``cols``: two threads that share a group each quantise it, one of them writes the codes.
    """
    n_img, n_taps, n_pix = cols.shape
    n_out = tabs.shape[0]
    n_groups = (n_img + group - 1) // group
    n_chunks = (group * n_pix + 63) // 64
    stride = n_chunks * 64
    offs = np.arange(n_taps) * stride
    n_jobs = n_groups * n_out
    for thread in prange(n_threads):
        buf = np.zeros(n_taps * stride, np.uint8)
        acc = np.empty(stride, np.int32)
        near = np.empty(n_pix if x.size else 0, np.uint8)
        lo, hi = block_bounds(thread, n_threads, n_jobs)
        loaded = -1
        for job in range(lo, hi):
            gi = job // n_out
            co = job % n_out
            n0 = gi * group
            n1 = min(n_img, n0 + group)
            if gi != loaded:
                # the thread holding job (gi, 0) writes the group's codes into cols
                owner = gi * n_out >= lo
                for ni in range(n0, n1):
                    for k in range(n_taps):
                        base = unsigned(k * stride + (ni - n0) * n_pix)
                        seg = buf[base:base + unsigned(n_pix)]
                        row = cols[ni, k]
                        if x.size:
                            codes_plane(x[ni, k], x_scale, x_inv, zx, seg, near)
                            if owner:
                                for q in range(n_pix):
                                    row[unsigned(q)] = seg[unsigned(q)]
                        else:
                            for q in range(n_pix):
                                seg[unsigned(q)] = row[unsigned(q)]
                loaded = gi
            _lookup_chunks(buf, offs, tabs[co], acc, n_chunks)
            k0 = np.int64(cst[co])
            for ni in range(n0, n1):
                src_acc = acc[unsigned((ni - n0) * n_pix):unsigned((ni - n0 + 1) * n_pix)]
                dst_row = out[ni, co]
                for q in range(n_pix):
                    dst_row[unsigned(q)] = np.float64(src_acc[unsigned(q)] + k0) * scale
    return out


_columns_kernel_serial = serial_twin(_columns_kernel)


def columns_lookup(cols, tabs, cst, scale, out, x=None, x_scale=1.0, x_inv=1.0, zx=0):
    """Run the byte-shuffle column kernel into ``out`` (float32 or float64, (N, Co, P)).

    ``cols`` (N, K, P) uint8 codes (padding positions already hold zx), ``tabs``/``cst`` from
    :func:`tap_tables` of the (Co, K) weight codes. The public entry is
    :func:`approxdarts_np.kernels.lut_conv.lut_bag_conv`. With ``x`` (finite float32, cols' shape) the kernel first writes
    x's codes (``x_scale``, ``x_inv``, zero point ``zx``) into ``cols``.
    """
    n_img, _, n_pix = cols.shape
    # images per job: about 1024 codes per table pass (fewer jobs, no short runs)
    group = max(1, min(n_img, _GROUP_CODES // max(n_pix, 1)))
    work = n_img * n_pix * cols.shape[1] * tabs.shape[0] // LOOKUPS_PER_ELEMENT
    kernel, n_threads = pick_kernel(_columns_kernel, _columns_kernel_serial, work)
    n_threads = min(n_threads, -(-n_img // group) * tabs.shape[0])
    x = _NO_INPUT_3D if x is None else x
    return kernel(cols, x, float(x_scale), np.float32(x_inv), np.uint8(zx), tabs, cst, scale,
                  group, n_threads, out)
