"""Time the approximate (product-table) convolutions beside float convolutions of the same shape.

Cases (forward only, what the quantised conv op runs: ``approx.lut_conv.approx_conv2d`` on float32
operands, quantisation included): the separable and dilated convolutions of the search network
at the tiny (C4, batch 16), quick (C8, batch 32) and paper (C16, batch 64) settings -- depthwise
3x3, 5x5 and dilated 5x5 (pad to keep the size) and pointwise C->C, on 32x32 maps (the first
cells) -- for the tables exact (rank 0), 1446 (rank 1), JQQ (rank 3), 2P7 (rank 6), 7C1
(rank 8), 17KS (rank 19) and L40 (no low-rank form); every engine that applies ("gather"
always, "lowrank" when the table has factors; plans are built with max_rank=32 so that 17KS
has them) and the engine the default plan picks for the shape ("auto", see
``approx.lut_conv.choose_engine``). Beside them, in the same process: our float kernels
(``kernels.depthwise.depthwise_conv2d``, ``kernels.conv.conv2d``) and torch's ``F.conv2d`` on
float32 tensors of the same shape.

Method: Numba at ``--threads`` threads, torch at the same count; BLAS held at one thread for the
whole run (the low-rank engine and our float conv call single-threaded GEMMs from Numba threads).
Each callable is run in blocks: a 0.2 s pause (the previous block's thread pools fall idle), one
untimed warm-up call, then ``--repeats`` timed calls; all callables of a shape alternate block by
block for ``--rounds`` rounds, so a change of machine load hits all of them. Reported: median and min over the timed calls, GMAC/s from the median, and
ratios of medians (approximate / our float, approximate / torch). Every approximate result is
checked against the gather engine (bit-exact) on the benchmark data itself.

Operands: ReLU'd standard normal activations (zero point 0, as after the ReLU of a ReLU-conv-BN
op) and standard normal weights.

Shared machine: before each round the script waits (up to ``--max-wait`` seconds) until the
CPUs are at least ``--idle`` idle over one second, and it records, per round, the CPU time other
processes used while it measured (``others_cpu_share``: busy CPU time from /proc/stat minus this
process's own, over wall time x cores). A round with a share above ``--max-share`` is measured
again (at most ``--retries`` times per shape; the discarded shares are recorded too).

Run:  python benchmarks/bench_approx.py [--repeats 5] [--rounds 3] [--settings tiny quick paper]
Writes benchmarks/results/bench_approx.json (or ``--out``) and prints a table.
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
import scipy.linalg.cython_blas  # noqa: F401  (the BLAS Numba's np.dot calls, for threadpoolctl)
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_info, threadpool_limits

from approxdarts_np.approx.lut_conv import approx_conv2d, choose_engine, make_lut_plan
from approxdarts_np.approx.multipliers import load_multiplier
from approxdarts_np.kernels import depthwise as kdw
from machine import cpu_model

try:
    from approxdarts_np.kernels import conv as kconv
    CONV_IMPORT_ERROR = None
except ImportError as err:
    kconv = None
    CONV_IMPORT_ERROR = f"{type(err).__name__}: {err}"

RESULTS = Path(__file__).resolve().parent / "results" / "bench_approx.json"
TABLES = ["exact", "1446", "JQQ", "2P7", "7C1", "17KS", "L40"]
SETTINGS = {"tiny": (4, 16), "quick": (8, 32), "paper": (16, 64)}   # channels, batch

# name, depthwise, kernel, dilation
SHAPES = [
    ("depthwise 3x3", True, 3, 1),
    ("depthwise 5x5", True, 5, 1),
    ("depthwise 5x5 dil 2", True, 5, 2),
    ("pointwise", False, 1, 1),
]


def machine_info(threads):
    cpu = cpu_model()
    keep = ("user_api", "internal_api", "prefix", "num_threads", "version")
    return {
        "cpu_model": cpu,
        "logical_cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "numba_threading_layer": numba.threading_layer(),
        "torch": torch.__version__,
        "numba_threads": numba.get_num_threads(),
        "torch_threads": torch.get_num_threads(),
        "requested_threads": threads,
        "blas": [{k: lib.get(k) for k in keep} for lib in threadpool_info()],
    }


def load_table(name):
    return load_multiplier(name if name == "exact" else f"mul8u_{name}").table


def cpu_counters():
    """(busy jiffies of all CPUs, this process's CPU seconds, wall seconds)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, time.process_time(), time.perf_counter()


def others_share(before, after):
    """Fraction of all CPUs used by other processes between two cpu_counters() samples."""
    hz = os.sysconf("SC_CLK_TCK")
    busy = (after[0] - before[0]) / hz
    ours = after[1] - before[1]
    wall = after[2] - before[2]
    return max(0.0, (busy - ours) / (wall * (os.cpu_count() or 1)))


def wait_for_quiet(min_idle, max_wait):
    """Wait until the machine is ``min_idle`` idle over 1 s (or ``max_wait`` s). Return idle."""
    deadline = time.perf_counter() + max_wait
    while True:
        with open("/proc/stat") as f:
            a = [int(v) for v in f.readline().split()[1:]]
        time.sleep(1.0)
        with open("/proc/stat") as f:
            b = [int(v) for v in f.readline().split()[1:]]
        total = sum(b) - sum(a)
        idle = ((b[3] + b[4]) - (a[3] + a[4])) / total if total else 1.0
        if idle >= min_idle or time.perf_counter() >= deadline:
            return idle


def time_block(fn, repeats):
    time.sleep(0.2)      # let the previous block's thread pools (Numba's, torch's) fall idle
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def shape_callables(shape, channels, batch, rng):
    """Callables {label: fn}, their MAC count, config and the exactness checks for one shape."""
    name, depthwise, k, dilation = shape
    size = 32
    padding = dilation * (k - 1) // 2
    groups = channels if depthwise else 1
    x = np.maximum(rng.standard_normal((batch, channels, size, size)), 0).astype(np.float32)
    w = rng.standard_normal((channels, channels // groups, k, k)).astype(np.float32)
    xt, wt = torch.from_numpy(x), torch.from_numpy(w)
    macs = batch * channels * size * size * (channels // groups) * k * k
    config = {"batch": batch, "c_in": channels, "c_out": channels, "height": size,
              "width": size, "kernel": k, "stride": 1, "padding": padding,
              "dilation": dilation, "groups": groups}
    geometry = (1, padding, dilation, groups)
    fns = {}
    if depthwise:
        fns["float ours"] = lambda: kdw.depthwise_conv2d(x, w, 1, padding, dilation)
    elif kconv is not None:
        fns["float ours"] = lambda: kconv.conv2d(x, w, 1, padding, dilation, groups)

    def torch_conv():
        with torch.no_grad():
            return F.conv2d(xt, wt, None, 1, padding, dilation, groups)

    fns["float torch"] = torch_conv
    checks = {}
    for table in TABLES:
        full = make_lut_plan(load_table(table), max_rank=32)
        default = make_lut_plan(load_table(table))
        engines = ["gather"] + (["lowrank"] if full.factors is not None else [])
        for engine in engines:
            fns[f"{table} {engine}"] = (
                lambda p=full, e=engine: approx_conv2d(x, w, p, *geometry, engine=e)[0])
        fns[f"{table} auto"] = lambda p=default: approx_conv2d(x, w, p, *geometry)[0]
        gather = approx_conv2d(x, w, full, *geometry, engine="gather")[0]
        checks[table] = {
            "rank": full.rank,
            "auto_engine": choose_engine(default, x.shape, w.shape, 1, groups),
            "plan_reason": default.reason,
            "lowrank_equals_gather": (None if full.factors is None else bool(np.array_equal(
                approx_conv2d(x, w, full, *geometry, engine="lowrank")[0], gather))),
            "auto_equals_gather": bool(np.array_equal(fns[f"{table} auto"](), gather)),
        }
    return name, fns, macs, config, checks


def run(args):
    numba.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    results = []
    for setting, shape in ((s, sh) for s in args.settings for sh in SHAPES):
        channels, batch = SETTINGS[setting]
        name, fns, macs, config, checks = shape_callables(shape, channels, batch, rng)
        name = f"{setting}: {name}"
        times = {label: [] for label in fns}
        shares, discarded, idle_before = [], [], []
        while len(shares) < args.rounds:
            idle_before.append(wait_for_quiet(args.idle, args.max_wait))
            before = cpu_counters()
            block = {label: time_block(fn, args.repeats) for label, fn in fns.items()}
            share = others_share(before, cpu_counters())
            if share > args.max_share and len(discarded) < args.retries:
                discarded.append(share)           # another process took CPU: measure again
                continue
            shares.append(share)
            for label in fns:
                times[label] += block[label]
        med = {label: float(np.median(t)) for label, t in times.items()}
        rows = {}
        for label, t in times.items():
            row = {"median_ms": med[label] * 1e3, "min_ms": float(np.min(t)) * 1e3,
                   "n": len(t), "gmac_per_s": macs / med[label] / 1e9}
            if "float ours" in med and not label.startswith("float"):
                row["ratio_vs_float_ours"] = med[label] / med["float ours"]
            if not label.startswith("float torch"):
                row["ratio_vs_torch"] = med[label] / med["float torch"]
            rows[label] = row
        results.append({"name": name, "setting": setting, "config": config, "macs": macs,
                        "tables": checks, "load_average": list(os.getloadavg()),
                        "idle_before_rounds": idle_before, "others_cpu_share_per_round": shares,
                        "discarded_rounds_others_share": discarded,
                        "timings": rows})
        print(f"\n{name}  (B{batch}, {macs / 1e6:.1f} M MAC; others' CPU share per round "
              f"{', '.join(f'{v:.0%}' for v in shares)}; {len(discarded)} rounds discarded)")
        print(f"{'':22s}{'median ms':>11s}{'GMAC/s':>9s}{'/ours':>8s}{'/torch':>8s}")
        for label, row in rows.items():
            print(f"{label:22s}{row['median_ms']:11.2f}{row['gmac_per_s']:9.2f}"
                  f"{row.get('ratio_vs_float_ours', float('nan')):8.2f}"
                  f"{row.get('ratio_vs_torch', float('nan')):8.2f}")
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--idle", type=float, default=0.9,
                        help="idle fraction to wait for before each shape")
    parser.add_argument("--max-wait", type=float, default=300.0,
                        help="longest wait for an idle machine, seconds")
    parser.add_argument("--max-share", type=float, default=0.05,
                        help="a round in which other processes used more of the CPUs is redone")
    parser.add_argument("--retries", type=int, default=6,
                        help="rounds redone at most, per shape")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with threadpool_limits(limits=1, user_api="blas"):
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        load_at_start = list(os.getloadavg())
        t0 = time.perf_counter()
        cases = run(args)
        report = {
            "benchmark": "bench_approx",
            "started_utc": started,
            "wall_seconds": time.perf_counter() - t0,
            "machine": machine_info(args.threads),
            "method": {"repeats": args.repeats, "rounds": args.rounds, "warmup_per_block": 1,
                       "statistic": "median of all timed calls; ratios of medians",
                       "blas_threads": 1,
                       "float_conv_ours": ("kernels.conv.conv2d" if kconv is not None
                                           else f"not available ({CONV_IMPORT_ERROR})")},
            "cases": cases,
        }
        report["machine"]["load_average_at_start"] = load_at_start
        report["machine"]["load_average_at_end"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
