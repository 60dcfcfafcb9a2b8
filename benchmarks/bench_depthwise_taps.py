"""The depthwise kernels' tap groups: generated from templates, hand-unrolled, or a generic loop.

:mod:`approxdarts_np.kernels.depthwise` runs a gather (forward, input gradient) and the weight
gradient's dot products in groups of up to 9 taps, one straight-line loop per group
(``_taps9`` ... ``_taps1``, ``_dots9`` ... ``_dots1``). Three builds of the module are timed
side by side in one process:

* ``generated``: the package's module, whose group functions are built from one template per
  family;
* ``unrolled``: the module as it was at ``--reference`` (default: the last commit with the
  hand-written group functions), loaded from git under another module name;
* ``generic``: the package's module with ``_gather_taps`` and ``_dot_taps`` replaced by plain
  loops over the taps, one tap per pass over the positions (the running value read and
  written per tap; one ``reassoc`` dot product per tap). Its sums run in another order, so
  its results differ in the last bits; the other two must be equal bit for bit, which every
  case checks before timing.

Cases: the DARTS search's depthwise convolutions (sep_conv 3x3 and 5x5, dil_conv 3x3 and 5x5
with dilation 2, stride 1; planes 32x32, 16x16, 8x8 at 16, 32, 64 channels; batch 64 and 32),
forward, input gradient and weight gradient each, at each ``--threads`` count.

Method: first a child process with an empty Numba cache compiles the group functions and the
loops that call them in the ``generated`` and the ``unrolled`` build and records whether their
machine code is the same (symbol names and debug lines aside). Then ``--processes`` fresh
processes one after another each time every case: per case, thread count and operation,
``--rounds`` rounds; in each round every build is called once untimed, then ``--repeats``
timed calls, the builds in a rotating order; a round's figure is the median of its calls.
Reported per build: the median, min and max over all rounds; per build against ``unrolled``:
the ratio of their figures in each round, its median, min and max, and each process's median.
Load averages and ``uptime`` before and after are recorded.

    python benchmarks/bench_depthwise_taps.py [--threads 1 2] [--processes 5] [--rounds 7] [--repeats 9]

Writes benchmarks/results/bench_depthwise_taps.json (or ``--out``).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numba
import numpy as np
from numba import njit

from bench_kernels import time_block
from machine import machine_info, source_state

ROOT = Path(__file__).resolve().parents[1]
MODULE = "approxdarts_np/kernels/depthwise.py"
REFERENCE = "760eb30"  # the last commit whose depthwise.py has the hand-written group functions
RESULTS = ROOT / "benchmarks" / "results" / "bench_depthwise_taps.json"
BUILDS = ("unrolled", "generated", "generic")

# name, batch, channels, plane, kernel, padding, dilation (stride 1)
CASES = [
    ("sep 3x3 B64 C16 32x32", 64, 16, 32, 3, 1, 1),
    ("sep 5x5 B64 C16 32x32", 64, 16, 32, 5, 2, 1),
    ("dil 3x3 B64 C16 32x32", 64, 16, 32, 3, 2, 2),
    ("dil 5x5 B64 C16 32x32", 64, 16, 32, 5, 4, 2),
    ("sep 3x3 B64 C32 16x16", 64, 32, 16, 3, 1, 1),
    ("dil 5x5 B64 C32 16x16", 64, 32, 16, 5, 4, 2),
    ("sep 3x3 B64 C64 8x8", 64, 64, 8, 3, 1, 1),
    ("dil 5x5 B64 C64 8x8", 64, 64, 8, 5, 4, 2),
    ("dil 3x3 B32 C16 32x32", 32, 16, 32, 3, 2, 2),
    ("sep 5x5 B32 C32 16x16", 32, 32, 16, 5, 2, 1),
]


@njit(cache=True)
def generic_gather(out, o0, length, src, offs, ws, t0, t1, assign):
    """``_gather_taps`` as one pass over the positions per tap."""
    ov = out[o0:o0 + length]
    for t in range(t0, t1):
        s = src[offs[t]:offs[t] + length]
        w = ws[t]
        if assign and t == t0:
            for q in range(length):
                ov[q] = w * s[q]
        else:
            for q in range(length):
                ov[q] += w * s[q]


@njit(cache=True, fastmath={"reassoc"})
def generic_dot(g, src, offs, out_row):
    """``_dot_taps`` as one dot product per tap."""
    n = g.shape[0]
    for t in range(offs.shape[0]):
        s = src[offs[t]:offs[t] + n]
        acc = np.float32(0.0)
        for q in range(n):
            acc += g[q] * s[q]
        out_row[t] = acc


def load_module(name: str, source: str, folder: Path):
    """``source`` (a depthwise.py) imported as approxdarts_np.kernels.<name> from ``folder``."""
    path = folder / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"approxdarts_np.kernels.{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def builds(reference: str, folder: Path) -> dict:
    import approxdarts_np.kernels.depthwise as generated
    old = subprocess.run(["git", "show", f"{reference}:{MODULE}"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    unrolled = load_module("_bench_depthwise_unrolled", old, folder)
    generic = load_module("_bench_depthwise_generic", (ROOT / MODULE).read_text(), folder)
    generic._gather_taps = generic_gather   # before the first call compiles the kernels
    generic._dot_taps = generic_dot
    return {"unrolled": unrolled, "generated": generated, "generic": generic}


def operations(mod, x, w, gy, geom):
    return {
        "fwd": lambda: mod.depthwise_conv2d(x, w, *geom),
        "grad_input": lambda: mod.depthwise_conv2d_grad_input(gy, w, x.shape, *geom),
        "grad_weight": lambda: mod.depthwise_conv2d_grad_weight(gy, x, w.shape, *geom),
    }


def timed(fn, repeats: int) -> float:
    """The median of ``repeats`` timed calls after one untimed call, in ms."""
    return statistics.median(time_block(fn, repeats, warmup=1))


def spread(values) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run_case(mods, case, threads, rounds, repeats, rng) -> dict:
    """One case at ``threads`` threads: the bit checks, then each build's per-round figures."""
    name, batch, ch, size, k, pad, dil = case
    geom = (1, pad, dil)
    x = rng.standard_normal((batch, ch, size, size)).astype(np.float32)
    w = rng.standard_normal((ch, 1, k, k)).astype(np.float32)
    gy = rng.standard_normal(mods["generated"].depthwise_conv2d(x, w, *geom).shape
                             ).astype(np.float32)
    ops = {b: operations(m, x, w, gy, geom) for b, m in mods.items()}
    entry = {"name": name, "threads": threads,
             "config": {"batch": batch, "channels": ch, "height": size, "width": size,
                        "kernel": k, "stride": 1, "padding": pad, "dilation": dil},
             "ops": {}}
    for op in ops["unrolled"]:
        ref = ops["unrolled"][op]()
        check = {}
        for b in ("generated", "generic"):
            got = ops[b][op]()
            check[b] = {"bit_equal_to_unrolled": bool(np.array_equal(got, ref)),
                        "max_abs_diff": float(np.max(np.abs(got - ref)))}
        if not check["generated"]["bit_equal_to_unrolled"]:
            raise SystemExit(f"{name} {op}: the generated build differs from the unrolled one")
        per_round = {b: [] for b in BUILDS}
        for r in range(rounds):
            for i in range(len(BUILDS)):
                b = BUILDS[(i + r) % len(BUILDS)]
                per_round[b].append(round(timed(ops[b][op], repeats), 4))
        entry["ops"][op] = {"check": check, "round_ms": per_round}
    return entry


