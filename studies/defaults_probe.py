"""The measurement behind the budgeted search's default warm-up.

Runs the study's search settings (studies/budget_study.py: SEARCH, CANDIDATES) at one budget for
warm-up 0, 1, 2 of 4 epochs, each over two seeds, one after another with one kernel thread, and writes
one JSON record per search:
the share of pools and skips in the uncapped genotype (the collapse the warm-up is meant to delay), the
search's val accuracy, the argmax-β energy ratio against the budget, how decisive β became (mean largest
multiplier probability; 1/K = undecided) and how far it moved.

    python studies/defaults_probe.py --output-dir studies/results/defaults_probe
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from budget_study import CANDIDATES, SEARCH  # noqa: E402

BUDGET = 0.7
SETTINGS = [{"warmup_epochs": w, "beta_lr": 0.01} for w in (0, 1, 2)]


def main() -> int:
    from approxdarts_np.io.checkpoint import load_tree, write_json
    from approxdarts_np.runs.search import SearchConfig, run_search

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="studies/results/defaults_probe")
    parser.add_argument("--seeds", default="0,1")
    args = parser.parse_args()
    root = Path(args.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for setting in SETTINGS:
        for seed in (int(s) for s in args.seeds.split(",")):
            name = f"warmup{setting['warmup_epochs']}-betalr{setting['beta_lr']}-seed{seed}"
            folder = root / name
            t0 = time.time()
            done = (folder / "metrics.jsonl").exists() and \
                len((folder / "metrics.jsonl").read_text().splitlines()) == SEARCH["epochs"]
            if not done and (folder / "checkpoint.h5").exists():
                run_search(resume=folder)
            elif not done:
                run_search(SearchConfig.quick(output_dir=str(folder), seed=seed, multipliers=",".join(CANDIDATES),
                                              energy_budget=BUDGET, **setting, **SEARCH))
            metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
            alpha = load_tree(folder / "alpha.h5")
            betas = np.concatenate([alpha["betas_normal_history"][-1], alpha["betas_reduce_history"][-1]])
            p = np.exp(betas - betas.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            last = metrics[-1]
            records.append({"run": name, "seed": seed, **setting, "budget": BUDGET,
                            "skip_pool_share_uncapped": last["skip_pool_share_uncapped"],
                            "skip_pool_share_uncapped_per_epoch": [m["skip_pool_share_uncapped"] for m in metrics],
                            "val_acc": last["val_acc"], "energy_ratio_argmax": last["energy_ratio_argmax"],
                            "genotype_energy_ratio": last["genotype_energy_ratio"],
                            "lagrange_multiplier": last["lagrange_multiplier"],
                            "beta_largest_probability_mean": float(p.max(-1).mean()),
                            "beta_mean_abs": float(np.abs(betas).mean()), "wall_s": time.time() - t0})
            print(json.dumps(records[-1]), flush=True)
    write_json(root / "results.json", {"search": SEARCH, "candidates": CANDIDATES, "budget": BUDGET,
                                       "load_average_end": os.getloadavg(), "records": records})
    return 0


if __name__ == "__main__":
    sys.exit(main())
