"""Where a search step's time goes, by convolution component: wall time per call site.

For each (setting, mode) a child process builds the step of ``bench_search.py``, wraps the
functions below with wall-clock timers (the time of a call includes the functions it calls,
so nested rows overlap: ``approx_conv2d`` contains the quantisation and the engine it runs),
warms up, and records seconds per step and calls per step over the measured steps. It
answers "what does an 8-bit step pay beyond the float step?": compare a mode's rows with the
float mode's convolution rows.

    python benchmarks/profile_step.py --settings quick --modes ours-float ours-exact \\
        ours-mul8u_1446 ours-mul8u_2P7 --steps 3 --out FILE
"""
from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from machine import avx2_target_env, machine_info, numba_builds_avx512, source_state

ROOT = Path(__file__).resolve().parents[1]

# (module, function names) timed at their call sites
TIMED = {
    "approxdarts_np.approx.convolution": ["approx_conv2d", "dequantize_codes"],
    "approxdarts_np.approx.lut_conv": ["quant_params", "codes_and_features", "feature_conv",
                                       "_gather_conv2d", "choose_engine", "lut_depthwise_conv",
                                       "lut_bag_conv", "lut_conv_codes", "im2col_codes", "weight_codes",
                                       "features_fit_float32"],
    "approxdarts_np.kernels.conv": ["conv2d", "conv2d_grad_input", "conv2d_grad_weight",
                                    "pointwise_conv2d_codes", "pointwise_codes_unchecked"],
    "approxdarts_np.kernels.byte_shuffle": ["tap_tables", "depthwise_lookup", "columns_lookup"],
    "approxdarts_np.kernels.packed_taps": ["tap_rows", "depthwise_packed"],
    "approxdarts_np.kernels.lut_conv": ["_bag_run"],
    "approxdarts_np.kernels.depthwise": ["depthwise_conv2d", "depthwise_conv2d_grad_input",
                                         "depthwise_conv2d_grad_weight", "depthwise_conv2d_codes",
                                         "depthwise_codes_unchecked"],
}


def _child(setting: str, mode: str, steps: int, warmup: int, threads: int) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_search

    totals: dict[str, float] = {}
    calls: dict[str, int] = {}

    def timed(key, f):
        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                totals[key] = totals.get(key, 0.0) + time.perf_counter() - t0
                calls[key] = calls.get(key, 0) + 1
        return wrapper

    for module_name, names in TIMED.items():
        module = importlib.import_module(module_name)
        for name in names:
            key = f"{module_name.rsplit('.', 1)[1]}.{name}"
            setattr(module, name, timed(key, getattr(module, name)))
    # (the package calls these through module attributes or names bound in these modules,
    # so every call site sees the wrappers)

    step = bench_search._make_step(setting, mode, threads)
    for _ in range(warmup):
        step()
    totals.clear()
    calls.clear()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    wall = (time.perf_counter() - t0) / steps
    rows = {k: {"s_per_step": v / steps, "calls_per_step": calls[k] // steps}
            for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}
    return {"setting": setting, "mode": mode, "threads": threads, "step_s_timed": wall,
            "numba_avx512": numba_builds_avx512(), "load_after": os.getloadavg(),
            "components": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=["quick"])
    parser.add_argument("--modes", nargs="+",
                        default=["ours-float", "ours-exact", "ours-mul8u_1446", "ours-mul8u_2P7"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--target", choices=["host", "avx2"], default="host",
                        help="avx2: the children build and run AVX2 code only (as bench_search.py "
                             "--target avx2)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "profile_step.json")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(*args.child, args.steps, args.warmup, args.threads)))
        return
    env = dict(os.environ)
    if args.target == "avx2":
        env.update(avx2_target_env(), ATEN_CPU_CAPABILITY="avx2")
    results = []
    for setting in args.settings:
        for mode in args.modes:
            cmd = [sys.executable, __file__, "--child", setting, mode, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode:
                raise SystemExit(proc.stderr)
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(row)
            top = ", ".join(f"{k} {v['s_per_step']:.3f}" for k, v in list(row["components"].items())[:4])
            print(f"{setting:6s} {mode:20s} {row['step_s_timed']:.3f} s/step: {top}", flush=True)
    os.environ.update(env)   # machine_info reports the target's features
    out = {"benchmark": "profile_step", "target": args.target, "machine": machine_info(args.threads),
           "source": source_state(), "command": " ".join(sys.argv), "timed": TIMED,
           "note": "wall time per call site, nested rows overlap; timers add a few us per call",
           "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