# The group functions and drivers whose machine code the two builds should share.
ASM_FUNCTIONS = ("_taps9", "_taps5", "_taps3", "_taps2", "_taps1", "_gather_taps",
                 "_dots9", "_dots5", "_dots3", "_dots2", "_dots1", "_dot_taps")


def asm_child(reference: str) -> dict:
    """Whether each of ASM_FUNCTIONS compiles to the same instructions in the generated and the
    unrolled build (run with an empty NUMBA_CACHE_DIR: Numba shows no code it loaded from its
    cache). Symbol names, debug lines and section sizes are left out of the comparison."""
    import re
    ov = np.zeros(64, np.float32)
    src = np.zeros(128, np.float32)
    offs = np.arange(25, dtype=np.int64)
    ws = np.ones(25, np.float32)
    args = {"taps": (ov, src, offs, ws, 0, True), "gather": (ov, 0, 32, src, offs, ws, 0, 25, True),
            "dots": (ov, src, offs, 0, ws), "dot": (ov, src, offs, ws)}

    def text(dispatcher):
        asm = "\n".join(dispatcher.inspect_asm().values())
        asm = re.sub(r"_ZN\S+|\S*depthwise\S*", "SYM", asm)
        return [line for line in asm.splitlines()
                if not line.strip().startswith((".file", ".loc", "#", ".Ltmp", ".cfi", ".size"))]

    with tempfile.TemporaryDirectory() as tmp:
        mods = builds(reference, Path(tmp))
        out = {}
        for fn in ASM_FUNCTIONS:
            kind = "gather" if fn == "_gather_taps" else "dot" if fn == "_dot_taps" else fn[1:5]
            texts = []
            for b in ("unrolled", "generated"):
                f = getattr(mods[b], fn)
                f(*args[kind])
                texts.append(text(f))
            out[fn] = {"same_instructions": texts[0] == texts[1], "lines": len(texts[0])}
    return out


