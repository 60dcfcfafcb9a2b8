"""The budgeted-search study: does a multiplier-aware search under an energy budget beat the naive choices?

Arms, each over the same seeds, each trained with the same budget:

(a) uniform   -- a plain search (ApproxDARTS) with one multiplier for every searched convolution, the
                 genotype trained with that multiplier: exact, mul8u_1446, mul8u_2P7, mul8u_17KS, mul8u_L40;
(b) budget    -- a multiplier-aware search over CANDIDATES with --energy-budget r, the genotype trained with
                 the multipliers it names;
(b') budget_beta -- the same searches' cells with argmax-β multipliers projected into the budget (the search
                 records this genotype beside the one it returns), trained the same way: what the measured
                 sensitivities add over β;
(c) random    -- a random cell pair with random per-op multipliers from CANDIDATES (DARTS's random-search
                 draw, at most as many pools/skips per cell as the searches may keep), redrawn until its
                 energy ratio lies within [r - 0.05, r], trained with its multipliers.

Every search uses the same settings (SEARCH), every training the same settings (TRAIN); accuracy is the
trained network's on the sample's test images after the last epoch (nothing is chosen on it), energy is
priced on DARTS's evaluation network (20 cells, 36 channels). Each (arm, seed) is one job in its own
process with one kernel thread; --jobs N run side by side. A finished job leaves row.json in its folder
and is not run again, so an interrupted study continues where it stopped.

    python studies/budget_study.py --output-dir studies/results/budget --jobs 2

writes results.json (settings, one row per job, per-arm mean and sample std), results.csv and pareto.png.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

CANDIDATES = ["exact", "mul8u_2P7", "mul8u_17KS", "mul8u_L40"]
UNIFORM = ["exact", "mul8u_1446", "mul8u_2P7", "mul8u_17KS", "mul8u_L40"]
BUDGETS = [0.5, 0.7, 0.9]
RANDOM_WINDOW = 0.05  # a random genotype for budget r has its ratio in [r - RANDOM_WINDOW, r]
SEARCH = dict(epochs=4, channels=4, layers=5, batch_size=16, max_train_images=640, threads=1)
TRAIN = dict(epochs=3, channels=8, layers=5, batch_size=32, max_train_images=2048, threads=1)
EVAL_SIZE = dict(channels=36, layers=20)


def jobs(seeds: list[int]) -> list[dict]:
    out = []
    for seed in seeds:
        out += [{"arm": "budget", "budget": r, "seed": seed} for r in BUDGETS]
        out += [{"arm": "uniform", "multiplier": m, "seed": seed} for m in UNIFORM]
        out += [{"arm": "random", "budget": r, "seed": seed} for r in BUDGETS]
    for seed in seeds:  # after every budget search: they train the cells those searches found
        out += [{"arm": "budget_beta", "budget": r, "seed": seed} for r in BUDGETS]
    return out


def job_name(job: dict) -> str:
    what = job.get("multiplier") or f"r{job['budget']}"
    return f"{job['arm']}-{what}-seed{job['seed']}"


def random_genotype_in_budget(budget: float, seed: int):
    """A random genotype whose energy ratio lies in [budget - RANDOM_WINDOW, budget], and the draws it took."""
    import numpy as np

    from approxdarts_np.nas.budget import energy_ratio, random_genotype
    from approxdarts_np.runs.search import SearchConfig, energy_prices
    from approxdarts_np.approx.arithmetic import arithmetic_from_spec

    prices = energy_prices([arithmetic_from_spec(n) for n in CANDIDATES], required=True)
    pj = dict(zip(CANDIDATES, map(float, prices["pj"])))
    rng = np.random.default_rng([seed, int(round(budget * 1000)), 11])
    cap = SearchConfig().max_parameter_free
    for draws in range(1, 100001):
        genotype = random_genotype(rng, CANDIDATES, cap)
        ratio = energy_ratio(genotype, pj, prices["exact_pj"], **EVAL_SIZE)
        if budget - RANDOM_WINDOW <= ratio <= budget:
            return genotype, draws
    raise RuntimeError(f"no random genotype within budget {budget} in 100000 draws")


def run_job(job: dict, root: str) -> dict | None:
    """Search (arms a, b) or draw (arm c), train, and price one job; returns its row (also in row.json), or
    None when another invocation of the study is running that job."""
    from approxdarts_np.errors import UserError
    try:
        return _run_job(job, root)
    except UserError as exc:
        if "in use by another run" in str(exc):
            return None
        raise


def _run_job(job: dict, root: str) -> dict:
    from approxdarts_np.approx.arithmetic import arithmetic_from_spec
    from approxdarts_np.io.checkpoint import write_json
    from approxdarts_np.nas.budget import energy_ratio, parameter_free_share
    from approxdarts_np.nas.genotypes import Genotype
    from approxdarts_np.runs.report import network_energy
    from approxdarts_np.runs.search import SearchConfig, energy_prices, run_search
    from approxdarts_np.runs.train import TrainConfig, run_train

    folder = Path(root) / job_name(job)
    row_path = folder / "row.json"
    if row_path.exists():
        return json.loads(row_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    started = time.time()
    seed = job["seed"]
    search_s = 0.0
    extra = {}
    if job["arm"] == "random":
        genotype, draws = random_genotype_in_budget(job["budget"], seed)
        extra["random_draws"] = draws
    elif job["arm"] == "budget_beta":
        search_dir = Path(root) / job_name({**job, "arm": "budget"}) / "search"
        last = [json.loads(line) for line in (search_dir / "metrics.jsonl").read_text().splitlines()][-1]
        genotype = Genotype.from_dict(last["genotype_beta_projected"])
        extra["search_from"] = str(search_dir)
    else:
        search_dir = folder / "search"
        if job["arm"] == "uniform":
            config = SearchConfig.quick(output_dir=str(search_dir), seed=seed, arithmetic=job["multiplier"],
                                        **SEARCH)
        else:
            config = SearchConfig.quick(output_dir=str(search_dir), seed=seed, multipliers=",".join(CANDIDATES),
                                        energy_budget=job["budget"], **SEARCH)
        t0 = time.time()
        summary = (run_search(resume=search_dir) if (search_dir / "checkpoint.h5").exists()
                   else run_search(config))
        search_s = time.time() - t0
        genotype = Genotype.from_dict(summary["genotype"])
        last = [json.loads(line) for line in (search_dir / "metrics.jsonl").read_text().splitlines()][-1]
        extra["search_val_acc"] = last["val_acc"]
        extra["skip_pool_share_uncapped"] = last.get("skip_pool_share_uncapped")
        for key in ("lagrange_multiplier", "energy_ratio", "energy_ratio_argmax", "genotype_energy_ratio_argmax",
                    "projection_moves"):
            if key in last:  # the search's own figures at its last epoch, kept apart from the row's
                extra[f"search_{key}"] = last[key]
    train_dir = folder / "train"
    arithmetic = job.get("multiplier", "genotype")
    t0 = time.time()
    if (train_dir / "checkpoint.h5").exists():
        trained = run_train(resume=train_dir)
    else:
        trained = run_train(TrainConfig.quick(output_dir=str(train_dir), seed=seed, genotype=genotype.to_dict(),
                                              arithmetic=arithmetic, **TRAIN))
    train_s = time.time() - t0
    names = CANDIDATES if job["arm"] != "uniform" else [job["multiplier"]]
    prices = energy_prices([arithmetic_from_spec(n) for n in names], required=True)
    pj = dict(zip(names, map(float, prices["pj"])))
    priced = genotype if job["arm"] != "uniform" else _uniform(genotype, job["multiplier"])
    report, params = network_energy(priced, EVAL_SIZE["channels"], EVAL_SIZE["layers"], "genotype"
                                    if priced.has_multipliers else "exact")
    ops = [op for op, _ in genotype.normal + genotype.reduce]
    mults = [m for m in priced.multipliers("normal") + priced.multipliers("reduce") if m is not None]
    row = {"job": job_name(job), **job, "test_acc": trained["test_acc"],
           "energy_ratio": energy_ratio(priced, pj, prices["exact_pj"], **EVAL_SIZE),
           "energy_uj": report.energy_approx_pj / 1e6, "energy_exact8_uj": report.energy_exact8_pj / 1e6,
           "energy_fp32_uj": report.energy_fp32_pj / 1e6, "parameters": params,
           "searched_conv_share": sum(op.startswith(("sep", "dil")) for op in ops) / len(ops),
           "skip_pool_share": parameter_free_share(genotype),
           "multiplier_mix": {m: mults.count(m) for m in sorted(set(mults))},
           "genotype": priced.to_dict(), "search_s": search_s, "train_s": train_s,
           "wall_s": time.time() - started, **extra}
    write_json(row_path, row)
    return row


def _uniform(genotype, name):
    """The genotype with ``name`` on every kept searched conv (how the uniform arm runs and is priced)."""
    from approxdarts_np.nas.genotypes import Genotype

    def names(pairs):
        return [name if op.startswith(("sep", "dil")) else None for op, _ in pairs]
    return Genotype(genotype.normal, genotype.normal_concat, genotype.reduce, genotype.reduce_concat,
                    normal_multipliers=names(genotype.normal), reduce_multipliers=names(genotype.reduce))


def arm_label(row: dict) -> str:
    if row["arm"] == "uniform":
        return f"uniform {row['multiplier']}"
    return f"{row['arm']} r={row['budget']}"


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(arm_label(row), []).append(row)
    out = []
    for label, members in groups.items():
        entry = {"arm": label, "seeds": len(members)}
        for key in ("test_acc", "energy_ratio", "energy_uj", "searched_conv_share"):
            values = [m[key] for m in members]
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
            entry[f"{key}_mean"], entry[f"{key}_std"] = mean, std
        out.append(entry)
    return sorted(out, key=lambda e: e["energy_ratio_mean"])


def plot(summary: list[dict], rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"uniform": "tab:blue", "budget": "tab:red", "budget_beta": "tab:orange", "random": "tab:gray"}
    fig, ax = plt.subplots(figsize=(9, 6))
    for row in rows:
        ax.scatter(row["energy_ratio"], 100 * row["test_acc"], s=12, alpha=0.35, color=colours[row["arm"]])
    for kind in colours:
        shown = False
        for e in summary:
            if e["arm"].split(" ")[0] != kind:
                continue
            ax.errorbar(e["energy_ratio_mean"], 100 * e["test_acc_mean"], xerr=e["energy_ratio_std"],
                        yerr=100 * e["test_acc_std"], fmt="o", ms=7, capsize=4, color=colours[kind],
                        label=None if shown else {
                            "uniform": "(a) uniform multiplier, searched cell",
                            "budget": "(b) budgeted search, sensitivity allocation",
                            "budget_beta": "(b') budgeted search, argmax β projected",
                            "random": "(c) random cell + multipliers, matched to r"}[kind])
            shown = True
            ax.annotate(e["arm"].split(" ", 1)[1], (e["energy_ratio_mean"], 100 * e["test_acc_mean"]),
                        textcoords="offset points", xytext=(6, 6), fontsize=8, color=colours[kind])
    ax.set_xlabel("energy of the searched convolutions / exact 8-bit (20 cells, 36 channels)")
    ax.set_ylabel("test accuracy (%), sample test set")
    ax.set_title("Budgeted multiplier search vs uniform and random choices\n"
                 "mean ± sample std over seeds; small dots: single seeds")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(root: Path, rows: list[dict], settings: dict) -> None:
    import csv

    from approxdarts_np.io.checkpoint import write_json, write_text

    rows = sorted(rows, key=lambda r: r["job"])
    summary = summarise(rows)
    write_json(root / "results.json", {"settings": settings, "summary": summary, "rows": rows})
    columns = ["job", "arm", "multiplier", "budget", "seed", "test_acc", "energy_ratio", "energy_uj",
               "searched_conv_share", "skip_pool_share", "multiplier_mix", "search_val_acc",
               "search_lagrange_multiplier", "search_projection_moves", "search_s", "train_s"]
    import io
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "multiplier_mix": json.dumps(row["multiplier_mix"])})
    write_text(root / "results.csv", out.getvalue())
    write_text(root / "summary.md", summary_table(summary, rows))
    plot(summary, rows, root / "pareto.png")


def summary_table(summary: list[dict], rows: list[dict]) -> str:
    """The per-arm table as Markdown: energy ratio and test accuracy (mean ± sample std), seeds, the seeds'
    accuracies one by one, and the share of searched convs among the kept ops."""
    lines = ["| arm | energy ratio (20 cells, 36 ch) | test accuracy % | per seed % | searched convs |",
             "| --- | --- | --- | --- | --- |"]
    for e in summary:
        seeds = sorted((r for r in rows if arm_label(r) == e["arm"]), key=lambda r: r["seed"])
        lines.append(f"| {e['arm']} | {e['energy_ratio_mean']:.3f} ± {e['energy_ratio_std']:.3f} | "
                     f"{100 * e['test_acc_mean']:.2f} ± {100 * e['test_acc_std']:.2f} | "
                     f"{', '.join(format(100 * r['test_acc'], '.1f') for r in seeds)} | "
                     f"{100 * e['searched_conv_share_mean']:.0f} % |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="studies/results/budget")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=2, help="jobs side by side (one kernel thread each)")
    parser.add_argument("--only", default=None, help="run only jobs whose name starts with one of these "
                        "comma-separated prefixes (e.g. uniform, budget, budget_beta, random, budget-r0.5)")
    parser.add_argument("--reverse", action="store_true", help="take the jobs last first (a second invocation "
                        "on the same folder then meets the first one only at the end)")
    parser.add_argument("--summarise-only", action="store_true",
                        help="run nothing; rebuild results.json, results.csv and pareto.png from the jobs done")
    args = parser.parse_args()
    root = Path(args.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    todo = jobs([int(s) for s in args.seeds.split(",")])
    if args.only:
        prefixes = [p if p.endswith("-") or "-" in p else p + "-" for p in args.only.split(",")]
        todo = [j for j in todo if job_name(j).startswith(tuple(prefixes))]
    if args.reverse:
        todo = todo[::-1]
    if args.summarise_only:
        todo = []
    settings = {"candidates": CANDIDATES, "uniform": UNIFORM, "budgets": BUDGETS, "random_window": RANDOM_WINDOW,
                "search": SEARCH, "train": TRAIN, "energy_priced_on": EVAL_SIZE, "seeds": args.seeds,
                "jobs_side_by_side": args.jobs, "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                            "python": sys.version.split()[0]},
                "command": " ".join(sys.argv)}
    started = time.time()
    settings["load_average_start"] = os.getloadavg()
    rows = []
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_job, job, str(root)): job for job in todo}
        for future in concurrent.futures.as_completed(futures):
            row = future.result()
            if row is None:
                continue  # another invocation holds that job's folder
            rows.append(row)
            print(f"{len(rows):3d}/{len(todo)}  {row['job']:<32} test {100 * row['test_acc']:5.2f}%  "
                  f"ratio {row['energy_ratio']:.3f}  {time.time() - started:6.0f} s", flush=True)
    settings["wall_s"] = time.time() - started
    settings["load_average_end"] = os.getloadavg()
    # the outputs cover every job done in this folder, whichever invocation ran it
    done = [json.loads(p.read_text()) for p in sorted(root.glob("*/row.json"))]
    settings["jobs_done"] = len(done)
    write_outputs(root, done, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
