"""How idle kernel threads wait: the search step with the package's default (a short spin, then
sleep, and serial kernels while other processes take the cores) against sleeping workers.

Each (setting, policy, neighbours) runs in its own process, round-robin over ``--rounds``:
- policy ``default``: the environment as the package leaves it (``GOMP_SPINCOUNT`` set at
  import, the check of ``approxdarts_np/kernels/crowding.py`` on);
- policy ``passive``: ``OMP_WAIT_POLICY=passive`` set by the user, so the workers sleep at once
  and, as before the spin, only calls of 2^17 elements or more wake them (the crowding check is
  on in both policies);
- neighbours: that many CPU-bound busy loops started before the process and stopped after it.
A row records the step medians, CPU seconds, how many kernel calls per step the crowding check
sent to a serial twin, the others' use the check saw last (cores), and what a call of an empty
parallel (and serial) kernel costs back to back, measured after the steps.

    python benchmarks/bench_wake.py --settings tiny quick paper --neighbours 0 1 2 --rounds 2 \\
        --out benchmarks/results/bench_wake.json
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

from machine import avx2_target_env, machine_info, source_state

ROOT = Path(__file__).resolve().parents[1]
_USER_ENV = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
POLICIES = {"default": {}, "passive": {"OMP_WAIT_POLICY": "passive"}}
_BUSY_LOOP = "while True:\n    pass\n"


def _child(setting: str, steps: int, warmup: int, threads: int) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_search
    from approxdarts_np.kernels import _util
    from approxdarts_np.kernels.crowding import crowding
    step = bench_search._make_step(setting, "ours-float", threads)
    bench_search._time(step, 0, warmup)
    state = crowding()
    serial_before = state.serial_calls
    cpu: list[float] = []
    times = bench_search._time(step, steps, 0, cpu)
    # what one parallel call of an empty kernel costs back to back (the wake-up), and a serial one
    launch = {"empty_parallel_call_us": bench_search._launch_cost_us(True, threads),
              "empty_serial_call_us": bench_search._launch_cost_us(False, threads)}
    return {"step_s_median": statistics.median(times), "step_s_all": times, **launch,
            "cpu_s_median": statistics.median(cpu),
            "crowded_serial_calls_per_step": (state.serial_calls - serial_before) / steps,
            "others_cores_last_seen": state.others, "serial_below": _util.SERIAL_BELOW,
            "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}}


def _run(setting: str, policy: str, neighbours: int, args) -> dict:
    busy = [subprocess.Popen([sys.executable, "-c", _BUSY_LOOP]) for _ in range(neighbours)]
    try:
        time.sleep(0.5 if busy else 0.0)
        load_before = os.getloadavg()
        cmd = [sys.executable, __file__, "--child", setting, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**_USER_ENV, **POLICIES[policy]})
    finally:
        for p in busy:
            p.kill()
            p.wait()
    row = {"setting": setting, "policy": policy, "neighbours": neighbours, "load_before": load_before,
           "load_after": os.getloadavg()}
    if proc.returncode != 0:
        return {**row, "error": proc.stderr.strip().splitlines()[-5:]}
    return {**row, **json.loads(proc.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=["tiny", "quick", "paper"])
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--neighbours", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--target", choices=["host", "avx2"], default="host",
                        help="avx2: Numba builds for this host's features minus AVX-512")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_wake.json")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.steps, args.warmup, args.threads)))
        return
    if args.target == "avx2":
        _USER_ENV.update(avx2_target_env())
    out = {"benchmark": "search step (float, first order) by how idle kernel threads wait",
           "machine": machine_info(args.threads), "source": source_state(),
           "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "target": args.target,
           "timing": f"median of {args.steps} steps after {args.warmup} warm-up steps, {args.threads} "
                     f"threads; rows in round-robin order, each in its own process",
           "rows": [], "date": time.strftime("%Y-%m-%d %H:%M")}
    for _ in range(args.rounds):
        for setting in args.settings:
            for neighbours in args.neighbours:
                for policy in args.policies:
                    row = _run(setting, policy, neighbours, args)
                    out["rows"].append(row)
                    print(json.dumps({k: row.get(k) for k in ("setting", "policy", "neighbours",
                                                             "step_s_median", "crowded_serial_calls_per_step",
                                                             "error")}), flush=True)
                    args.out.write_text(json.dumps(out, indent=1))
    summary = {}
    for row in out["rows"]:
        if "error" in row:
            continue
        key = f"{row['setting']} / {row['neighbours']} neighbours / {row['policy']}"
        summary.setdefault(key, []).append(row["step_s_median"])
    out["summary"] = {k: {"median_of_rounds": statistics.median(v), "rounds": v} for k, v in summary.items()}
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
