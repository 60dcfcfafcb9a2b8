"""Table convolutions by byte shuffles: 64-byte ones with AVX-512 VBMI, nibble windows with AVX2.

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

**AVX2** has no 128-entry byte shuffle, only ``vpshufb``: 16 entries per 128-bit half. A
256-entry column split into 16 such slices costs more than the scalar loop, and so does
``vpgatherdd`` (``benchmarks/bench_avx2_lookup.py`` keeps both designs). What the AVX2 path
uses instead is the structure of most approximate multipliers' columns: a column is often a
sum of functions of 4-bit windows of the activation code,

    M[a, w] - zw*a = F0[a & 15] + F1[a >> 4]  (+ F2[(a >> 2) & 15]),

exactly (:func:`_column_windows_kernel` finds the windows once per table; two windows suffice
for every column of an exact multiplier and of mul8u_2P7, three for mul8u_17KS). Each window
is a 16-entry table of two byte planes, one ``vpshufb`` each per 32 codes. A call whose
columns are not all such sums (mul8u_L40: its columns depend on every pair of bits of a) runs
the portable kernels (a depthwise one: :mod:`approxdarts_np.kernels.packed_taps`). The
kernels are the VBMI path's, with the lookup loop swapped (:func:`lookup_twin`). For a
pointwise convolution the portable bag kernel adds a row of n_out products per code, so the
column kernel only takes the windows when n_out is small enough (:func:`column_windows`).

:func:`path` says which kernels run: "vbmi" when Numba compiles for a CPU with AVX-512 BW and
VBMI (the host's features, or those ``NUMBA_CPU_FEATURES`` lists), else "avx2" when it
compiles for AVX2, else "scalar" (the portable kernels: the loops of
:mod:`approxdarts_np.kernels.lut_conv` and, for depthwise convolutions,
:mod:`approxdarts_np.kernels.packed_taps`).
``APPROXDARTS_NP_TABLE_KERNELS`` forces one (a CPU with VBMI runs all three). The kernels here
are only compiled when first called, so importing this module is safe on any CPU.
"""
import os
import types as types_
from functools import lru_cache

import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import cgutils, config, types
from numba.extending import intrinsic

from ._util import (NO_INPUT, NO_INPUT_3D, PLANE_ELEMENTS, block_bounds, channel_job,
                    depthwise_group, image_group, load_planes, pick_kernel, serial_twin,
                    store_planes, tap_offsets, unsigned)
from ..errors import UserError
from .codes import codes_plane

__all__ = ["available", "path", "tap_tables", "depthwise_lookup", "columns_lookup"]

_ENV = "APPROXDARTS_NP_TABLE_KERNELS"
PATHS = ("vbmi", "avx2", "scalar")
# Taps per channel the 16-bit byte sums can take: 257 * 255 < 65536; with a third byte plane
# the int32 total (below taps * 2**24) bounds them.
MAX_TAPS = 257
MAX_TAPS_3 = 127
# Lookups that cost about one element-equivalent of SERIAL_BELOW (kernels/_util.py): a rough
# rate that only decides whether the thread team is woken, never the result.
LOOKUPS_PER_ELEMENT = 8
# The AVX2 column kernel's windows x output channels at which the scalar bag catches up
# (column_windows).
COLUMN_LOOKUPS = 128


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


@lru_cache(maxsize=1)
def _cpu_has_avx2():
    """Whether Numba compiles for a CPU with AVX2 (as :func:`_cpu_has_vbmi` decides)."""
    if config.CPU_FEATURES is not None:
        return "+avx2" in config.CPU_FEATURES.split(",")
    from llvmlite import binding

    try:
        feats = binding.get_host_cpu_features()
    except Exception:
        return False
    return bool(feats.get("avx2"))


_CAN_RUN = {"vbmi": _cpu_has_vbmi, "avx2": _cpu_has_avx2}


