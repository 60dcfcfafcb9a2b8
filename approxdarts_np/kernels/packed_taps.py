"""Depthwise table convolutions with several taps per load: any table, any CPU.

The scalar depthwise loop (:mod:`approxdarts_np.kernels.lut_conv`) loads one code and one
product per tap and output. At stride 1 the taps of one kernel row read the same codes,
shifted: output q takes tap j's product at code x[q + j*d]. So one load per code can fetch
the products of several taps at once, when the 256-entry table of a group of S taps holds
them as the lanes of one word,

    P[a] = (V_0[a], ..., V_{S-1}[a]) with V_s in lane S-1-s,    V_s[a] = M[a, w_s] - zw*a.

A running word, shifted down one lane per step,

    r(q) = (r(q - d) shifted down one lane) + P[x[q + (S-1)d]],

then holds in its lowest lane V_0[x[q]] + V_1[x[q + d]] + ... + V_{S-1}[x[q + (S-1)d]]: the
group's sum for output q. Per group and output that is one code load, one table load, a shift,
an add and a lane read, where the scalar loop takes S of each load. Two word kinds:

* chains of at most 3 taps (a 3x3 kernel's rows): three 21-bit lanes of an int64, plain Numba
  integer code. Each lane holds V_s[a] - lo_s, lo_s the smallest value of the column, so that
  it lies in 0..2**17 (M <= 65535 and zw*a <= 65025) and a lane's sum of three, and the sum
  of three words' lanes, stay below 2**21: no lane ever carries into the next. A 3x3 kernel
  is three groups, run in one pass over the output as independent chains (:func:`_chains3`).
* longer chains (a 5x5 kernel's rows): eight int32 lanes of an LLVM vector, the shift a lane
  shuffle (:func:`_lane_intrinsic`; generic vector IR, so any CPU runs it: AVX2 and NEON
  alike). Vector lanes do not carry, so they hold V_s itself. A 5x5 kernel is five groups of
  eight slots, one pass.

Slots past a chain's end hold zero columns. The offsets lo_s and the zero-point terms are one
constant per channel,

    acc = sum over groups of lane 0 + sum_t ( lo_t - zx*w_t + zx*zw )    (lo_t = 0 for vectors),

the integer the scalar kernel sums, so the outputs are bit-identical.

Strides: as in :mod:`approxdarts_np.kernels.byte_shuffle`, the bordered plane is split into
s_h * s_w phase planes, which every tap reads at stride 1. The taps of a kernel row that fall
on one column phase, j = j0, j0 + p, j0 + 2p, ... (p = s_w / gcd(d_w, s_w)), read it at columns
d_w / gcd(d_w, s_w) apart: a chain again, with that step (:func:`group_plan`). At stride 2 a
row of three taps is two chains (taps 0 and 2, tap 1), a row of five two (0, 2, 4 and 1, 3).

Jobs and buffers follow the byte-shuffle kernels too: (channel, group of images), the images'
phase planes stacked in one buffer so that small planes still give long passes; ``x``
(optional) is quantised as it is read.
"""
from math import gcd

import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import cgutils, types
from numba.core.extending import overload
from numba.extending import intrinsic

from ._util import (NO_INPUT, PLANE_ELEMENTS, block_bounds, channel_job, depthwise_group,
                    load_planes, pick_kernel, serial_twin, store_planes, tap_offsets,
                    unsigned)

__all__ = ["group_plan", "tap_rows", "depthwise_packed"]

# int64 words: three lanes of 21 bits (chains of at most WORD_SLOTS taps)
WORD_SLOTS = 3
LANE_BITS = 21
# vectors: eight int32 lanes (longer chains, in groups of LANES slots)
LANES = 8
# A word's column spanning this many values or more, or a vector lane's value this large in
# magnitude, does not fit (only a table with products beyond 16 bits can): the lane-0 sum of
# three words (three slots each, values offset to 0..) must stay below 2**21, a vector lane's
# sum of eight below 2**31 in magnitude.
WORD_RANGE = (1 << LANE_BITS) // (3 * WORD_SLOTS)
VECTOR_RANGE = (1 << 31) // LANES
# Chain steps (one group, one output) that cost about one element-equivalent of SERIAL_BELOW
# (kernels/_util.py): a rough rate that only decides whether the thread team is woken, never
# the result.
_STEPS_PER_ELEMENT = 2


