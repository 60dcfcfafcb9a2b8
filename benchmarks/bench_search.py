"""Seconds per first-order search step (architecture step + weight step) and peak memory.

Each (setting, mode) runs in its own process so that the peak resident set
size is that configuration's alone. The torch step is the same supernet
(tests/torch_reference.py mirrors our modules op for op) with the DARTS
first-order procedure, torch.set_num_threads(THREADS), in the same benchmark
run. Timing: median over the measured steps after warm-up steps (compilation,
allocator and page faults excluded).

    python benchmarks/bench_search.py [--settings paper quick] [--modes ...] [--steps 3] [--warmup 1]

Writes benchmarks/results/bench_search.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_model

ROOT = Path(__file__).resolve().parents[1]
THREADS = 2
SETTINGS = {
    "paper": dict(channels=16, layers=8, batch_size=64),  # DARTS search setting
    "quick": dict(channels=8, layers=5, batch_size=32),  # the CLI's quick default
}
MODES = ["ours-float", "ours-exact", "ours-mul8u_1446", "ours-mul8u_17KS", "torch-float"]


def _one(setting: str, mode: str, steps: int, warmup: int) -> dict:
    """Run in a child process: time `steps` search steps after `warmup` ones."""
    import numpy as np

    cfg = SETTINGS[setting]
    rng = np.random.default_rng(0)
    shape = (cfg["batch_size"], 3, 32, 32)
    batches = [(rng.standard_normal(shape).astype(np.float32), rng.integers(0, 10, cfg["batch_size"]))
               for _ in range(2)]
    from approxdarts_np.nas.model_search import Network
    from approxdarts_np.kernels.threads import configure_threads
    configure_threads(THREADS)
    impl, arith = mode.split("-", 1)
    if impl == "ours":
        from approxdarts_np.approx.convolution import arithmetic_from_spec
        from approxdarts_np.runs.search import architecture_step, weight_step
        from approxdarts_np.nn import SGD, Adam
        net = Network(cfg["channels"], 10, cfg["layers"], seed=0,
                      multiplier=arithmetic_from_spec(None if arith == "float" else arith))
        a_opt = Adam(net.arch_parameters(), lr=3e-4, betas=(0.5, 0.999), weight_decay=1e-3)
        w_opt = SGD(net.weights(), lr=0.025, momentum=0.9, weight_decay=3e-4)

        def step():
            architecture_step(net, a_opt, *batches[0])
            weight_step(net, w_opt, *batches[1], grad_clip=5.0)
    else:
        import torch
        import torch.nn.functional as TF
        sys.path.insert(0, str(ROOT / "tests"))
        from torch_reference import TorchMirror
        torch.set_num_threads(THREADS)
        net = Network(cfg["channels"], 10, cfg["layers"], seed=0)
        mirror = TorchMirror(net)
        arch = [mirror.p(p) for p in net.arch_parameters()]
        weights = [mirror.p(p) for p in net.weights()]
        a_opt = torch.optim.Adam(arch, lr=3e-4, betas=(0.5, 0.999), weight_decay=1e-3)
        w_opt = torch.optim.SGD(weights, lr=0.025, momentum=0.9, weight_decay=3e-4)
        tb = [(torch.tensor(x), torch.tensor(y)) for x, y in batches]

        def step():
            a_opt.zero_grad()
            TF.cross_entropy(mirror.run(net, tb[0][0]), tb[0][1]).backward()
            a_opt.step()
            w_opt.zero_grad()
            for t in arch:
                t.grad = None
            TF.cross_entropy(mirror.run(net, tb[1][0]), tb[1][1]).backward()
            torch.nn.utils.clip_grad_norm_(weights, 5.0)
            w_opt.step()

    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        step()
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times.sort()
    return {"setting": setting, "mode": mode, **cfg, "step_s_median": times[len(times) // 2],
            "step_s_all": times, "peak_rss_gb": peak_kb / 1024 ** 2}


def _machine() -> dict:
    import numba
    import numpy
    info = {"python": platform.python_version(), "platform": platform.platform(), "cores": os.cpu_count(),
            "numpy": numpy.__version__, "numba": numba.__version__, "threads": THREADS}
    try:
        import torch
        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = None
    info["cpu"] = cpu_model()
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_search.json")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_one(args.child[0], args.child[1], args.steps, args.warmup)))
        return
    results = []
    for setting in args.settings:
        for mode in args.modes:
            proc = subprocess.run([sys.executable, __file__, "--child", setting, mode, "--steps", str(args.steps),
                                   "--warmup", str(args.warmup)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{setting}/{mode} failed:\n{proc.stderr}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(row)
            print(f"{setting:6s} {mode:18s} {row['step_s_median']:8.3f} s/step  peak {row['peak_rss_gb']:.2f} GB",
                  flush=True)
    for setting in args.settings:
        rows = {r["mode"]: r for r in results if r["setting"] == setting}
        base = rows.get("ours-float")
        for r in rows.values():
            if "torch-float" in rows:
                r["ratio_to_torch_float"] = r["step_s_median"] / rows["torch-float"]["step_s_median"]
            if base:
                r["ratio_to_ours_float"] = r["step_s_median"] / base["step_s_median"]
    out = {"benchmark": "search step (architecture + weight step, first order)", "machine": _machine(),
           "timing": f"median of {args.steps} steps after {args.warmup} warm-up step(s); peak RSS per process",
           "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
