"""The AVX2 options for the table lookups, measured against the portable kernels.

CPUs with AVX2 but without AVX-512 VBMI cannot run the VBMI byte shuffles. This script times,
on one thread, the package's AVX2 path and the two vector designs tried before it, so that
anyone can measure them on their own CPU. ``scalar`` is the package's ``scalar`` path, the
portable kernels every CPU runs (since commit 0f517d8 a depthwise convolution there runs the
packed-tap kernel, :mod:`approxdarts_np.kernels.packed_taps`; a pointwise one the bag kernel):

* ``nibble``: the package's AVX2 path (:mod:`approxdarts_np.kernels.byte_shuffle`): a column
  as a sum of 16-entry nibble windows, each looked up with one ``vpshufb`` per byte plane;
* ``pshufb``: the VBMI path's byte-plane tables looked up 16 entries at a time with
  ``vpshufb`` over the 16 slices of each 256-entry plane;
* ``gather``: the same tables joined into int32 and looked up with ``vpgatherdd``, 8 per
  instruction.

The ``pw one-pass`` rows time ``approx_conv2d`` of a pointwise convolution of float input, as
the search runs it: on the scalar path (the bag kernel: a row of C products per code; since
commit 526d73a it quantises as it reads too) and on the AVX2 column kernel, which quantises as
it reads (forced at any width here; ``windows_allowed``
is what ``byte_shuffle.column_windows`` lets the package use, 2 for mul8u_2P7's columns and 3
for mul8u_17KS's).

Every variant writes the same float32 outputs (the quantised conv's, scale 1). The two older
vector loops plug into the byte-shuffle depthwise and column kernels in place of the VBMI loop
(a copy of each kernel with the loop rebound), so buffers, grouping and the outputs' constant
terms are the package's; every result is checked bit for bit against the scalar kernel before
it is timed. Tables: mul8u_2P7 (two windows per column) and mul8u_17KS (three). With
``--target avx2`` the script re-runs itself with Numba compiling for this host's
features minus AVX-512 (``NUMBA_CPU_FEATURES``), which is how a machine with VBMI measures the
AVX2 code (the instructions are the same; the timings are this CPU's, not an AVX2 CPU's).

    python benchmarks/bench_avx2_lookup.py --target avx2 --repeats 7 --rounds 3 \
        --out benchmarks/results/bench_avx2_lookup.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import types as pytypes
from pathlib import Path

import numpy as np
from llvmlite import ir
from numba import njit
from numba.core import cgutils, types
from numba.extending import intrinsic

from approxdarts_np.kernels.byte_shuffle import i64, lookup_operands, pshufb, vload
from machine import avx2_target_env, machine_info, source_state

ROOT = Path(__file__).resolve().parents[1]


_V8_32 = ir.VectorType(ir.IntType(8), 32)
_V16_32 = ir.VectorType(ir.IntType(16), 32)
_V32_32 = ir.VectorType(ir.IntType(32), 32)


def _avx2_lookup_intrinsic(n_planes):
    """The same loop as :func:`_lookup_intrinsic` (same arguments, tables and result) with AVX2
    instructions only: 32-byte registers and the 16-entry ``vpshufb``.

    A 256-entry byte plane is 16 slices of 16 entries (codes 16h .. 16h + 15). Per slice h and
    32 codes x, ``vpshufb`` looks entry x mod 16 up in the slice's 16 bytes (loaded into both
    128-bit lanes) and a byte blend keeps it where x's high nibble is h. Per 64-code chunk this
    is 2 x 16 compares and 2 x 16 x ``n_planes`` shuffles and blends, against 2 x ``n_planes``
    ``vpermi2b`` with VBMI. (A variant with index sat_add_u8(x - 16h, 0x70), which ``vpshufb``
    turns into 0 off the slice, and an OR instead of the blend measured slower.)
    """
    @intrinsic
    def lookup(typingctx, xbuf, offs, tabs, acc, n_chunks):
        sig = types.void(xbuf, offs, tabs, acc, n_chunks)

        def codegen(context, builder, signature, args):
            x_base, offs_data, n_taps, t_base, a_base, n_arg = lookup_operands(
                context, builder, signature, args)
            shuffle = pshufb(builder)
            both_lanes = ir.Constant(ir.VectorType(ir.IntType(32), 32), list(range(16)) * 2)
            # up to two 64-code chunks, two 32-code halves each
            sums = [[cgutils.alloca_once(builder, _V16_32) for _ in range(n_planes)]
                    for _ in range(4)]

            def splat(v):
                return ir.Constant(_V8_32, [v] * 32)

            def chunks(first, count):
                """Emit the taps loop for chunks first .. first + count - 1 (count 1 or 2)."""
                starts = [builder.mul(builder.add(first, i64(u // 2)), i64(64))
                          for u in range(2 * count)]
                starts = [builder.add(st, i64(32 * (u % 2))) for u, st in enumerate(starts)]
                halves = len(starts)
                for u in range(halves):
                    for var in sums[u]:
                        builder.store(ir.Constant(_V16_32, None), var)
                with cgutils.for_range(builder, n_taps) as tap:
                    off = builder.load(builder.gep(offs_data, [tap.index]))
                    codes = [vload(builder, x_base, builder.add(off, st), _V8_32) for st in starts]
                    row = builder.gep(t_base, [builder.mul(tap.index, i64(256 * n_planes))])
                    found = [[ir.Constant(_V8_32, None)] * n_planes for _ in range(halves)]
                    low = [builder.and_(c, splat(15)) for c in codes]
                    high = [builder.and_(c, splat(0xF0)) for c in codes]
                    for h in range(16):
                        hit = [builder.icmp_unsigned("==", c, splat(16 * h)) for c in high]
                        for p in range(n_planes):
                            part = vload(builder, row, i64(256 * p + 16 * h),
                                        ir.VectorType(ir.IntType(8), 16))
                            tab = builder.shuffle_vector(part, part, both_lanes)
                            for u in range(halves):
                                found[u][p] = builder.select(
                                    hit[u], builder.call(shuffle, [tab, low[u]]), found[u][p])
                    for u in range(halves):
                        for p in range(n_planes):
                            var = sums[u][p]
                            builder.store(builder.add(builder.load(var),
                                                      builder.zext(found[u][p], _V16_32)), var)
                for u in range(halves):
                    total = builder.zext(builder.load(sums[u][0]), _V32_32)
                    for p in range(1, n_planes):
                        part = builder.shl(builder.zext(builder.load(sums[u][p]), _V32_32),
                                           ir.Constant(_V32_32, [8 * p] * 32))
                        total = builder.add(total, part)
                    dst = builder.bitcast(builder.gep(a_base, [starts[u]]),
                                          _V32_32.as_pointer())
                    builder.store(total, dst, align=4)

            with cgutils.for_range(builder, n_arg) as chunk:
                chunks(chunk.index, 1)
            return context.get_dummy_value()

        return sig, codegen

    return lookup


_V8x8 = ir.VectorType(ir.IntType(8), 8)
_V32x8 = ir.VectorType(ir.IntType(32), 8)


@intrinsic
def _gather_lookup(typingctx, xbuf, offs, tabs, acc, n_chunks):
    """``vpgatherdd``: acc[64 k + l] = sum_t tabs[256 t + xbuf[offs[t] + 64 k + l]], ``tabs``
    int32 (one 256-entry table per tap), eight lookups per instruction."""
    sig = types.void(xbuf, offs, tabs, acc, n_chunks)

    def codegen(context, builder, signature, args):
        x_base, offs_data, n_taps, t_base, a_base, n_arg = lookup_operands(
            context, builder, signature, args)
        gather = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_V32x8, [_V32x8, ir.IntType(8).as_pointer(), _V32x8, _V32x8,
                                                     ir.IntType(8)]),
            "llvm.x86.avx2.gather.d.d.256")
        all_lanes = ir.Constant(_V32x8, [-1] * 8)
        sums = [cgutils.alloca_once(builder, _V32x8) for _ in range(8)]

        with cgutils.for_range(builder, n_arg) as chunk:
            start = builder.mul(chunk.index, i64(64))
            for var in sums:
                builder.store(ir.Constant(_V32x8, None), var)
            with cgutils.for_range(builder, n_taps) as tap:
                off = builder.add(builder.load(builder.gep(offs_data, [tap.index])), start)
                row = builder.gep(t_base, [builder.mul(tap.index, i64(1024))])
                for g in range(8):
                    ptr = builder.bitcast(builder.gep(x_base, [builder.add(off, i64(8 * g))]),
                                          _V8x8.as_pointer())
                    idx = builder.zext(builder.load(ptr, align=1), _V32x8)
                    got = builder.call(gather, [ir.Constant(_V32x8, None), row, idx, all_lanes,
                                                ir.Constant(ir.IntType(8), 4)])
                    builder.store(builder.add(builder.load(sums[g]), got), sums[g])
            for g in range(8):
                dst = builder.bitcast(builder.gep(a_base, [builder.add(start, i64(8 * g))]),
                                      _V32x8.as_pointer())
                builder.store(builder.load(sums[g]), dst, align=4)
        return context.get_dummy_value()

    return sig, codegen


_pshufb2 = _avx2_lookup_intrinsic(2)
_pshufb3 = _avx2_lookup_intrinsic(3)


@njit(inline="always")
def _lookup_pshufb(xbuf, offs, tabs, acc, n_chunks):
    if tabs.shape[0] == offs.shape[0] * 512:
        _pshufb2(xbuf, offs, tabs, acc, n_chunks)
    else:
        _pshufb3(xbuf, offs, tabs, acc, n_chunks)


@njit(inline="always")
def _lookup_gather(xbuf, offs, tabs, acc, n_chunks):
    _gather_lookup(xbuf, offs, tabs, acc, n_chunks)


def _rebound(kernel, suffix, loop):
    """A serial copy of a byte-shuffle kernel whose lookup loop is ``loop``."""
    f = kernel.py_func
    scope = dict(f.__globals__, _lookup_chunks=loop)
    code = f.__code__.replace(co_name=f.__name__ + suffix)
    return njit(pytypes.FunctionType(code, scope, f.__name__ + suffix, f.__defaults__))


def _as_int32(tabs, n_taps):
    """Byte-plane tables (C, taps * P * 256) joined into int32 (C, taps * 256)."""
    planes = tabs.reshape(tabs.shape[0], n_taps, -1, 256).astype(np.int32)
    joined = sum(planes[:, :, p] << (8 * p) for p in range(planes.shape[2]))
    return np.ascontiguousarray(joined.reshape(tabs.shape[0], n_taps * 256))


# (name, N, C, H, k): depthwise 3x3 / 5x5 and pointwise shapes of the quick and paper settings
CASES = [("dw3 quick C8 32x32", 32, 8, 32, 3), ("dw3 quick C32 8x8", 32, 32, 8, 3),
         ("dw5 paper C16 32x32", 64, 16, 32, 5), ("pw quick C16 16x16", 32, 16, 16, 1),
         ("pw paper C32 16x16", 64, 32, 16, 1)]
TABLES = ("mul8u_2P7", "mul8u_17KS")
# (name, N, C, H): pointwise convolutions of float input as the search runs them
# (approx_conv2d: quantised as the kernel reads it on the AVX2 path; quantised first, then the
# scalar kernel's rows of C products on the scalar path), at the quick and paper settings' sizes
ONE_PASS_CASES = [("pw one-pass quick C8 32x32", 32, 8, 32), ("pw one-pass quick C16 16x16", 32, 16, 16),
                  ("pw one-pass quick C32 8x8", 32, 32, 8), ("pw one-pass paper C16 32x32", 64, 16, 32),
                  ("pw one-pass paper C32 16x16", 64, 32, 16), ("pw one-pass paper C64 8x8", 64, 64, 8)]


def _median_ms(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _child(repeats: int) -> list[dict]:
    from approxdarts_np.kernels import byte_shuffle as bs

    kernels = {"pshufb": (_lookup_pshufb, False), "gather": (_lookup_gather, True)}
    dw = {k: _rebound(bs._depthwise_kernel, "_" + k, loop) for k, (loop, _) in kernels.items()}
    cols_k = {k: _rebound(bs._columns_kernel, "_" + k, loop) for k, (loop, _) in kernels.items()}
    rows = []
    for table_name, (name, n, c, hw, k) in ((t, case) for t in TABLES for case in CASES):
        rows.append(_case(table_name, name, n, c, hw, k, kernels, dw, cols_k, repeats))
        print(json.dumps(rows[-1]), flush=True)
    for table_name, (name, n, c, hw) in ((t, case) for t in TABLES for case in ONE_PASS_CASES):
        rows.append(_one_pass_case(table_name, name, n, c, hw, repeats))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _one_pass_case(table_name, name, n, c, hw, repeats):
    """approx_conv2d of a pointwise convolution on the scalar path and on the AVX2 column kernel
    (whatever column_windows allows), outputs checked bit for bit."""
    from approxdarts_np.approx.lut_conv import approx_conv2d, make_lut_plan
    from approxdarts_np.approx.multipliers import load_multiplier
    from approxdarts_np.kernels import byte_shuffle as bs

    plan = make_lut_plan(np.asarray(load_multiplier(table_name).table, np.int32))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, c, hw, hw)).astype(np.float32)
    w = rng.standard_normal((c, c, 1, 1)).astype(np.float32)

    def entry():
        return approx_conv2d(x, w, plan)[0]
    os.environ["APPROXDARTS_NP_TABLE_KERNELS"] = "scalar"
    expected = entry()
    row = {"table": table_name, "case": name, "lookups": n * c * c * hw * hw,
           "scalar_ms": _median_ms(entry, repeats)}
    os.environ["APPROXDARTS_NP_TABLE_KERNELS"] = "avx2"
    row["windows_allowed"] = bs.column_windows(c)
    if not np.array_equal(entry(), expected):
        raise SystemExit(f"the AVX2 path differs from the scalar kernel on {name}")
    saved, bs.COLUMN_LOOKUPS = bs.COLUMN_LOOKUPS, 1 << 20   # the column kernel at any width
    try:
        if not np.array_equal(entry(), expected):
            raise SystemExit(f"the AVX2 column kernel differs from the scalar kernel on {name}")
        row["nibble_ms"] = _median_ms(entry, repeats)
    finally:
        bs.COLUMN_LOOKUPS = saved
    return row


def _case(table_name, name, n, c, hw, k, kernels, dw, cols_k, repeats):
    from approxdarts_np.approx.lut_conv import make_lut_plan
    from approxdarts_np.approx.multipliers import load_multiplier
    from approxdarts_np.kernels import byte_shuffle as bs, lut_conv as klut
    from approxdarts_np.kernels._util import NO_INPUT, NO_INPUT_3D, image_group

    gt = make_lut_plan(np.asarray(load_multiplier(table_name).table, np.int32)).gather_table
    table_t = np.ascontiguousarray(gt.T)
    table_t.flags.writeable = False     # as a plan's: the AVX2 path keeps its windows
    rng = np.random.default_rng(0)
    qx = rng.integers(0, 256, (n, c, hw, hw), dtype=np.uint8)
    zx, zw = 7, 131
    if k > 1:
        qw = rng.integers(0, 256, (c, 1, k, k), dtype=np.uint8)
        geom = (1, 1, k // 2, k // 2, 1, 1)

        def entry():
            return klut.lut_depthwise_conv(qx, zx, qw, zw, gt, 1, k // 2, 1, scale=1.0,
                                           table_t=table_t)
        tabs, cst = bs.tap_tables(table_t, qw.reshape(c, k * k), zx, zw, kind="vbmi")
        h = hw + 2 * (k // 2)
        group = image_group(n, h * h)

        def vector(kind):
            t = _as_int32(tabs, k * k) if kernels[kind][1] else tabs
            out = np.empty((n, c, hw, hw), np.float32)
            return dw[kind](qx, NO_INPUT, 1.0, np.float32(1), t, cst, np.uint8(zx), k, k,
                            *geom, hw, hw, 1.0, group, 1, out)
        lookups = n * c * hw * hw * k * k
    else:
        qp = rng.integers(0, 256, (c, c), dtype=np.uint8)
        cols = qx.reshape(n, c, hw * hw)

        def entry():
            return klut.lut_bag_conv(cols, zx, qp, zw, gt, scale=1.0, table_t=table_t)
        tabs, cst = bs.tap_tables(table_t, qp, zx, zw, kind="vbmi")
        group = image_group(n, hw * hw)

        def vector(kind):
            t = _as_int32(tabs, c) if kernels[kind][1] else tabs
            out = np.empty((n, c, hw * hw), np.float32)
            return cols_k[kind](cols, NO_INPUT_3D, 1.0, np.float32(1), np.uint8(zx), t,
                                cst, 1.0, group, 1, out)
        lookups = n * c * c * hw * hw
    os.environ["APPROXDARTS_NP_TABLE_KERNELS"] = "scalar"
    expected = entry()
    row = {"table": table_name, "case": name, "lookups": lookups,
           "scalar_ms": _median_ms(entry, repeats)}
    os.environ["APPROXDARTS_NP_TABLE_KERNELS"] = "avx2"
    if not np.array_equal(entry(), expected):
        raise SystemExit(f"the AVX2 path differs from the scalar kernel on {name}")
    row["nibble_ms"] = _median_ms(entry, repeats)
    for kind in kernels:
        got = vector(kind).reshape(expected.shape)
        if not np.array_equal(got, expected):
            raise SystemExit(f"{kind} differs from the scalar kernel on {name}")
        row[f"{kind}_ms"] = _median_ms(lambda: vector(kind), repeats)
    if bs._cpu_has_vbmi():
        os.environ["APPROXDARTS_NP_TABLE_KERNELS"] = "vbmi"
        row["vbmi_ms"] = _median_ms(entry, repeats)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", choices=["host", "avx2"], default="avx2")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/bench_avx2_lookup.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("ROWS " + json.dumps(_child(args.repeats)))
        return
    env = dict(os.environ, NUMBA_NUM_THREADS="1")
    if args.target == "avx2":
        env.update(avx2_target_env())
    rounds = []
    for _ in range(args.rounds):
        load = os.getloadavg()
        done = subprocess.run([sys.executable, __file__, "--child", "--repeats", str(args.repeats)],
                              env=env, capture_output=True, text=True, check=True)
        rows = json.loads(done.stdout.split("ROWS ", 1)[1])
        rounds.append({"load_before": load, "load_after": os.getloadavg(), "rows": rows})
    summary = []
    for i, first in enumerate(rounds[0]["rows"]):
        entry = {k: first[k] for k in ("table", "case", "lookups", "windows_allowed") if k in first}
        for key in [k for k in first if k.endswith("_ms")]:
            vals = [r["rows"][i][key] for r in rounds]
            entry[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
        summary.append(entry)
    result = {"benchmark": "AVX2 table-lookup options against the scalar table kernels",
              "machine": machine_info(1), "source": source_state(), "target": args.target,
              "numba_cpu_features": env.get("NUMBA_CPU_FEATURES"),
              "timing": f"one thread; median of {args.repeats} calls per round, {args.rounds} "
                        "rounds in fresh processes; each row's median, min and max over the rounds",
              "tables": list(TABLES), "results": summary, "rounds": rounds}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for e in summary:
        print(f"{e['table']:11s} {e['case']:22s} " + "  ".join(f"{k[:-3]} {v['median']:.2f} ms" for k, v in e.items()
                                               if k.endswith("_ms")))


if __name__ == "__main__":
    main()
