"""Seconds per search step, second order (unrolled) vs first order, in one process per configuration.

A step is an architecture step then a weight step. First order: α from the
val-batch gradient at w. Second order: approxdarts_np.runs.unrolled (virtual
step, ∇α and u at w', two finite-difference passes at w ± εu), ξ = the weight
learning rate, as DARTS. The two kinds of step alternate in the same process
(first, second, first, second, ...) after one warm-up step of each, so that a
shared machine's load falls on both alike; the ratio is taken per adjacent
pair and its median, min and max are reported beside the medians. Load
averages are recorded before and after each configuration. The process CPU
seconds of each step are recorded too: on a machine shared with other
CPU-bound work their ratio moves far less than the wall-clock one.

    python benchmarks/bench_second_order.py [--configs quick:float paper:float quick:exact] [--steps 3] [--repeats 2]

Writes benchmarks/results/bench_second_order.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_model

ROOT = Path(__file__).resolve().parents[1]
THREADS = 2
LR = 0.025  # the weight learning rate; DARTS's ξ defaults to it
SETTINGS = {
    "quick": dict(channels=8, layers=5, batch_size=32),  # the CLI's quick default
    "paper": dict(channels=16, layers=8, batch_size=64),  # DARTS search setting
}


def _first_order_steps():
    """The search's ``architecture_step`` and ``weight_step``."""
    from approxdarts_np.runs.search import architecture_step, weight_step
    return architecture_step, weight_step


def _one(setting: str, mode: str, steps: int) -> dict:
    """Child process: alternate first- and second-order steps; time each part."""
    import numpy as np

    from approxdarts_np.approx.arithmetic import arithmetic_from_spec
    from approxdarts_np.kernels.threads import configure_threads
    from approxdarts_np.nas.model_search import Network
    from approxdarts_np.nn import SGD, Adam
    from approxdarts_np.runs.unrolled import unrolled_architecture_step

    load_before = os.getloadavg()
    configure_threads(THREADS)
    cfg = SETTINGS[setting]
    rng = np.random.default_rng(0)
    shape = (cfg["batch_size"], 3, 32, 32)
    train, val = [(rng.standard_normal(shape).astype(np.float32), rng.integers(0, 10, cfg["batch_size"]))
                  for _ in range(2)]
    net = Network(cfg["channels"], 10, cfg["layers"], seed=0,
                  arithmetic=arithmetic_from_spec(None if mode == "float" else mode))
    a_opt = Adam(net.arch_parameters(), lr=3e-4, betas=(0.5, 0.999), weight_decay=1e-3)
    w_opt = SGD(net.weights(), lr=LR, momentum=0.9, weight_decay=3e-4)
    architecture_step, weight_step = _first_order_steps()

    def arch_first():
        architecture_step(net, a_opt, *val)

    def arch_second():
        unrolled_architecture_step(net, a_opt, w_opt, train, val, xi=LR)

    def weights():
        weight_step(net, w_opt, *train, grad_clip=5.0)

    record = {"first": {"arch": [], "weight": [], "step": [], "cpu": []},
              "second": {"arch": [], "weight": [], "step": [], "cpu": []}}
    for i in range(1 + steps):
        for order, arch in (("first", arch_first), ("second", arch_second)):
            c0, t0 = time.process_time(), time.perf_counter()
            arch()
            t1 = time.perf_counter()
            weights()
            t2, c2 = time.perf_counter(), time.process_time()
            if i > 0:  # the first round is warm-up (compilation, allocator)
                r = record[order]
                r["arch"].append(t1 - t0)
                r["weight"].append(t2 - t1)
                r["step"].append(t2 - t0)
                r["cpu"].append(c2 - c0)
    pair_ratios = [s / f for f, s in zip(record["first"]["step"], record["second"]["step"])]
    out = {"setting": setting, "mode": mode, **cfg, "threads": THREADS, "steps": steps,
           "load_avg_before": load_before, "load_avg_after": os.getloadavg()}
    for order in ("first", "second"):
        r = record[order]
        out[order] = {"step_s_median": statistics.median(r["step"]), "step_s_all": r["step"],
                      "arch_s_median": statistics.median(r["arch"]),
                      "weight_s_median": statistics.median(r["weight"]),
                      "cpu_s_median": statistics.median(r["cpu"])}
    out["ratio_step_medians"] = out["second"]["step_s_median"] / out["first"]["step_s_median"]
    out["ratio_arch_medians"] = out["second"]["arch_s_median"] / out["first"]["arch_s_median"]
    out["ratio_cpu_medians"] = out["second"]["cpu_s_median"] / out["first"]["cpu_s_median"]
    out["ratio_per_pair"] = {"median": statistics.median(pair_ratios), "min": min(pair_ratios),
                             "max": max(pair_ratios), "all": pair_ratios}
    return out


