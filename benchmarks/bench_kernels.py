"""Time the float convolution kernels (forward, input gradient, weight gradient) beside torch.

Cases: the DARTS supernet's depthwise convolutions at B64 C64 32x32 (3x3, 5x5, dilated 3x3 and
5x5 with dilation 2, stride 1; two stride-2 variants; two at the supernet's smaller planes,
16x16 C32 and 8x8 C64), a pointwise 64->64 convolution and the
stem's dense 3x3 3->48 convolution (the last two from ``approxdarts_np.kernels.conv``, recorded
as not available when that module cannot be imported).

Method: one process, Numba kernels at ``--threads`` threads, torch at ``torch.set_num_threads``
of the same count, BLAS libraries held at one thread (threadpoolctl) for the whole run. Each
measured callable is run in blocks: two untimed warm-up calls, then ``--repeats`` timed calls;
ours and torch alternate block by block for ``--rounds`` rounds, so a change of machine load
hits both. Reported: median (and min) over all timed calls. ``total`` is the three of ours
called back to back, timed as one, against torch's autograd forward + backward (one
``F.conv2d`` and one ``torch.autograd.grad`` for both inputs). Ratios are ours / torch, < 1
means ours is faster. Every case also checks ours against torch (max abs difference).

Run:  /work/venv/bin/python benchmarks/bench_kernels.py [--repeats 7] [--rounds 3] [--quick]
Writes benchmarks/results/bench_kernels.json (or ``--out``) and prints a short table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import numba
import numpy as np
import scipy.linalg.cython_blas  # noqa: F401  (loads the BLAS Numba's np.dot uses)
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_info, threadpool_limits

from approxdarts_np.kernels import depthwise as kdw
from machine import cpu_model

try:
    from approxdarts_np.kernels import conv as kconv
    CONV_IMPORT_ERROR = None
except ImportError as err:  # the dense/pointwise kernels live in another module
    kconv = None
    CONV_IMPORT_ERROR = f"{type(err).__name__}: {err}"

RESULTS = Path(__file__).resolve().parent / "results" / "bench_kernels.json"

# name, kind, batch, c_in, c_out, size, kernel, stride, padding, dilation
CASES = [
    ("depthwise 3x3", "depthwise", 64, 64, 64, 32, 3, 1, 1, 1),
    ("depthwise 5x5", "depthwise", 64, 64, 64, 32, 5, 1, 2, 1),
    ("dilated 3x3 (d2)", "depthwise", 64, 64, 64, 32, 3, 1, 2, 2),
    ("dilated 5x5 (d2)", "depthwise", 64, 64, 64, 32, 5, 1, 4, 2),
    ("depthwise 3x3 s2", "depthwise", 64, 64, 64, 32, 3, 2, 1, 1),
    ("dilated 5x5 (d2) s2", "depthwise", 64, 64, 64, 32, 5, 2, 4, 2),
    ("depthwise 3x3 16x16 C32", "depthwise", 64, 32, 32, 16, 3, 1, 1, 1),
    ("dilated 5x5 (d2) 8x8", "depthwise", 64, 64, 64, 8, 5, 1, 4, 2),
    ("pointwise 64->64", "conv", 64, 64, 64, 32, 1, 1, 0, 1),
    ("stem 3x3 3->48", "conv", 64, 3, 48, 32, 3, 1, 1, 1),
]


def machine_info(threads: int) -> dict:
    cpu = cpu_model()
    return {
        "cpu_model": cpu,
        "logical_cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "torch": torch.__version__,
        "numba_threads": numba.get_num_threads(),
        "torch_threads": torch.get_num_threads(),
        "requested_threads": threads,
    }


def blas_setting() -> list[dict]:
    keep = ("user_api", "internal_api", "prefix", "num_threads", "version")
    return [{k: lib.get(k) for k in keep} for lib in threadpool_info()]


def time_block(fn, repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def build_case(kind, batch, c_in, c_out, size, k, stride, padding, dilation, rng):
    """Return (ours, torch_fns, macs, check) for one case; ``ours``/``torch_fns`` map op -> fn."""
    groups = c_in if kind == "depthwise" else 1
    x = rng.standard_normal((batch, c_in, size, size)).astype(np.float32)
    w = rng.standard_normal((c_out, c_in // groups, k, k)).astype(np.float32)
    geom = (stride, padding, dilation)
    xt, wt = torch.from_numpy(x), torch.from_numpy(w)
    with torch.no_grad():
        y_ref = F.conv2d(xt, wt, None, stride, padding, dilation, groups)
    gy = rng.standard_normal(tuple(y_ref.shape)).astype(np.float32)
    gyt = torch.from_numpy(gy)

    if kind == "depthwise":
        def fwd():
            return kdw.depthwise_conv2d(x, w, *geom)

        def gin():
            return kdw.depthwise_conv2d_grad_input(gy, w, x.shape, *geom)

        def gwt():
            return kdw.depthwise_conv2d_grad_weight(gy, x, w.shape, *geom)
    else:
        def fwd():
            return kconv.conv2d(x, w, *geom, groups)

        def gin():
            return kconv.conv2d_grad_input(gy, w, x.shape, *geom, groups)

        def gwt():
            return kconv.conv2d_grad_weight(gy, x, w.shape, *geom, groups)

    def total():
        fwd()
        gin()
        gwt()

    def t_fwd():
        with torch.no_grad():
            return F.conv2d(xt, wt, None, stride, padding, dilation, groups)

    def t_gin():
        return torch.nn.grad.conv2d_input(xt.shape, wt, gyt, stride, padding, dilation, groups)

    def t_gwt():
        return torch.nn.grad.conv2d_weight(xt, wt.shape, gyt, stride, padding, dilation, groups)

    xg = xt.clone().requires_grad_(True)
    wg = wt.clone().requires_grad_(True)

    def t_total():
        yg = F.conv2d(xg, wg, None, stride, padding, dilation, groups)
        return torch.autograd.grad(yg, (xg, wg), gyt)

    def check():
        yg = F.conv2d(xg, wg, None, stride, padding, dilation, groups)
        gx_ref, gw_ref = torch.autograd.grad(yg, (xg, wg), gyt)
        refs = (y_ref.numpy(), gx_ref.numpy(), gw_ref.numpy())
        return {name: float(np.max(np.abs(ours - ref)))
                for name, ours, ref in zip(("y", "gx", "gw"), (fwd(), gin(), gwt()), refs)}

    out_size = y_ref.shape[2] * y_ref.shape[3]
    macs = batch * c_out * out_size * (c_in // groups) * k * k
    ours = {"fwd": fwd, "grad_input": gin, "grad_weight": gwt, "total": total}
    theirs = {"fwd": t_fwd, "grad_input": t_gin, "grad_weight": t_gwt, "total": t_total}
    return ours, theirs, macs, check


def summarize(times: list[float]) -> dict:
    return {"median_ms": float(np.median(times)), "min_ms": float(np.min(times)),
            "n": len(times)}


def run(args) -> dict:
    numba.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    cases = []
    for (name, kind, batch, c_in, c_out, size, k, stride, padding, dilation) in CASES:
        if args.quick:
            batch = 8
        config = {"kind": kind, "batch": batch, "c_in": c_in, "c_out": c_out,
                  "height": size, "width": size, "kernel": k, "stride": stride,
                  "padding": padding, "dilation": dilation,
                  "groups": c_in if kind == "depthwise" else 1}
        entry = {"name": name, "config": config}
        if kind == "conv" and kconv is None:
            entry["status"] = f"not available ({CONV_IMPORT_ERROR})"
            cases.append(entry)
            print(f"{name:24s} not available: {CONV_IMPORT_ERROR}")
            continue
        ours, theirs, macs, check = build_case(kind, batch, c_in, c_out, size, k, stride,
                                               padding, dilation, rng)
        entry["macs_per_pass"] = macs
        entry["max_abs_diff_vs_torch"] = check()
        times = {op: {"ours": [], "torch": []} for op in ours}
        for _ in range(args.rounds):
            for op in ours:
                times[op]["ours"] += time_block(ours[op], args.repeats)
                times[op]["torch"] += time_block(theirs[op], args.repeats)
        entry["status"] = "measured"
        entry["ops"] = {}
        for op, t in times.items():
            o, th = summarize(t["ours"]), summarize(t["torch"])
            passes = 3 if op == "total" else 1
            entry["ops"][op] = {
                "ours": o, "torch": th,
                "ratio_ours_over_torch": o["median_ms"] / th["median_ms"],
                "ours_gmac_per_s": passes * macs / o["median_ms"] / 1e6,
                "torch_gmac_per_s": passes * macs / th["median_ms"] / 1e6,
            }
        entry["sum_of_separate_medians_ms"] = {
            "ours": sum(entry["ops"][op]["ours"]["median_ms"]
                        for op in ("fwd", "grad_input", "grad_weight")),
            "torch": sum(entry["ops"][op]["torch"]["median_ms"]
                         for op in ("fwd", "grad_input", "grad_weight")),
        }
        cases.append(entry)
        print_row(entry)
    return {"cases": cases}


def print_header():
    print(f"{'case':24s} {'fwd':>13s} {'grad_input':>13s} {'grad_weight':>13s} "
          f"{'total':>13s} {'ratio':>6s}")
    print(f"{'':24s} {'ours/torch ms':>13s} {'ours/torch ms':>13s} {'ours/torch ms':>13s} "
          f"{'ours/torch ms':>13s} {'total':>6s}")


def print_row(entry):
    cells = []
    for op in ("fwd", "grad_input", "grad_weight", "total"):
        r = entry["ops"][op]
        cells.append(f"{r['ours']['median_ms']:6.2f}/{r['torch']['median_ms']:<6.2f}")
    ratio = entry["ops"]["total"]["ratio_ours_over_torch"]
    print(f"{entry['name']:24s} " + " ".join(f"{c:>13s}" for c in cells) + f" {ratio:6.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="batch 8 instead of 64 (smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    with threadpool_limits(limits=1, user_api="blas"):
        numba.set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
        info = machine_info(args.threads)
        blas = blas_setting()
        load_before = os.getloadavg()
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        print_header()
        body = run(args)
        load_after = os.getloadavg()
    info["numba_threading_layer"] = numba.threading_layer()
    report = {
        "benchmark": "bench_kernels",
        "started_utc": started,
        "machine": info,
        "threads": {
            "numba": args.threads,
            "torch": args.threads,
            "blas": "held at 1 thread for the whole run (threadpoolctl threadpool_limits, "
                    "user_api='blas'); approxdarts_np.kernels.conv also holds BLAS at 1 "
                    "thread around its own kernels",
            "threadpool_info_during_run": blas,
        },
        "timing": (f"after warm-up, allocator warm, median of R repeats: 2 untimed warm-up "
                   f"calls per block, R = {args.repeats} timed calls per block, "
                   f"{args.rounds} rounds alternating ours/torch blocks, median (and min) over "
                   f"all {args.repeats * args.rounds} timed calls"),
        "total_definition": "ours: fwd, grad_input, grad_weight called back to back and timed "
                            "as one; torch: autograd F.conv2d forward + torch.autograd.grad "
                            "for input and weight",
        "torch_separate_ops": "fwd: F.conv2d under no_grad; grad_input: "
                              "torch.nn.grad.conv2d_input; grad_weight: "
                              "torch.nn.grad.conv2d_weight (both aten.convolution_backward)",
        "load_average_before": load_before,
        "load_average_after": load_after,
        "quick": args.quick,
        **body,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"load average before {load_before}, after {load_after}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