def group_plan(k_size, geom):
    """``(group_taps, step)``: the taps of each group, and the chains' step in the phase planes.

    group_taps (G, S) int64 lists group g's taps (row-major tap indices i*k_w + j) slot by slot,
    -1 for an empty slot (always at the end); S is 3 when no chain has more than 3 taps (int64
    words), else 8 (vector lanes). A chain is the taps of one kernel row on one column phase
    (see the module docstring); a chain longer than S is split into groups of S.
    """
    k_h, k_w = k_size
    s_w, d_w = geom[1], geom[5]
    g = gcd(d_w, s_w)
    period = s_w // g
    slots = WORD_SLOTS if -(-k_w // period) <= WORD_SLOTS else LANES
    rows = []
    for i in range(k_h):
        for j0 in range(min(period, k_w)):
            chain = [i * k_w + j for j in range(j0, k_w, period)]
            for c0 in range(0, len(chain), slots):
                part = chain[c0:c0 + slots]
                rows.append(part + [-1] * (slots - len(part)))
    return np.array(rows, np.int64), d_w // g


@njit(cache=True)
def _column_range(col, zw):
    """The smallest and largest of col[a] - zw*a over the 256 codes (int64)."""
    lo = np.int64(col[0])
    hi = lo
    for a in range(256):
        v = np.int64(col[a]) - zw * a
        lo = min(lo, v)
        hi = max(hi, v)
    return lo, hi


@njit(cache=True)
def _word_rows(table_t, qw_taps, zx, zw, group_taps, rows, cst):
    """Words: rows[c, g, a] = sum over slots s of (M[a, w_s] - zw*a - lo_s) << 21*(2-s) (an
    empty slot adds nothing) and cst; returns the widest column range."""
    widest = np.int64(0)
    for c in range(qw_taps.shape[0]):
        k = np.int64(0)
        for g in range(group_taps.shape[0]):
            dst = rows[c, g]
            for s in range(WORD_SLOTS):
                t = group_taps[g, s]
                if t < 0:
                    continue
                b = np.int64(qw_taps[c, t])
                col = table_t[b]
                lo, hi = _column_range(col, zw)
                widest = max(widest, hi - lo)
                k += lo - zx * b + zx * zw
                shift = LANE_BITS * (WORD_SLOTS - 1 - s)
                if s == 0:
                    for a in range(256):
                        dst[a] = (np.int64(col[a]) - zw * a - lo) << shift
                else:
                    for a in range(256):
                        dst[a] += (np.int64(col[a]) - zw * a - lo) << shift
        cst[c] = k
    return widest


@njit(cache=True)
def _lane_rows(table_t, qw_taps, zx, zw, group_taps, rows, cst):
    """Vectors: rows[c, g, a, 7-s] = M[a, w_s] - zw*a (0 for an empty slot) and cst; returns
    the largest |value|. Vector lanes do not carry into each other, so the values need no
    offset."""
    largest = np.int64(0)
    for c in range(qw_taps.shape[0]):
        k = np.int64(0)
        for g in range(group_taps.shape[0]):
            dst = rows[c, g]
            for s in range(LANES):
                lane = LANES - 1 - s
                t = group_taps[g, s]
                if t < 0:
                    for a in range(256):
                        dst[a, lane] = 0
                    continue
                b = np.int64(qw_taps[c, t])
                col = table_t[b]
                lo, hi = _column_range(col, zw)
                largest = max(largest, max(hi, -lo))
                k += zx * zw - zx * b
                for a in range(256):
                    dst[a, lane] = np.int64(col[a]) - zw * a
        cst[c] = k
    return largest


def tap_rows(table_t, qw_taps, zx, zw, group_taps):
    """``(rows, cst)`` for :func:`depthwise_packed`, or None when a tap's column does not fit
    the lanes (only a table with products beyond 16 bits can: WORD_RANGE values in a column
    of a word, |value| VECTOR_RANGE in a vector lane).

    ``table_t`` the table transposed (``table_t[w, a] = M[a, w]``); ``qw_taps`` (C, kh*kw)
    uint8 weight codes, row-major taps; ``group_taps`` from :func:`group_plan`. rows (C, G,
    256) int64 words for groups of 3 slots, else (C, G, 256, 8) int32 lanes.
    """
    n_g, slots = group_taps.shape
    n_ch = qw_taps.shape[0]
    cst = np.empty(n_ch, np.int64)
    args = (table_t, qw_taps, np.int64(zx), np.int64(zw), group_taps)
    # one thread: waking the team cost more than the tables (a few hundred kB) in a hand timing
    if slots == WORD_SLOTS:
        rows = np.empty((n_ch, n_g, 256), np.int64)
        fits = _word_rows(*args, rows, cst) < WORD_RANGE
    else:
        rows = np.empty((n_ch, n_g, 256, LANES), np.int32)
        fits = _lane_rows(*args, rows, cst) < VECTOR_RANGE
    return (rows, cst) if fits else None


# ----------------------------------------------------------------------------- int64 words

@njit(cache=True)
def _chains3(buf, o0, o1, o2, p0, p1, p2, d, acc, length, first):
    """acc[q] (= if ``first`` else +=) the lane-0 sums of three word groups, q < length: group
    g reads code buf[o_g + q] for output q (its last slot; o_g >= 2d), table p_g (256 words).
    The three words are added before the lane is masked out: their lane-0 sum stays below
    2**21 (WORD_RANGE), so it does not carry either."""
    mask = np.int64((1 << LANE_BITS) - 1)
    for r in range(d):
        c0 = np.int64(0)
        c1 = np.int64(0)
        c2 = np.int64(0)
        for q in range(r - 2 * d, r, d):        # fill the upper lanes
            c0 = (c0 >> LANE_BITS) + p0[buf[unsigned(o0 + q)]]
            c1 = (c1 >> LANE_BITS) + p1[buf[unsigned(o1 + q)]]
            c2 = (c2 >> LANE_BITS) + p2[buf[unsigned(o2 + q)]]
        if first:
            for q in range(r, length, d):
                c0 = (c0 >> LANE_BITS) + p0[buf[unsigned(o0 + q)]]
                c1 = (c1 >> LANE_BITS) + p1[buf[unsigned(o1 + q)]]
                c2 = (c2 >> LANE_BITS) + p2[buf[unsigned(o2 + q)]]
                acc[unsigned(q)] = (c0 + c1 + c2) & mask
        else:
            for q in range(r, length, d):
                c0 = (c0 >> LANE_BITS) + p0[buf[unsigned(o0 + q)]]
                c1 = (c1 >> LANE_BITS) + p1[buf[unsigned(o1 + q)]]
                c2 = (c2 >> LANE_BITS) + p2[buf[unsigned(o2 + q)]]
                acc[unsigned(q)] += (c0 + c1 + c2) & mask


@njit(cache=True)
def _chain1(buf, o0, p0, d, acc, length, first):
    """:func:`_chains3` for one group."""
    mask = np.int64((1 << LANE_BITS) - 1)
    for r in range(d):
        c0 = np.int64(0)
        for q in range(r - 2 * d, r, d):
            c0 = (c0 >> LANE_BITS) + p0[buf[unsigned(o0 + q)]]
        if first:
            for q in range(r, length, d):
                c0 = (c0 >> LANE_BITS) + p0[buf[unsigned(o0 + q)]]
                acc[unsigned(q)] = c0 & mask
        else:
            for q in range(r, length, d):
                c0 = (c0 >> LANE_BITS) + p0[buf[unsigned(o0 + q)]]
                acc[unsigned(q)] += c0 & mask


@njit(cache=True)
def _word_groups(buf, offs, rows_c, d, acc, length):
    """acc[q] = the sum over all word groups (rows_c (G, 256)), three chains per pass."""
    n_g = offs.shape[0]
    g = 0
    while g + 3 <= n_g:
        _chains3(buf, offs[g], offs[g + 1], offs[g + 2], rows_c[g], rows_c[g + 1], rows_c[g + 2],
                 d, acc, length, g == 0)
        g += 3
    while g < n_g:
        _chain1(buf, offs[g], rows_c[g], d, acc, length, g == 0)
        g += 1


# ----------------------------------------------------------------------------- vector lanes

_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_VLANES = ir.VectorType(_I32, LANES)


def _lane_intrinsic(n_chains):
    """``n_chains`` vector groups in one pass, as a Numba intrinsic
    ``f(buf, offs, g, rows_c, acc, r, d, length, first)``: for the outputs q = r, r + d, ...
    below ``length``,

        acc[q] (= if ``first`` else +=) sum over groups g..g+n_chains-1 of lane 0 of r_g(q),
        r_g(q) = (r_g(q - d) shifted down one lane) + rows_c[g, buf[offs[g] + q], :],

    each r_g starting at zero LANES - 1 steps before q = r. ``buf`` uint8, ``offs`` int64,
    ``rows_c`` int32 (G, 256, LANES) contiguous, ``acc`` int64; no bounds checks.
    """
    @intrinsic
    def chains(typingctx, buf, offs, g, rows_c, acc, r, d, length, first):
        sig = types.void(buf, offs, g, rows_c, acc, r, d, length, first)

        def codegen(context, builder, signature, args):
            b_arr, o_arr, _, t_arr, a_arr = (
                context.make_array(signature.args[i])(context, builder, args[i])
                if i != 2 else None for i in range(5))
            g0, r0, step, n, fst = args[2], args[5], args[6], args[7], args[8]
            zero = ir.Constant(_VLANES, None)
            down = ir.Constant(ir.VectorType(_I32, LANES), list(range(1, LANES + 1)))
            offs = [builder.load(builder.gep(o_arr.data, [builder.add(g0, ir.Constant(_I64, u))]))
                    for u in range(n_chains)]
            tabs = [builder.gep(t_arr.data, [builder.mul(builder.add(g0, ir.Constant(_I64, u)),
                                                         ir.Constant(_I64, 256 * LANES))])
                    for u in range(n_chains)]
            regs = [cgutils.alloca_once_value(builder, zero) for _ in range(n_chains)]

            def advance(q):
                """Step every chain to output q; the sum of their lane 0s (i64)."""
                total = None
                for u in range(n_chains):
                    code = builder.load(builder.gep(b_arr.data, [builder.add(offs[u], q)]))
                    entry = builder.mul(builder.zext(code, _I64), ir.Constant(_I64, LANES))
                    ptr = builder.bitcast(builder.gep(tabs[u], [entry]), _VLANES.as_pointer())
                    v = builder.add(builder.shuffle_vector(builder.load(regs[u]), zero, down),
                                    builder.load(ptr, align=4))
                    builder.store(v, regs[u])
                    lane = builder.sext(builder.extract_element(v, ir.Constant(_I64, 0)), _I64)
                    total = lane if total is None else builder.add(total, lane)
                return total

            warm = builder.sub(r0, builder.mul(step, ir.Constant(_I64, LANES - 1)))
            with cgutils.for_range_slice(builder, warm, r0, step) as (q, _):
                advance(q)
            is_first = builder.icmp_unsigned("!=", fst, ir.Constant(fst.type, 0))
            with builder.if_else(is_first) as (then, other):
                with then:
                    with cgutils.for_range_slice(builder, r0, n, step) as (q, _):
                        builder.store(advance(q), builder.gep(a_arr.data, [q]))
                with other:
                    with cgutils.for_range_slice(builder, r0, n, step) as (q, _):
                        ptr = builder.gep(a_arr.data, [q])
                        builder.store(builder.add(builder.load(ptr), advance(q)), ptr)
            return context.get_dummy_value()

        return sig, codegen

    return chains


_lanes5 = _lane_intrinsic(5)
_lanes3 = _lane_intrinsic(3)
_lanes1 = _lane_intrinsic(1)


@njit(cache=True)
def _lane_groups(buf, offs, rows_c, d, acc, length):
    """acc[q] = the sum over all vector groups (rows_c (G, 256, LANES)): five, three or one
    chains per pass."""
    n_g = offs.shape[0]
    for r in range(d):
        g = 0
        while g + 5 <= n_g:
            _lanes5(buf, offs, np.int64(g), rows_c, acc, np.int64(r), np.int64(d),
                    np.int64(length), g == 0)
            g += 5
        while g + 3 <= n_g:
            _lanes3(buf, offs, np.int64(g), rows_c, acc, np.int64(r), np.int64(d),
                    np.int64(length), g == 0)
            g += 3
        while g < n_g:
            _lanes1(buf, offs, np.int64(g), rows_c, acc, np.int64(r), np.int64(d),
                    np.int64(length), g == 0)
            g += 1


def _groups(buf, offs, rows_c, d, acc, length):
    """acc[q] = the sum over all groups of ``rows_c`` (words or lanes, by its dtype)."""


@overload(_groups)
def _groups_impl(buf, offs, rows_c, d, acc, length):
    if rows_c.dtype == types.int64:
        return lambda buf, offs, rows_c, d, acc, length: _word_groups(buf, offs, rows_c, d, acc,
                                                                      length)
    return lambda buf, offs, rows_c, d, acc, length: _lane_groups(buf, offs, rows_c, d, acc,
                                                                  length)


# ----------------------------------------------------------------------------- kernel

@njit(cache=True, parallel=True)
def _packed_kernel(qx, x, x_scale, x_inv, rows, cst, group_taps, step, zx, k_h, k_w, s_h, s_w,
                   p_h, p_w, d_h, d_w, out_h, out_w, scale, group, n_threads, out):
    """out[n, c, oh, ow] = (sum of the groups' lane-0 sums + cst[c]) * scale, the product in
    float64.

    Jobs are (channel, group of ``group`` images), split into ``n_threads`` contiguous ranges.
    A job stacks its images' phase planes (hq rows of wq codes each) in one buffer, after
    ``lead`` = (slots - 1) * step codes for the chains' first steps, and runs every group over
    the whole stack (the rows between images are computed and dropped). The buffer is bordered
    with code zx once per thread; only the interiors are rewritten. With ``x`` (float32, qx's
    shape; empty otherwise) each plane is quantised first, into ``qx``.
    """
    n_img, n_ch, h, wd = qx.shape
    n_g, slots = group_taps.shape
    hq = (h + 2 * p_h + s_h - 1) // s_h
    wq = (wd + 2 * p_w + s_w - 1) // s_w
    plane = group * hq * wq
    lead = (slots - 1) * step
    taps = tap_offsets(k_h, k_w, s_h, s_w, d_h, d_w, wq, plane)
    offs = np.empty(n_g, np.int64)
    for g in range(n_g):      # group g's last slot, for output 0
        offs[g] = lead + taps[group_taps[g, 0]] + (slots - 1) * step
    length = ((group - 1) * hq + out_h - 1) * wq + out_w
    size = max(lead + s_h * s_w * plane, offs.max() + length)
    n_groups = (n_img + group - 1) // group
    n_jobs = n_ch * n_groups
    for thread in prange(n_threads):
        buf = np.full(size, zx, np.uint8)
        acc = np.empty(length, np.int64)
        near = np.empty(h * wd if x.size else 0, np.uint8)
        lo, hi = block_bounds(thread, n_threads, n_jobs)
        for job in range(lo, hi):
            ci, n0, n1 = channel_job(job, n_groups, group, n_img)
            load_planes(qx, x, x_scale, x_inv, zx, near, buf[lead:], ci, n0, n1, p_h, p_w, s_h,
                        s_w, plane, wq, hq)
            _groups(buf, offs, rows[ci], step, acc, length)
            store_planes(acc, cst[ci], scale, out, ci, n0, n1, hq, wq)
    return out


_packed_kernel_serial = serial_twin(_packed_kernel)


def depthwise_packed(qx, rows, cst, plan, zx, k_size, geom, out_hw, scale, out, x=None,
                     x_scale=1.0, x_inv=1.0):
    """Run the packed-tap depthwise kernel into ``out`` (float32 or float64, (N, C, OH, OW)).

    ``plan`` = :func:`group_plan` (k_size, geom), ``rows, cst`` from :func:`tap_rows`.
    Arguments as checked by :func:`approxdarts_np.kernels.lut_conv.lut_depthwise_conv`, the
    public entry. With ``x`` (finite float32, qx's shape) the kernel first writes x's codes
    (scale ``x_scale``, its float32 inverse ``x_inv``, zero point ``zx``) into ``qx``.
    """
    k_h, k_w = k_size
    s_h, s_w, p_h, p_w, d_h, d_w = geom
    out_h, out_w = out_hw
    n_img, n_ch = qx.shape[:2]
    group = depthwise_group(qx.shape, geom)
    work = n_img * n_ch * (out_h * out_w * rows.shape[1] // _STEPS_PER_ELEMENT + PLANE_ELEMENTS)
    kernel, n_threads = pick_kernel(_packed_kernel, _packed_kernel_serial, work)
    n_threads = min(n_threads, n_ch * -(-n_img // group))
    x = NO_INPUT if x is None else x
    group_taps, step = plan
    return kernel(qx, x, float(x_scale), np.float32(x_inv), rows, cst, group_taps, step,
                  np.uint8(zx), k_h, k_w, s_h, s_w, p_h, p_w, d_h, d_w, out_h, out_w,
                  float(scale), group, n_threads, out)