def _summary(results: list[dict]) -> list[dict]:
    """Per (setting, mode): the step-time ratio of every repeat, and its median, min and max."""
    out = []
    for key in dict.fromkeys((r["setting"], r["mode"]) for r in results):
        rows = [r for r in results if (r["setting"], r["mode"]) == key]
        ratios = [r["ratio_step_medians"] for r in rows]
        cpu = [r["second"]["cpu_s_median"] / r["first"]["cpu_s_median"] for r in rows]
        out.append({"setting": key[0], "mode": key[1], "repeats": len(rows), "ratio_median": statistics.median(ratios),
                    "ratio_min": min(ratios), "ratio_max": max(ratios), "ratios": ratios,
                    "cpu_ratio_median": statistics.median(cpu), "cpu_ratios": cpu,
                    "first_step_s": [r["first"]["step_s_median"] for r in rows],
                    "second_step_s": [r["second"]["step_s_median"] for r in rows],
                    "load_avg_1min_before": [r["load_avg_before"][0] for r in rows]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=[f"{s}:float" for s in SETTINGS],
                        help="SETTING:MODE pairs; SETTING quick or paper, MODE float, exact or a multiplier name")
    parser.add_argument("--steps", type=int, default=3, help="measured steps of each order (after one warm-up)")
    parser.add_argument("--repeats", type=int, default=1, help="processes per configuration, run in turn")
    parser.add_argument("--child", nargs=2, metavar=("SETTING", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "bench_second_order.json"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_one(*args.child, args.steps)))
        return
    import numba
    import numpy

    results = []
    for repeat in range(args.repeats):
        for setting, mode in (c.split(":", 1) for c in args.configs):
            proc = subprocess.run([sys.executable, __file__, "--child", setting, mode, "--steps", str(args.steps)],
                                  capture_output=True, text=True, check=True)
            row = {"repeat": repeat, **json.loads(proc.stdout.strip().splitlines()[-1])}
            results.append(row)
            print(f"{setting:6s} {mode:12s} first {row['first']['step_s_median']:.2f} s  "
                  f"second {row['second']['step_s_median']:.2f} s  ratio {row['ratio_step_medians']:.2f} "
                  f"(pairs {row['ratio_per_pair']['min']:.2f}-{row['ratio_per_pair']['max']:.2f}; "
                  f"arch only {row['ratio_arch_medians']:.2f})  load {row['load_avg_before'][0]:.1f}"
                  f"->{row['load_avg_after'][0]:.1f}", flush=True)
    report = {
        "benchmark": "search step (architecture + weight step): second order (unrolled, DARTS) vs first order",
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cores": os.cpu_count(), "cpu": cpu_model(), "numpy": numpy.__version__,
                    "numba": numba.__version__, "threads": THREADS},
        "timing": (f"one process per configuration; first- and second-order steps alternate, one warm-up step "
                   f"of each, then {args.steps} of each; medians, and the ratio per adjacent pair"),
        "xi": LR,
        "results": results,
        "summary": _summary(results),
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