def child(args) -> None:
    """One process's part: every case at every thread count, printed as one JSON line."""
    if args.child == "asm":
        print("RESULT " + json.dumps(asm_child(args.reference)))
        return
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        mods = builds(args.reference, Path(tmp))
        rng = np.random.default_rng(0)
        for threads in args.threads:
            numba.set_num_threads(threads)
            for case in CASES:
                cases.append(run_case(mods, case, threads, args.rounds, args.repeats, rng))
                print(f"  {threads}t {case[0]}", file=sys.stderr, flush=True)
    print("RESULT " + json.dumps(cases))


def run_child(args, kind: str, env=None):
    cmd = [sys.executable, __file__, "--child", kind, "--reference", args.reference,
           "--rounds", str(args.rounds), "--repeats", str(args.repeats),
           "--threads", *map(str, args.threads)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--processes", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--reference", default=REFERENCE)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", choices=["time", "asm"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    reference_commit = subprocess.run(["git", "rev-parse", args.reference], cwd=ROOT, check=True,
                                      capture_output=True, text=True).stdout.strip()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with tempfile.TemporaryDirectory() as cache:
        asm = run_child(args, "asm", dict(os.environ, NUMBA_CACHE_DIR=cache))
    print("same instructions: " + ", ".join(f"{k} {v['same_instructions']}" for k, v in asm.items()))
    load_before, uptime_before = os.getloadavg(), uptime()
    runs = []
    for p in range(args.processes):
        runs.append(run_child(args, "time"))
        print(f"process {p + 1} of {args.processes} done, load {os.getloadavg()}", flush=True)
    load_after, uptime_after = os.getloadavg(), uptime()

    cases = []
    for i, first in enumerate(runs[0]):
        entry = {k: first[k] for k in ("name", "threads", "config")}
        entry["ops"] = {}
        for op, row in first["ops"].items():
            rounds = [run[i]["ops"][op]["round_ms"] for run in runs]
            out = {"check": row["check"],
                   "ms": {b: spread([t for r in rounds for t in r[b]]) for b in BUILDS}}
            for b in ("generated", "generic"):
                per_process = [[t / u for t, u in zip(r[b], r["unrolled"])] for r in rounds]
                out[f"{b}_over_unrolled"] = spread([x for pp in per_process for x in pp])
                out[f"{b}_over_unrolled"]["per_process_median"] = [statistics.median(pp)
                                                                   for pp in per_process]
            out["round_ms"] = rounds
            entry["ops"][op] = out
            print(f"{entry['threads']}t {entry['name']:24s} {op:11s} "
                  + "  ".join(f"{b} {out['ms'][b]['median']:6.2f} ms" for b in BUILDS)
                  + "".join(f"  {b}/unrolled {out[f'{b}_over_unrolled']['median']:.3f} "
                            f"[{out[f'{b}_over_unrolled']['min']:.3f}-"
                            f"{out[f'{b}_over_unrolled']['max']:.3f}]"
                            for b in ("generated", "generic")))
        cases.append(entry)
    summary = {}
    for b in ("generated", "generic"):
        meds = [row[f"{b}_over_unrolled"]["median"] for c in cases for row in c["ops"].values()]
        summary[f"{b}_over_unrolled"] = {
            "median_of_case_medians": statistics.median(meds),
            "case_medians_min": min(meds), "case_medians_max": max(meds),
            "by_kernel": {f"{k}x{k}": statistics.median(
                [row[f"{b}_over_unrolled"]["median"] for c in cases if c["config"]["kernel"] == k
                 for row in c["ops"].values()]) for k in (3, 5)},
            "by_op": {op: statistics.median(
                [c["ops"][op][f"{b}_over_unrolled"]["median"] for c in cases])
                for op in ("fwd", "grad_input", "grad_weight")},
        }
    result = {
        "benchmark": "bench_depthwise_taps",
        "started_utc": started,
        "machine": machine_info(max(args.threads)),
        "source": source_state(),
        "reference": {"rev": args.reference, "commit": reference_commit},
        "load_average_before": load_before, "load_average_after": load_after,
        "uptime_before": uptime_before, "uptime_after": uptime_after,
        "config": {"threads": args.threads, "processes": args.processes, "rounds": args.rounds,
                   "repeats": args.repeats, "builds": list(BUILDS)},
        "timing": f"{args.processes} fresh processes one after another, each: per case, thread "
                  f"count and operation {args.rounds} rounds; per round each build called once "
                  f"untimed then {args.repeats} times, builds in rotating order; a round's figure "
                  "is the median of its calls ('round_ms', per process). 'ms': median, min and "
                  "max of all rounds' figures; '<build>_over_unrolled': the same of the "
                  "per-round ratios, with each process's median",
        "same_instructions_as_unrolled": asm,
        "summary": summary,
        "cases": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