def path():
    """The table-kernel path calls take now: "vbmi", "avx2" (the shuffles here) or "scalar".

    The best this CPU has, unless ``APPROXDARTS_NP_TABLE_KERNELS`` names one (read on every
    call, so tests and benchmarks can force each path the CPU can run: a CPU with VBMI runs all
    three). Naming a path the CPU cannot run, or no path, is a
    :class:`~approxdarts_np.errors.UserError`.
    """
    want = os.environ.get(_ENV, "auto") or "auto"
    if want == "auto":
        return next((p for p in ("vbmi", "avx2") if _CAN_RUN[p]()), "scalar")
    if want not in PATHS:
        raise UserError(f"{_ENV}={want!r}: expected auto, vbmi, avx2 or scalar")
    if want in _CAN_RUN and not _CAN_RUN[want]():
        raise UserError(f"{_ENV}={want}: this CPU (or Numba target) has no "
                        f"{'AVX-512 VBMI' if want == 'vbmi' else 'AVX2'}")
    return want


def available():
    """True when the shuffle kernels here run now (:func:`path` is "vbmi" or "avx2")."""
    return path() != "scalar"


# ----------------------------------------------------------------------------- the shuffle loop

_I64 = ir.IntType(64)
_V8 = ir.VectorType(ir.IntType(8), 64)
_V16 = ir.VectorType(ir.IntType(16), 64)
_V32 = ir.VectorType(ir.IntType(32), 64)


def i64(v):
    """An i64 constant."""
    return ir.Constant(_I64, v)


def vload(builder, base, offset, vtype):
    """Load a ``vtype`` vector from byte pointer ``base`` + ``offset`` (no alignment assumed)."""
    ptr = builder.bitcast(builder.gep(base, [offset]), vtype.as_pointer())
    return builder.load(ptr, align=1)


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

            def chunks(first, count):
                """Emit the taps loop for chunks first .. first + count - 1 (count 1 or 2)."""
                starts = [builder.mul(builder.add(first, i64(u)), i64(64))
                          for u in range(count)]
                for u in range(count):
                    for var in sums[u]:
                        builder.store(ir.Constant(_V16, None), var)
                with cgutils.for_range(builder, n_taps) as tap:
                    off = builder.load(builder.gep(offs_data, [tap.index]))
                    codes = [vload(builder, x_base, builder.add(off, st), _V8) for st in starts]
                    upper = [builder.icmp_signed("<", c, ir.Constant(_V8, None)) for c in codes]
                    row = builder.gep(t_base, [builder.mul(tap.index, i64(256 * n_planes))])
                    for p in range(n_planes):
                        t = [vload(builder, row, i64(256 * p + 64 * k), _V8) for k in range(4)]
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

            n_pairs = builder.udiv(n_arg, i64(2))
            with cgutils.for_range(builder, n_pairs) as pair:
                chunks(builder.mul(pair.index, i64(2)), 2)
            with builder.if_then(builder.icmp_unsigned("!=", builder.urem(n_arg, i64(2)),
                                                       i64(0))):
                chunks(builder.sub(n_arg, i64(1)), 1)
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


# ----------------------------------------------------------------------------- the AVX2 loop

_V8_32 = ir.VectorType(ir.IntType(8), 32)
_V8_16 = ir.VectorType(ir.IntType(8), 16)
_V16_16 = ir.VectorType(ir.IntType(16), 16)
_V32_16 = ir.VectorType(ir.IntType(32), 16)
_V32_32 = ir.VectorType(ir.IntType(32), 32)
# The nibble windows of a code a, in the order of the tables: a & 15, a >> 4, (a >> 2) & 15.
WINDOW_SHIFTS = (0, 4, 2)


def pshufb(builder):
    """The AVX2 ``vpshufb`` of 32 bytes, ``f(table, index)``, declared in ``builder``'s module."""
    return cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(_V8_32, [_V8_32, _V8_32]), "llvm.x86.avx2.pshuf.b")


