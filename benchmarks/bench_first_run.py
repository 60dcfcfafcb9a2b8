"""Seconds from launch to the end of a default search's first steps, on an empty Numba cache.

Each run starts a fresh process with ``NUMBA_CACHE_DIR`` pointing at an empty folder, runs
``approxdarts-np search`` with its defaults (the quick preset on the bundled sample) and
records when each of the first three steps starts and ends, counted from the process's first
line. Two variants alternate, so that both see the same background load:

* ``split``: as a user runs it (the run compiles the serial kernel variants while a second
  process compiles the parallel ones, :mod:`approxdarts_np.runs.first_run`);
* ``one process``: the same with the split switched off (everything compiles in the run);
* ``second run``: the same command again on the cache the one-process run filled (what every
  later run costs).

    python benchmarks/bench_first_run.py --pairs 2 --out benchmarks/results/bench_first_run.json

``--target avx2`` runs every child with Numba building for this host's features minus AVX-512
(``NUMBA_CPU_FEATURES``), as on a CPU without it: the AVX2 table kernels are then the ones
compiled.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import avx2_target_env, machine_info, source_state

ROOT = Path(__file__).resolve().parents[1]

# The child: time stamps around Searcher.step, then the CLI as a user runs it; stops after 3 steps.
_CHILD = r"""
import sys, time
T0 = time.perf_counter()
from approxdarts_np.runs import search as S
real, count = S.Searcher.step, [0]
def step(self, epoch, step):
    print(f"STEP {count[0]} start {time.perf_counter() - T0:.2f}", file=sys.stderr, flush=True)
    result = real(self, epoch, step)
    print(f"STEP {count[0]} end {time.perf_counter() - T0:.2f}", file=sys.stderr, flush=True)
    count[0] += 1
    if count[0] == 3:
        raise SystemExit(0)
    return result
S.Searcher.step = step
sys.argv = ["approxdarts-np", "search", "--output-dir", sys.argv[1]]
from approxdarts_np_cli.launch import main
main()
"""


def _one(variant: str, cache: str, target_env: dict) -> dict:
    with tempfile.TemporaryDirectory() as out:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, **target_env)
        if variant == "one process":
            env["APPROXDARTS_NP_COMPILE_SPLIT"] = "0"
        load = os.getloadavg()
        done = subprocess.run([sys.executable, "-c", _CHILD, str(Path(out) / "run")], env=env,
                              capture_output=True, text=True, timeout=1800)
    stamps = {}
    for line in done.stderr.splitlines():
        if line.startswith("STEP "):
            _, k, what, t = line.split()
            stamps[f"step{k}_{what}_s"] = float(t)
    return {"variant": variant, **stamps, "load_before": load, "load_after": os.getloadavg(),
            "exit": done.returncode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--target", choices=["host", "avx2"], default="host")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/bench_first_run.json")
    args = parser.parse_args()
    target_env = avx2_target_env() if args.target == "avx2" else {}
    runs = []
    variants = ("one process", "second run", "split")
    for _ in range(args.pairs):
        with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as other:
            for variant in variants:
                runs.append(_one(variant, other if variant == "split" else cache, target_env))
                r = runs[-1]
                print(f"{variant:12s} step 0 starts {r.get('step0_start_s')} s, ends {r.get('step0_end_s')} s, "
                      f"step 2 ends {r.get('step2_end_s')} s (load {r['load_before'][0]:.2f})", flush=True)
    summary = {}
    for variant in variants:
        mine = [r for r in runs if r["variant"] == variant and "step0_end_s" in r]
        summary[variant] = {key: {"median": statistics.median(r[key] for r in mine),
                                  "min": min(r[key] for r in mine), "max": max(r[key] for r in mine)}
                            for key in ("step0_start_s", "step0_end_s", "step2_end_s")} if mine else None
    os.environ.update(target_env)   # machine_info reports the target's features
    result = {"benchmark": "seconds from launch to the first search steps, empty and filled Numba cache",
              "machine": machine_info(2), "source": source_state(), "target": args.target,
              "command": "approxdarts-np search (defaults: quick preset, bundled sample)",
              "timing": "seconds from the child's first line; step k's start and end",
              "summary": summary, "runs": runs, "date": time.strftime("%Y-%m-%d %H:%M")}
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
