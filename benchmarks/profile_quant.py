"""What a quantised (exact or low-rank table) search step pays beyond the float step, per pass.

The 8-bit step runs the same network as the float step; only the searched convolutions
differ. This benchmark records every searched convolution of one search step (its shapes,
geometry and one sample of its operands per distinct shape), then replays each distinct
call on its sample and times, per call (best of ``--repeats`` after a warm-up), the pieces
the quantised convolution is made of next to the float convolution it replaces:

* ``float_forward``: the float kernel the float step runs (depthwise or dense conv);
* ``range_x``: the activation's min/max pass (``quant_params``);
* ``weights``: the weights' range, codes, features and filter constants (``weight_codes``);
* ``codes_kernel``: the fused kernel (quantise x, features, 1 + R float passes, scale);
  its parts, each timed on its own:
  ``codes_pass`` (quantising x to codes alone), ``codes_features_pass`` (codes and the
  1 + R feature planes written to memory), ``feature_conv`` (the float kernel on the
  1 + R feature channels, scaled: what the fused kernel computes after quantising);
* ``approx_forward``: the whole forward (``approx_conv2d``), whose remainder after the
  above is Python dispatch (``python_forward``);
* ``dequantize``: the backward's two de-quantisations (x and w); the backward's gradient
  kernels are the float step's.

Each piece's per-step seconds is the sum over the distinct calls of time x calls per step.
The step itself is timed too (``step_s``, median of ``--steps`` after warm-up) for the float
and the quantised mode, so that the sum of the extra pieces can be held against the
measured difference.

    python benchmarks/profile_quant.py --target avx2 --settings quick \\
        --modes ours-exact ours-mul8u_1446 --out results/profile_quant_avx2.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import avx2_target_env, machine_info, numba_builds_avx512, source_state

ROOT = Path(__file__).resolve().parents[1]


def _best(fn, repeats):
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _step_times(step, steps, warmup):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def _child(setting, mode, steps, warmup, repeats, threads):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import numpy as np

    import bench_search
    from approxdarts_np.approx import convolution as conv_mod
    from approxdarts_np.approx import lut_conv as lc
    from approxdarts_np.approx.lowrank import (activation_features, feature_conv,
                                               weight_error_rows)
    from approxdarts_np.approx.quantize import (codes_and_features, dequantize_codes,
                                                quant_params, weight_codes)
    from approxdarts_np.kernels import conv as kconv
    from approxdarts_np.kernels import depthwise as kdw
    from approxdarts_np.kernels.codes import float32_inverse

    float_step = bench_search._make_step(setting, "ours-float", threads)
    step = bench_search._make_step(setting, mode, threads)
    # the two steps alternate, so that both see the same background load
    for _ in range(warmup):
        float_step()
        step()
    float_times, times = [], []
    for _ in range(steps):
        float_times += _step_times(float_step, 1, 0)
        times += _step_times(step, 1, 0)

    calls = {}
    original = conv_mod.approx_conv2d

    def recording(x, w, plan, stride=1, padding=0, dilation=1, groups=1, engine="auto"):
        key = (x.shape, w.shape, stride, padding, dilation, groups)
        if key not in calls:
            calls[key] = {"count": 0, "x": x.copy(), "w": w.copy(), "plan": plan}
        calls[key]["count"] += 1
        return original(x, w, plan, stride, padding, dilation, groups, engine)

    conv_mod.approx_conv2d = recording
    step()
    conv_mod.approx_conv2d = original

    no_feat = np.zeros((0, 256), np.float32)
    rows = []
    totals = {}
    for key, rec in calls.items():
        x_shape, w_shape, stride, padding, dilation, groups = key
        x, w, plan, count = rec["x"], rec["w"], rec["plan"], rec["count"]
        depthwise = groups > 1 and groups == x.shape[1] == w.shape[0] and w.shape[1] == 1
        engine = lc.choose_engine(plan, x.shape, w.shape, lc._geometry(stride, padding,
                                                                        dilation)[0], groups)
        t = {}
        if depthwise:
            t["float_forward"] = _best(lambda: kdw.depthwise_conv2d(x, w, stride, padding,
                                                                    dilation), repeats)
        else:
            t["float_forward"] = _best(lambda: kconv.conv2d(x, w, stride, padding, dilation,
                                                            groups), repeats)
        t["approx_forward"] = _best(lambda: original(x, w, plan, stride, padding, dilation,
                                                     groups), repeats)
        t["range_x"] = _best(lambda: quant_params(x), repeats)
        sx, zx = quant_params(x)
        y, (qx, _, _), (qw, sw, zw) = original(x, w, plan, stride, padding, dilation, groups)
        t["dequantize"] = _best(lambda: (dequantize_codes(qx, sx, zx),
                                         dequantize_codes(qw, sw, zw)), repeats)
        if engine == "lowrank":
            act = activation_features(plan.factors, zx)
            err = weight_error_rows(plan.factors)
            t["weights"] = _best(lambda: weight_codes(w, err, act.const), repeats)
            _, _, _, wf, cst = weight_codes(w, err, act.const)
            n_feat = act.table.shape[1]
            geom = lc._geometry(stride, padding, dilation)
            inv = float32_inverse(sx)
            if depthwise:
                wf = wf.reshape(w.shape[0] * n_feat, 1, w.shape[2], w.shape[3])
                t["codes_kernel"] = _best(lambda: kdw.depthwise_codes_unchecked(
                    x, sx, inv, zx, act.table_t, act.affine, wf, cst, sx * sw,
                    geom[0] + geom[1] + geom[2]), repeats)
            else:
                t["codes_kernel"] = _best(lambda: kconv.pointwise_codes_unchecked(
                    x, sx, inv, zx, act.table_t, act.affine, wf, cst, sx * sw), repeats)
            t["codes_pass"] = _best(lambda: codes_and_features(x, sx, zx, no_feat, -1),
                                    repeats)
            t["codes_features_pass"] = _best(
                lambda: codes_and_features(x, sx, zx, act.table_t, act.affine), repeats)
            _, xf = codes_and_features(x, sx, zx, act.table_t, act.affine)
            t["feature_conv"] = _best(lambda: feature_conv(
                xf, wf, cst, n_feat, depthwise, stride, padding, dilation, groups, sx * sw),
                repeats)
            t["python_forward"] = max(0.0, t["approx_forward"] - t["range_x"] - t["weights"]
                                      - t["codes_kernel"])
        rows.append({"x": list(x_shape), "w": list(w_shape), "stride": stride,
                     "padding": padding, "dilation": dilation, "groups": groups,
                     "kind": "depthwise" if depthwise else "dense", "engine": engine,
                     "calls_per_step": count, "s_per_call": t})
        for name, v in t.items():
            totals[name] = totals.get(name, 0.0) + v * count
    f_med, q_med = statistics.median(float_times), statistics.median(times)
    return {"setting": setting, "mode": mode, "threads": threads,
            "numba_avx512": numba_builds_avx512(), "float_step_s": float_times,
            "step_s": times, "float_step_s_median": f_med, "step_s_median": q_med,
            "ratio_to_float": q_med / f_med, "extra_s_measured": q_med - f_med,
            "s_per_step": dict(sorted(totals.items(), key=lambda kv: -kv[1])),
            "calls": rows, "load_after": os.getloadavg()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=["quick"])
    parser.add_argument("--modes", nargs="+", default=["ours-exact", "ours-mul8u_1446"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--target", choices=["host", "avx2"], default="host")
    parser.add_argument("--note", default="")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "profile_quant.json")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(*args.child, args.steps, args.warmup, args.repeats,
                                args.threads)))
        return
    env = dict(os.environ)
    if args.target == "avx2":
        env.update(avx2_target_env(), ATEN_CPU_CAPABILITY="avx2")
    os.environ.update(env)
    out = {"benchmark": "profile_quant", "target": args.target,
           "machine": machine_info(args.threads), "source": source_state(),
           "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "note": args.note,
           "method": __doc__, "load_start": os.getloadavg(), "results": []}
    for setting in args.settings:
        for mode in args.modes:
            cmd = [sys.executable, __file__, "--child", setting, mode, "--steps",
                   str(args.steps), "--warmup", str(args.warmup), "--repeats",
                   str(args.repeats), "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode:
                raise SystemExit(proc.stderr)
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            out["results"].append(row)
            parts = ", ".join(f"{k} {v:.3f}" for k, v in row["s_per_step"].items())
            print(f"{setting:6s} {mode:18s} float {row['float_step_s_median']:.3f} "
                  f"8-bit {row['step_s_median']:.3f} ({row['ratio_to_float']:.2f}x): {parts}",
                  flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