def _nibble_intrinsic(n_windows):
    """The AVX2 loop for tables of ``n_windows`` nibble windows, as a Numba intrinsic
    ``f(xbuf, offs, tabs, acc, n_chunks)`` with the contract of the shuffle loop:

        acc[64 k + l] = sum_t T_t[xbuf[offs[t] + 64 k + l]]   for k < n_chunks, l < 64,

    where now T_t(a) = sum_w F_t,w[(a >> WINDOW_SHIFTS[w]) & 15]. ``tabs`` holds, per tap t,
    ``n_windows`` x 2 x 16 bytes: per window the low bytes of F_t,w[0..15], then the high bytes.
    With three windows one byte per tap follows the taps' tables: the third window is looked up
    only for taps whose byte is not 0 (the others' third window is all zero; taps that need it
    are few, e.g. a quarter of mul8u_17KS's columns). Per 32 codes, per tap and per window,
    ``vpshufb`` looks each byte plane up (the 16 entries sit in both 128-bit halves); a
    looked-up byte vector read as 16-bit lanes holds an even code's byte in the low half and the
    next code's in the high half, so the even and odd codes' bytes add into two 16-bit sums per
    plane with one mask and one shift. The sums are joined as
    low + (high << 8) in int32 and interleaved back into code order when the taps are done.
    """
    @intrinsic
    def lookup(typingctx, xbuf, offs, tabs, acc, n_chunks):
        sig = types.void(xbuf, offs, tabs, acc, n_chunks)

        def codegen(context, builder, signature, args):
            x_base, offs_data, n_taps, t_base, a_base, n_arg = lookup_operands(
                context, builder, signature, args)
            shuffle = pshufb(builder)
            # sums[plane][parity]
            sums = [[cgutils.alloca_once(builder, _V16_16) for _ in range(2)] for _ in range(2)]
            nibble = ir.Constant(_V8_32, [15] * 32)
            low_byte = ir.Constant(_V16_16, [255] * 16)
            eight = ir.Constant(_V16_16, [8] * 16)
            both_halves = ir.Constant(ir.VectorType(ir.IntType(32), 32), list(range(16)) * 2)
            interleave = ir.Constant(ir.VectorType(ir.IntType(32), 32),
                                     [i // 2 + 16 * (i % 2) for i in range(32)])

            with cgutils.for_range(builder, builder.mul(n_arg, i64(2))) as half:
                start = builder.mul(half.index, i64(32))
                for plane in sums:
                    for var in plane:
                        builder.store(ir.Constant(_V16_16, None), var)
                with cgutils.for_range(builder, n_taps) as tap:
                    off = builder.load(builder.gep(offs_data, [tap.index]))
                    codes = vload(builder, x_base, builder.add(off, start), _V8_32)
                    row = builder.gep(t_base, [builder.mul(tap.index, i64(32 * n_windows))])

                    def window(w):
                        index = codes
                        if WINDOW_SHIFTS[w]:
                            shift = ir.Constant(_V8_32, [WINDOW_SHIFTS[w]] * 32)
                            index = builder.lshr(codes, shift)
                        if WINDOW_SHIFTS[w] != 4:
                            index = builder.and_(index, nibble)
                        for p in range(2):
                            t16 = vload(builder, row, i64(32 * w + 16 * p), _V8_16)
                            t32 = builder.shuffle_vector(t16, t16, both_halves)
                            pairs = builder.bitcast(builder.call(shuffle, [t32, index]), _V16_16)
                            for parity, part in enumerate((builder.and_(pairs, low_byte),
                                                           builder.lshr(pairs, eight))):
                                var = sums[p][parity]
                                builder.store(builder.add(builder.load(var), part), var)
                    for w in range(2):
                        window(w)
                    if n_windows == 3:
                        flag = builder.load(builder.gep(t_base, [builder.add(
                            builder.mul(n_taps, i64(96)), tap.index)]))
                        with builder.if_then(builder.icmp_unsigned("!=", flag,
                                                                   ir.Constant(ir.IntType(8), 0))):
                            window(2)
                joined = []
                for parity in range(2):
                    low = builder.zext(builder.load(sums[0][parity]), _V32_16)
                    high = builder.zext(builder.load(sums[1][parity]), _V32_16)
                    shifted = builder.shl(high, ir.Constant(_V32_16, [8] * 16))
                    joined.append(builder.add(low, shifted))
                total = builder.shuffle_vector(joined[0], joined[1], interleave)
                dst = builder.bitcast(builder.gep(a_base, [start]), _V32_32.as_pointer())
                builder.store(total, dst, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return lookup


_nibble2 = _nibble_intrinsic(2)
_nibble3 = _nibble_intrinsic(3)


@njit(cache=True, inline="always")
def _nibble_chunks(xbuf, offs, tabs, acc, n_chunks):
    """The AVX2 loop for ``tabs`` of 2 or 3 nibble windows (its length tells which: 64 or 97
    bytes per tap)."""
    if tabs.shape[0] == offs.shape[0] * 64:
        _nibble2(xbuf, offs, tabs, acc, n_chunks)
    else:
        _nibble3(xbuf, offs, tabs, acc, n_chunks)


def _nibbles(tabs, n_taps):
    """Whether ``tabs`` (from :func:`tap_tables`) holds nibble windows (the AVX2 loop) rather
    than byte planes (the VBMI loop): at most 3 x 32 + 1 bytes per tap against at least 512."""
    return tabs.shape[1] <= 97 * n_taps


def lookup_twin(kernel, lookup, suffix):
    """``kernel`` (a Numba function calling ``_lookup_chunks``) compiled with ``lookup`` in its
    place, under the name ``<kernel>_<suffix>`` (so that the two have their own entries in
    Numba's on-disk cache). Only the loop differs: the kernels are written once for both
    paths."""
    f = kernel.py_func
    name = f"{f.__name__}_{suffix}"
    scope = dict(f.__globals__, _lookup_chunks=lookup)
    code = f.__code__.replace(co_name=name, co_qualname=f"{f.__code__.co_qualname}_{suffix}")
    twin = types_.FunctionType(code, scope, name, f.__defaults__, f.__closure__)
    twin.__qualname__ = f"{f.__qualname__}_{suffix}"
    twin.__module__ = f.__module__
    twin.__doc__ = f"{f.__name__} with the {suffix} lookup loop."
    return njit(cache=True, **{k: v for k, v in kernel.targetoptions.items()
                               if k not in ("nopython",)})(twin)


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


@njit(cache=True)
def _column_windows_kernel(table_t, f, need):
    """Split every column M[:, b] of the transposed table into nibble windows: f[b, k] (16
    values each) and need[b], the windows it takes (2 or 3; 0: it is no sum of them).

    Written with the 2-bit digits of a = (d3 d2 d1 d0), two windows are M[a, b] = F0[d1 d0] +
    F1[d3 d2] and three add F2[d2 d1]. Every such sum can be shifted so that F1[0] = 0 (two
    windows), or F0[d1 0] = 0 and F1[0 d2] = 0 (three); that fixes the windows from the codes
    a < 16, a = 16h and a = 4m, and the column is a sum of windows exactly when these are its
    value at every code. The zero-point term -zw*a = -zw*(d1 d0) - 16*zw*(d3 d2) adds to F0 and
    F1, so a column needs the same windows for every zw.
    """
    v = np.empty(256, np.int64)
    for b in range(256):
        col = table_t[b]
        for a in range(256):
            v[a] = np.int64(col[a])
        need[b] = 0
        for n_windows in (2, 3):
            fb = f[b]
            fb[2, :] = 0
            if n_windows == 2:
                for i in range(16):
                    fb[0, i] = v[i]
                    fb[1, i] = v[16 * i] - v[0]
            else:
                for i in range(16):
                    fb[2, i] = v[4 * i]
                for i in range(16):
                    fb[0, i] = v[i] - fb[2, i >> 2]
                    fb[1, i] = v[16 * i] - fb[2, (i & 3) << 2]
            exact = True
            for a in range(256):
                if fb[0, a & 15] + fb[1, a >> 4] + fb[2, (a >> 2) & 15] != v[a]:
                    exact = False
                    break
            if exact:
                need[b] = n_windows
                break


_WINDOWS: dict = {}


def column_windows_of(table_t):
    """``(f, need)`` of :func:`_column_windows_kernel` for a transposed table, computed once per
    read-only table array (the plans' tables are; the last 16 are kept). A writable array could
    change between calls under the same identity, so its windows are computed on every call."""
    hit = _WINDOWS.get(id(table_t))
    if hit is not None and hit[0] is table_t:
        return hit[1], hit[2]
    f = np.zeros((256, 3, 16), np.int64)
    need = np.zeros(256, np.int64)
    _column_windows_kernel(table_t, f, need)
    if table_t.flags.writeable:
        return f, need
    if len(_WINDOWS) >= 16:
        _WINDOWS.pop(next(iter(_WINDOWS)))
    _WINDOWS[id(table_t)] = (table_t, f, need)
    return f, need


@njit(cache=True)
def _nibble_tables_kernel(f, need, w, zx, zw, n_windows, tabs, cst):
    """Fill tabs[c] (taps x n_windows x 32 bytes: per window the low bytes of its 16 values,
    then the high bytes; with three windows one more byte per tap after them, 1 where the tap's
    column needs the third window) and cst[c] from the windows f and the window counts ``need``
    (:func:`_column_windows_kernel`) of the columns w[c, t] less the zero-point term; return the
    first channel with a window that spreads over 2**16 or more, or -1."""
    n_ch, n_taps = w.shape
    width = 32 * n_windows
    for c in range(n_ch):
        total = np.int64(0)
        for t in range(n_taps):
            b = np.int64(w[c, t])
            if n_windows == 3:
                tabs[c, n_taps * width + t] = np.uint8(need[b] == 3)
            for k in range(n_windows):
                ramp = zw if k == 0 else (16 * zw if k == 1 else 0)
                lo = f[b, k, 0]
                hi = lo
                for i in range(16):
                    val = f[b, k, i] - ramp * i
                    lo = min(lo, val)
                    hi = max(hi, val)
                if hi - lo >= 65536:
                    return c
                base = t * width + 32 * k
                for i in range(16):
                    d = f[b, k, i] - ramp * i - lo
                    tabs[c, base + i] = np.uint8(d & 255)
                    tabs[c, base + 16 + i] = np.uint8(d >> 8)
                total += lo
            total += -zx * b + zx * zw
        cst[c] = total
    return -1


def column_windows(n_out):
    """The most nibble windows for which the AVX2 column kernel beats the scalar kernel (the
    bag, which adds a row of n_out products per code) in a convolution with ``n_out`` output
    channels: the nibble loop's work grows with windows x n_out, the bag's far slower
    (``benchmarks/bench_avx2_lookup.py``). 0: take the scalar kernel."""
    return min(3, COLUMN_LOOKUPS // max(n_out, 1))


def tap_tables(table_t, qw_taps, zx, zw, kind=None, max_windows=3):
    """``(tabs, cst)`` for weight codes ``qw_taps`` (C, T): T taps for each output channel c.

    ``table_t`` is the product table transposed (``table_t[b, a] = M[a, b]``, C-contiguous, so
    a weight code's column is one row). For the "vbmi" path ``tabs`` (C, T*P*256) uint8 holds
    the P = 2 byte planes of T[c, t, :] (3 when some column's spread needs 24 bits); for the
    "avx2" path (C, T*64) the 2 nibble windows of every column, or (C, T*97) 3 and a byte per
    tap saying whether its column needs the third (:func:`_column_windows_kernel`). ``cst``
    (C,) int64 is the per-channel constant (module docstring). ``kind`` is the path,
    :func:`path` when None; ``max_windows`` caps W. None when a column does not fit the path's
    tables (a spread over 24 bits; no sum of ``max_windows`` nibble windows, or a window spread
    over 16 bits) or there are more taps than the 16-bit byte sums and the int32 total allow
    (:data:`MAX_TAPS` with two planes, :data:`MAX_TAPS_3` with three, ``MAX_TAPS // W`` with W
    windows); the caller then runs its portable kernels.
    """
    n_ch, n_taps = qw_taps.shape
    cst = np.empty(n_ch, np.int64)
    if (path() if kind is None else kind) == "avx2":
        f, need = column_windows_of(table_t)
        needs = need[qw_taps]
        if needs.size and needs.min() == 0:
            return None                     # a column that is no sum of windows
        n_windows = int(needs.max()) if needs.size else 2
        if n_windows > max_windows or n_taps > MAX_TAPS // n_windows:
            return None
        tabs = np.empty((n_ch, n_taps * (n_windows * 32 + (n_windows == 3))), np.uint8)
        if _nibble_tables_kernel(f, need, qw_taps, zx, zw, n_windows, tabs, cst) >= 0:
            return None
        return tabs, cst
    for n_planes, limit in ((2, MAX_TAPS), (3, MAX_TAPS_3)):
        if n_taps > limit:
            return None
        tabs = np.empty((n_ch, n_taps * n_planes * 256), np.uint8)
        if _tap_tables_kernel(table_t, qw_taps, zx, zw, n_planes, tabs, cst) < 0:
            return tabs, cst
    return None


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
            ci, n0, n1 = channel_job(job, n_groups, group, n_img)
            load_planes(qx, x, x_scale, x_inv, zx, near, buf, ci, n0, n1, p_h, p_w, s_h, s_w,
                        rows * wq, wq, hq)
            _lookup_chunks(buf, offs, tabs[ci], acc, n_chunks)
            store_planes(acc, np.int64(cst[ci]), scale, out, ci, n0, n1, hq, wq)
    return out


_depthwise_kernel_serial = serial_twin(_depthwise_kernel)
_depthwise_kernel_avx2 = lookup_twin(_depthwise_kernel, _nibble_chunks, "avx2")
_depthwise_kernel_avx2_serial = serial_twin(_depthwise_kernel_avx2)


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
    n_img, n_ch = qx.shape[:2]
    group = depthwise_group(qx.shape, geom)
    work = (n_img * n_ch * (out_h * out_w * k_h * k_w // LOOKUPS_PER_ELEMENT
                             + PLANE_ELEMENTS))
    kernels = ((_depthwise_kernel_avx2, _depthwise_kernel_avx2_serial) if _nibbles(tabs, k_h * k_w)
               else (_depthwise_kernel, _depthwise_kernel_serial))
    kernel, n_threads = pick_kernel(*kernels, work)
    n_threads = min(n_threads, n_ch * -(-n_img // group))
    x = NO_INPUT if x is None else x
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
_columns_kernel_avx2 = lookup_twin(_columns_kernel, _nibble_chunks, "avx2")
_columns_kernel_avx2_serial = serial_twin(_columns_kernel_avx2)


def columns_lookup(cols, tabs, cst, scale, out, x=None, x_scale=1.0, x_inv=1.0, zx=0):
    """Run the byte-shuffle column kernel into ``out`` (float32 or float64, (N, Co, P)).

    ``cols`` (N, K, P) uint8 codes (padding positions already hold zx), ``tabs``/``cst`` from
    :func:`tap_tables` of the (Co, K) weight codes. The public entry is
    :func:`approxdarts_np.kernels.lut_conv.lut_bag_conv`. With ``x`` (finite float32, cols'
    shape) the kernel first writes x's codes (``x_scale``, ``x_inv``, zero point ``zx``) into
    ``cols``.
    """
    n_img, _, n_pix = cols.shape
    # images per job: about 1024 codes per table pass (fewer jobs, no short runs)
    group = image_group(n_img, n_pix)
    work = n_img * n_pix * cols.shape[1] * tabs.shape[0] // LOOKUPS_PER_ELEMENT
    kernels = ((_columns_kernel_avx2, _columns_kernel_avx2_serial) if _nibbles(tabs, cols.shape[1])
               else (_columns_kernel, _columns_kernel_serial))
    kernel, n_threads = pick_kernel(*kernels, work)
    n_threads = min(n_threads, -(-n_img // group) * tabs.shape[0])
    x = NO_INPUT_3D if x is None else x
    return kernel(cols, x, float(x_scale), np.float32(x_inv), np.uint8(zx), tabs, cst, scale,
                  group, n_threads, out)
