"""Seconds per first-order search step (architecture step + weight step), peak memory, threads.

Each (setting, mode) runs in its own process, so that the peak resident set
size is that configuration's alone. Modes: ``ours-float``, ``ours-exact``,
``ours-<table name or .bin/.npy path>`` (any multiplier the CLI accepts),
``ours-multi<K>`` (the multiplier-aware search with the first K of exact,
mul8u_2P7, mul8u_17KS, mul8u_L40, ...: one sampled multiplier per searched op
each step, energy weight 1),
``workers<N>-<float|exact|table>`` (the search's own step split over N Ray
workers of threads/N threads each on a local Ray, runs/workers.py, with the
real sample data: ``workers1-float`` against ``workers2-float`` is one worker
of 2 threads against two of 1; these rows add each worker's exchanges, bytes
sent and seconds spent in exchanges per step),
``torch-float`` (the same supernet in torch, tests/torch_reference.py, with the
DARTS first-order procedure as DARTS writes it: the architecture step also
computes weight gradients and throws them away) and ``torch-float-frozen``
(the same, with the weights' ``requires_grad`` off during the architecture
step, as a careful torch user writes it). torch runs with its own OpenMP wait
policy (loaded before the package sets ``OMP_WAIT_POLICY`` and ``GOMP_SPINCOUNT``
for Numba) unless the environment sets one. Our rows record those two variables
and how many kernel calls per step ran serially because other processes took
the cores (``crowded_serial_calls_per_step``, ``approxdarts_np/kernels/crowding.py``).
Timing: median, min and max over the measured steps after warm-up steps (compilation, allocator and page faults
excluded). Every row of ours records the table-kernel path of the run (``table_kernels``:
vbmi, avx2 or scalar) and, over one untimed step, how many table convolutions ran on the
shuffle kernels, on the packed-tap depthwise kernel, on the bag kernel and on the per-tap loop
(``table_kernel_calls``; a table whose columns the AVX2 path does not take runs packed and bag
on an avx2 run). With ``--rounds R``
the whole list of modes runs R times round-robin
within each setting and a row reports the median of its R round medians (and
each round under ``rounds``): on a shared machine a disturbance then hits one
round of a row instead of a whole row.

Besides the main table the benchmark records (unless ``--no-extras``):

* ``threads``: ours-float at 1 thread and at 2 threads for the quick and paper
  settings, and the speed-up (one process, 1- and 2-thread steps alternating,
  so that both see the same background load);
* ``shared_machine``: the step with one competing CPU-bound process running
  (a pure-Python busy loop), against the step without it, alternating in one
  process;
* ``breakdown``: for the tiny setting, where one float step's time goes
  (cProfile, grouped by module: Python graph building, Python module code,
  Numba kernels including dispatch, NumPy element-wise work, allocation).

    python benchmarks/bench_search.py --settings paper quick tiny \\
        --modes ours-float ours-exact ours-mul8u_1446 torch-float torch-float-frozen --steps 3 --out FILE
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import avx2_target_env, machine_info, numba_builds_avx512, source_state

ROOT = Path(__file__).resolve().parents[1]
# The environment as the user gave it, before importing approxdarts_np adds its threading
# defaults: child processes start from it, so that torch rows keep torch's own OpenMP policy.
_USER_ENV = dict(os.environ)
THREADS = 2
SETTINGS = {
    "paper": dict(channels=16, layers=8, batch_size=64),  # DARTS search setting
    "quick": dict(channels=8, layers=5, batch_size=32),  # the CLI's quick default
    "tiny": dict(channels=4, layers=5, batch_size=16),  # where per-step fixed costs show
}
MODES = ["ours-float", "ours-exact", "ours-mul8u_1446", "ours-mul8u_2P7", "ours-mul8u_17KS", "torch-float",
         "torch-float-frozen"]
_BUSY_LOOP = "while True:\n    pass\n"


def _batches(cfg: dict):
    import numpy as np
    rng = np.random.default_rng(0)
    shape = (cfg["batch_size"], 3, 32, 32)
    return [(rng.standard_normal(shape).astype(np.float32), rng.integers(0, 10, cfg["batch_size"]))
            for _ in range(2)]


def _step_functions():
    """The search's ``architecture_step`` and ``weight_step``."""
    from approxdarts_np.runs.search import architecture_step, weight_step
    return architecture_step, weight_step


MULTI_CANDIDATES = ("exact", "mul8u_2P7", "mul8u_17KS", "mul8u_L40", "mul8u_1446", "mul8u_JQQ", "mul8u_7C1",
                    "mul8u_Y48")


def _multi_step(cfg: dict, batches, k: int):
    """One multiplier-aware search step with K candidates (a sampled multiplier per searched op, λ = 1)."""
    import numpy as np

    from approxdarts_np.approx.arithmetic import arithmetic_from_spec
    from approxdarts_np.nas.multiplier_choice import MultiplierNetwork, network_expected_energy, searched_op_macs
    from approxdarts_np.nn import SGD, Adam
    from approxdarts_np.runs.search import architecture_step, energy_prices, weight_step

    candidates = [arithmetic_from_spec(name) for name in MULTI_CANDIDATES[:k]]
    net = MultiplierNetwork(cfg["channels"], 10, cfg["layers"], candidates=candidates, seed=0)
    prices = energy_prices(candidates, required=True)
    macs = searched_op_macs(net)
    a_opt = Adam(net.arch_parameters(), lr=3e-4, betas=(0.5, 0.999), weight_decay=1e-3)
    w_opt = SGD(net.weights(), lr=0.025, momentum=0.9, weight_decay=3e-4)
    draws = {"n": 0}

    def penalty():
        energy, reference = network_expected_energy(net, macs, prices["pj"], prices["exact_pj"])
        return energy * (1.0 / reference)

    def step():
        net.choose(np.random.default_rng([0, draws["n"]]))
        draws["n"] += 1
        architecture_step(net, a_opt, *batches[0], penalty=penalty)
        weight_step(net, w_opt, *batches[1], grad_clip=5.0)
    return step


def _workers_step(setting: str, n: int, arith: str, threads: int):
    """One search step split over ``n`` Ray workers of ``threads // n`` threads (a local Ray), through the
    search's own worker pool: the real sample data, loaders and replicas. ``step.pool`` is the pool."""
    import ray

    from approxdarts_np.runs.search import SearchConfig
    from approxdarts_np.runs.workers import WorkerPool
    per = max(1, threads // n)
    config = SearchConfig.quick(output_dir="unused", workers=n, threads=per, max_train_images=None,
                                arithmetic="none" if arith == "float" else arith, **SETTINGS[setting])
    ray.init(num_cpus=n * per, include_dashboard=False, logging_level="warning", log_to_driver=False)
    pool = WorkerPool(ray, config, per)
    pool.begin_epoch(0)
    done = {"steps": 0}

    def step():
        pool.step(0, done["steps"])
        done["steps"] += 1
    step.pool = pool
    return step


def _exchange_per_step(before: list[dict], after: list[dict], steps: int) -> dict:
    """Per step and worker (mean and largest over the workers): exchanges, bytes sent, seconds in exchanges."""
    per = {key: [(a[key] - b[key]) / steps for a, b in zip(after, before)]
           for key in ("exchanges", "bytes_sent", "exchange_s")}
    return {f"{key}_per_step": {"mean": statistics.mean(v), "max": max(v)} for key, v in per.items()}


def _make_step(setting: str, mode: str, threads: int):
    """Build the network and optimizers of (setting, mode); return the function doing one search step."""
    cfg = SETTINGS[setting]
    batches = _batches(cfg)
    if mode.startswith("torch-") and "OMP_WAIT_POLICY" not in os.environ:
        # torch's best effort: its OpenMP starts with its own default wait policy, loaded
        # before approxdarts_np sets OMP_WAIT_POLICY=passive for Numba's pool.
        import torch  # noqa: F401
    from approxdarts_np.kernels.threads import configure_threads
    from approxdarts_np.nas.model_search import Network
    configure_threads(threads)
    impl, arith = mode.split("-", 1)
    if re.fullmatch(r"workers\d+", impl):
        return _workers_step(setting, int(impl[7:]), arith, threads)
    if impl == "ours" and re.fullmatch(r"multi\d+", arith):
        return _multi_step(cfg, batches, int(arith[5:]))
    if impl == "ours":
        from approxdarts_np.approx.arithmetic import arithmetic_from_spec
        from approxdarts_np.nn import SGD, Adam
        architecture_step, weight_step = _step_functions()
        net = Network(cfg["channels"], 10, cfg["layers"], seed=0,
                      arithmetic=arithmetic_from_spec(None if arith == "float" else arith))
        a_opt = Adam(net.arch_parameters(), lr=3e-4, betas=(0.5, 0.999), weight_decay=1e-3)
        w_opt = SGD(net.weights(), lr=0.025, momentum=0.9, weight_decay=3e-4)

        def step():
            architecture_step(net, a_opt, *batches[0])
            weight_step(net, w_opt, *batches[1], grad_clip=5.0)
        return step
    if arith not in ("float", "float-frozen"):
        raise SystemExit(f"unknown torch mode {mode!r}: torch-float or torch-float-frozen")
    import torch
    import torch.nn.functional as TF
    sys.path.insert(0, str(ROOT / "tests"))
    from torch_reference import TorchMirror
    torch.set_num_threads(threads)
    net = Network(cfg["channels"], 10, cfg["layers"], seed=0)
    mirror = TorchMirror(net)
    arch = [mirror.p(p) for p in net.arch_parameters()]
    weights = [mirror.p(p) for p in net.weights()]
    a_opt = torch.optim.Adam(arch, lr=3e-4, betas=(0.5, 0.999), weight_decay=1e-3)
    w_opt = torch.optim.SGD(weights, lr=0.025, momentum=0.9, weight_decay=3e-4)
    tb = [(torch.tensor(x), torch.tensor(y)) for x, y in batches]
    frozen = arith == "float-frozen"

    def step():
        # architecture step
        a_opt.zero_grad()
        if frozen:
            for t in weights:
                t.requires_grad_(False)
        TF.cross_entropy(mirror.run(net, tb[0][0]), tb[0][1]).backward()
        if frozen:
            for t in weights:
                t.requires_grad_(True)
        a_opt.step()
        # weight step
        w_opt.zero_grad()
        for t in arch:
            t.grad = None
        if frozen:
            for t in arch:
                t.requires_grad_(False)
        TF.cross_entropy(mirror.run(net, tb[1][0]), tb[1][1]).backward()
        if frozen:
            for t in arch:
                t.requires_grad_(True)
        torch.nn.utils.clip_grad_norm_(weights, 5.0)
        w_opt.step()
    return step


def _time(step, steps: int, warmup: int, cpu: list | None = None) -> list[float]:
    """Wall seconds of each measured step (the process CPU seconds appended to ``cpu`` when given)."""
    times = []
    for i in range(warmup + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if i >= warmup:
            times.append(dt)
            if cpu is not None:
                cpu.append(dc)
    return times


def _summary(times: list[float], cpu: list[float] | None = None) -> dict:
    out = {"step_s_median": statistics.median(times), "step_s_min": min(times), "step_s_max": max(times),
           "step_s_all": times}
    if cpu:
        out["cpu_s_median"] = statistics.median(cpu)
    return out


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def _one(setting: str, mode: str, steps: int, warmup: int, threads: int) -> dict:
    """Child process: time ``steps`` search steps after ``warmup`` ones."""
    load_before = os.getloadavg()
    user_policy = {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    step = _make_step(setting, mode, threads)
    # torch's OpenMP read the variables before the package set them; ours read them after
    policy = {k: (v if mode.startswith("torch-") else os.environ.get(k)) or "OpenMP default"
              for k, v in user_policy.items()}
    from approxdarts_np.kernels.crowding import crowding
    crowd = crowding()
    cpu: list[float] = []
    pool = getattr(step, "pool", None)
    exchange, crowded = {}, {}
    if pool is None:
        # the kernels the table convolutions took, counted over one step (not a timed one)
        with _table_kernel_calls() as taken:
            _time(step, 0, 1)
        serial_before = crowd.serial_calls
        times = _time(step, steps, max(warmup - 1, 0), cpu)
        # calls that ran serially because other processes took the cores (kernels/crowding.py)
        crowded["crowded_serial_calls_per_step"] = (crowd.serial_calls - serial_before) / max(
            steps + max(warmup - 1, 0), 1)
    else:
        _time(step, 0, warmup)
        before = pool.counters()
        times = _time(step, steps, 0, cpu)
        exchange = _exchange_per_step(before, pool.counters(), steps)
        exchange["workers"] = pool.size
        exchange["threads_per_worker"] = pool.threads
    return {"setting": setting, "mode": mode, "threads": threads, **SETTINGS[setting], **_summary(times, cpu),
            **exchange, **crowded,
            "repeats": steps, "warmup": warmup, "peak_rss_gb": _peak_rss_gb(),
            "omp_wait_policy": policy["OMP_WAIT_POLICY"], "gomp_spincount": policy["GOMP_SPINCOUNT"],
            **_kernel_path(mode),
            **({"table_kernel_calls": dict(taken)} if pool is None and "-" in mode
               and not mode.startswith("torch-") else {}),
            "load_before": load_before, "load_after": os.getloadavg()}


@contextlib.contextmanager
def _table_kernel_calls():
    """Count, per step, the table convolutions that ran on the shuffle kernels ("shuffle": vbmi
    or avx2, byte_shuffle.path()), on the packed-tap depthwise kernel ("packed": a column the
    shuffle path does not take, or no shuffle path), on the bag kernel ("bag": the same for a
    pointwise or dense convolution) and on the per-tap depthwise loop ("scalar": columns the
    packed lanes do not take). Yields the counts; the wrappers are removed on exit."""
    from approxdarts_np.approx import lut_conv as alut
    from approxdarts_np.kernels import byte_shuffle, packed_taps
    from approxdarts_np.kernels import lut_conv as klut

    counts = {"shuffle": 0, "packed": 0, "bag": 0, "scalar": 0}
    saved = []

    def patch(module, name, wrapper):
        saved.append((module, name, getattr(module, name)))
        setattr(module, name, wrapper(getattr(module, name)))

    def counter(key):
        def wrapper(f):
            def counted(*args, **kwargs):
                counts[key] += 1
                return f(*args, **kwargs)
            return counted
        return wrapper

    def scalar_unless_counted(f):
        def counted(*args, **kwargs):
            before = counts["shuffle"] + counts["packed"] + counts["bag"]
            out = f(*args, **kwargs)
            counts["scalar"] += counts["shuffle"] + counts["packed"] + counts["bag"] == before
            return out
        return counted

    for name in ("depthwise_lookup", "columns_lookup"):
        patch(byte_shuffle, name, counter("shuffle"))
    patch(packed_taps, "depthwise_packed", counter("packed"))
    patch(klut, "_bag_run", counter("bag"))
    for module in (klut, alut):
        if hasattr(module, "lut_depthwise_conv"):
            patch(module, "lut_depthwise_conv", scalar_unless_counted)
    try:
        yield counts
    finally:
        counts["path"] = byte_shuffle.path()
        for module, name, f in reversed(saved):
            setattr(module, name, f)


def _kernel_path(mode: str) -> dict:
    """The instruction sets this child ran with: our table-kernel path and whether Numba built
    for AVX-512 (ours), or torch's CPU capability (torch)."""
    if mode.startswith("torch-"):
        import torch
        return {"torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}
    from approxdarts_np.kernels import byte_shuffle
    spec = mode.split("-", 1)[1]
    engine = None
    if spec != "float" and not re.fullmatch(r"multi\d+", spec):
        from approxdarts_np.approx.arithmetic import arithmetic_from_spec
        plan = arithmetic_from_spec(spec).plan
        engine = {"engine": plan.engine, "rank": plan.rank, "reason": plan.reason}
    return {"table_kernels": byte_shuffle.path(), "arithmetic": engine,
            "numba_avx512": numba_builds_avx512()}


def _shared(setting: str, mode: str, steps: int, warmup: int, threads: int) -> dict:
    """Child process: steps without and with one more CPU-bound process, alternating.

    Alternating (a quiet step, then a step with a busy loop started just before it and
    killed right after) lets both see the same background load of the machine.
    """
    step = _make_step(setting, mode, threads)
    _time(step, 0, warmup)
    quiet, loaded = [], []
    for _ in range(steps):
        quiet += _time(step, 1, 0)
        busy = subprocess.Popen([sys.executable, "-c", _BUSY_LOOP])
        try:
            time.sleep(0.2)  # let the competitor start running
            loaded += _time(step, 1, 0)
        finally:
            busy.kill()
            busy.wait()
    q, s = statistics.median(quiet), statistics.median(loaded)
    return {"setting": setting, "mode": mode, "threads": threads, "competitors": 1,
            "quiet": _summary(quiet), "shared": _summary(loaded), "ratio_shared_to_quiet": s / q,
            "load_after": os.getloadavg()}


def _thread_scaling(setting: str, mode: str, steps: int, warmup: int, threads: int) -> dict:
    """Child process: steps on 1 thread and on ``threads`` threads, alternating (same background load)."""
    import numba
    step = _make_step(setting, mode, threads)
    times: dict[int, list[float]] = {1: [], threads: []}
    cpu: dict[int, list[float]] = {1: [], threads: []}
    for n in times:
        numba.set_num_threads(n)
        _time(step, 0, warmup)
    for _ in range(steps):
        for n in times:
            numba.set_num_threads(n)
            times[n] += _time(step, 1, 0, cpu[n])
    one, many = statistics.median(times[1]), statistics.median(times[threads])
    return {"setting": setting, "mode": mode, "one_thread": _summary(times[1], cpu[1]),
            f"{threads}_threads": _summary(times[threads], cpu[threads]), f"speedup_{threads}_over_1": one / many,
            "load_after": os.getloadavg()}


def _dispatchers() -> dict[tuple[str, str], bool]:
    """(source file, name) -> parallel? for every Numba dispatcher of the package's loaded modules."""
    from numba.core.dispatcher import Dispatcher
    found = {}
    for name, module in list(sys.modules.items()):
        if not name.startswith("approxdarts_np") or not getattr(module, "__file__", None):
            continue
        for attr, value in vars(module).items():
            if isinstance(value, Dispatcher):
                found[(module.__file__, attr)] = bool(value.targetoptions.get("parallel"))
    return found


def _launch_cost_us(parallel: bool, threads: int, repeats: int = 2000) -> float:
    """Microseconds per call of an almost empty kernel with array arguments (dispatch + thread launch)."""
    import numba
    import numpy as np

    @numba.njit(parallel=parallel)
    def tiny(x, y, n):
        for i in numba.prange(n):
            y[i] = x[i]

    x = np.zeros(threads, np.float32)
    y = np.zeros_like(x)
    tiny(x, y, threads)
    t0 = time.perf_counter()
    for _ in range(repeats):
        tiny(x, y, threads)
    return (time.perf_counter() - t0) / repeats * 1e6


def _classify(filename: str, func: str, dispatchers: dict | None = None) -> str:
    """The bucket a profiled function's own time goes to."""
    f = filename.replace("\\", "/")
    if dispatchers and (filename, func) in dispatchers:
        return "compiled Numba kernels (incl. dispatch and thread launch)"
    if "approxdarts_np/kernels/" in f or "approxdarts_np/approx/" in f:
        return "kernel wrappers (Python: argument checks, geometry, buffers)"
    if "approxdarts_np/autodiff/tensor.py" in f:
        return "autodiff engine (graph building, topological sort, gradient bookkeeping)"
    if "approxdarts_np/autodiff/" in f:
        return "op functions (Python around NumPy/kernels)"
    if "approxdarts_np/nn/" in f or "approxdarts_np/nas/" in f or "approxdarts_np/runs/" in f:
        return "modules, optimizers, step (Python)"
    if "/numba/" in f:
        return "Numba dispatcher (Python side)"
    if "threadpoolctl" in f:
        return "threadpoolctl"
    alloc = ("zeros", "empty", "ones", "copy", "ascontiguousarray", "astype", "full", "zeros_like",
             "empty_like", "ones_like", "concatenate")
    if f == "~" and any(a in func for a in alloc):
        return "allocation and copies (numpy.zeros/empty/copy/astype/concatenate)"
    if "/numpy/" in f:
        return "NumPy Python functions"
    return "other Python"


def _breakdown(setting: str, mode: str, steps: int, warmup: int, threads: int) -> dict:
    """Child process: where a step's time goes (cProfile grouped by module), plus unprofiled time."""
    import cProfile
    import pstats
    step = _make_step(setting, mode, threads)
    quiet = _time(step, steps, warmup)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    profiled = (time.perf_counter() - t0) / steps
    stats = pstats.Stats(prof).stats
    dispatchers = _dispatchers()
    buckets: dict[str, float] = {}
    calls = 0
    launches = {True: 0, False: 0}
    for (filename, _, func), (_, ncalls, tottime, _, callers) in stats.items():
        calls += ncalls
        key = _classify(filename, func, dispatchers)
        if (filename, func) in dispatchers:
            launches[dispatchers[(filename, func)]] += ncalls
        if filename == "~" and not key.startswith("allocation"):
            # a builtin (isinstance, len, a NumPy function): its time goes to its callers' buckets
            for (c_file, _, c_func), edge in callers.items():
                c_key = _classify(c_file, c_func, dispatchers)
                buckets[c_key] = buckets.get(c_key, 0.0) + edge[2] / steps
            continue
        buckets[key] = buckets.get(key, 0.0) + tottime / steps
    par_us, ser_us = _launch_cost_us(True, threads), _launch_cost_us(False, threads)
    launch = {"parallel_kernel_calls_per_step": launches[True] // steps,
              "serial_kernel_calls_per_step": launches[False] // steps,
              "empty_parallel_kernel_call_us": par_us, "empty_serial_kernel_call_us": ser_us,
              "estimated_dispatch_and_launch_s_per_step":
                  (launches[True] * par_us + launches[False] * ser_us) / steps * 1e-6}
    total = sum(buckets.values())
    return {"setting": setting, "mode": mode, "threads": threads, "step_s_unprofiled": statistics.median(quiet),
            "step_s_profiled": profiled, "python_calls_per_step": calls // steps, "kernel_launches": launch,
            "seconds_per_step": dict(sorted(buckets.items(), key=lambda kv: -kv[1])),
            "share": {k: v / total for k, v in sorted(buckets.items(), key=lambda kv: -kv[1])},
            "note": "cProfile own time per function, grouped by file; a builtin's time (isinstance, "
                    "NumPy C functions, ndarray methods) goes to the bucket of the function calling it, "
                    "except allocation and copies; NumPy arithmetic written with operators is counted "
                    "in the function where it is written. Profiling inflates the Python buckets, so "
                    "compare shares with step_s_unprofiled in mind. The time inside compiled Numba "
                    "kernels, and their dispatch (C code called from the kernel wrappers), is in the "
                    "kernels bucket."}


def _child(kind: str, setting: str, mode: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, setting, mode, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_USER_ENV)
    if proc.returncode != 0:
        return {"setting": setting, "mode": mode, "kind": kind, "error": proc.stderr.strip().splitlines()[-5:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--modes", nargs="+", default=MODES,
                        help="ours-float, ours-exact, ours-<table name or path>, torch-float, torch-float-frozen")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the list of modes this many times, round-robin, and report the "
                             "median of each row's round medians (a disturbance of the shared "
                             "machine then hits one round of a row, not the row)")
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--no-extras", action="store_true",
                        help="only the main table (no thread scaling, shared-machine case or breakdown)")
    parser.add_argument("--extras-only", action="store_true",
                        help="keep the main table of --out and measure only the extras again")
    parser.add_argument("--shared-modes", nargs="+", default=["ours-float", "ours-mul8u_1446"])
    parser.add_argument("--note", default="", help="free text stored in the JSON")
    parser.add_argument("--target", choices=["host", "avx2"], default="host",
                        help="avx2: every child builds and runs AVX2 code only (Numba for this host's "
                             "features minus AVX-512, torch with ATEN_CPU_CAPABILITY=avx2), as on a CPU "
                             "without AVX-512; needs an AVX2 host")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_search.json")
    args = parser.parse_args()
    for mode in args.modes:
        if not (mode.startswith("ours-") or re.match(r"workers\d+-", mode)
                or mode in ("torch-float", "torch-float-frozen")):
            parser.error(f"unknown mode {mode!r}")
    if args.target == "avx2":
        _USER_ENV.update(avx2_target_env(), ATEN_CPU_CAPABILITY="avx2")
    if args.child:
        kind, setting, mode = args.child
        fn = {"step": _one, "shared": _shared, "threads": _thread_scaling, "breakdown": _breakdown}[kind]
        print(json.dumps(fn(setting, mode, args.steps, args.warmup, args.threads)))
        return

    out = {"benchmark": "search step (architecture + weight step, first order)",
           "machine": machine_info(args.threads), "source": source_state(),
           "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "target": args.target,
           "timing": f"median (min, max) of {args.steps} steps after {args.warmup} warm-up step(s), "
                     f"{args.threads} threads; each (setting, mode) in its own process; peak RSS per process"
                     + (f"; {args.rounds} rounds of the mode list round-robin per setting, a row's median "
                        f"the median of its round medians" if args.rounds > 1 else ""),
           "note": args.note, "load_start": os.getloadavg(), "results": [], "threads": [],
           "shared_machine": [], "breakdown": []}

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")

    if args.extras_only and args.out.exists():
        previous = json.loads(args.out.read_text())
        out["results"] = previous["results"]
        out["load_start"] = previous.get("load_start")
        out["note"] = previous.get("note", "") + (" " + args.note if args.note else "")
    for setting in [] if args.extras_only else args.settings:
        rounds: dict[str, list[dict]] = {mode: [] for mode in args.modes}
        for r in range(args.rounds):
            for mode in args.modes:
                row = _child("step", setting, mode, args)
                rounds[mode].append(row)
                tag = f"round {r + 1}/{args.rounds} " if args.rounds > 1 else ""
                if "error" in row:
                    print(f"{setting:6s} {mode:20s} {tag}FAILED {row['error']}", flush=True)
                else:
                    print(f"{setting:6s} {mode:20s} {tag}{row['step_s_median']:8.3f} s/step "
                          f"[{row['step_s_min']:.3f}, {row['step_s_max']:.3f}]  peak {row['peak_rss_gb']:.2f} GB  "
                          f"load {row['load_before'][0]:.2f}->{row['load_after'][0]:.2f}", flush=True)
        for mode in args.modes:
            row = _merge_rounds(rounds[mode])
            out["results"].append(row)
            if args.rounds > 1 and "error" not in row:
                print(f"{setting:6s} {mode:20s} median of {args.rounds} rounds {row['step_s_median']:8.3f} s/step "
                      f"(round medians {', '.join(f'{m:.3f}' for m in row['round_medians'])})", flush=True)
        _ratios(out["results"], setting)
        save()
    if not args.no_extras:
        for setting in [s for s in ("quick", "paper") if s in args.settings]:
            entry = _child("threads", setting, "ours-float", args)
            out["threads"].append(entry)
            if "error" not in entry:
                print(f"{setting:6s} threads 1: {entry['one_thread']['step_s_median']:.3f} s, {args.threads}: "
                      f"{entry[f'{args.threads}_threads']['step_s_median']:.3f} s, speed-up "
                      f"{entry[f'speedup_{args.threads}_over_1']:.2f}x", flush=True)
            save()
        for setting in [s for s in ("tiny", "quick") if s in args.settings]:
            for mode in args.shared_modes:
                row = _child("shared", setting, mode, args)
                out["shared_machine"].append(row)
                if "error" not in row:
                    print(f"{setting:6s} {mode:20s} shared/quiet {row['ratio_shared_to_quiet']:.2f} "
                          f"({row['shared']['step_s_median']:.3f} / {row['quiet']['step_s_median']:.3f} s)",
                          flush=True)
                save()
        if "tiny" in args.settings:
            row = _child("breakdown", "tiny", "ours-float", args)
            out["breakdown"].append(row)
            save()
    out["load_end"] = os.getloadavg()
    save()
    print(f"wrote {args.out}")


def _merge_rounds(rows: list[dict]) -> dict:
    """One row from the rounds of a (setting, mode): the median of the round medians, the min and
    max over every step, the largest peak RSS, and each round's own figures under ``rounds``."""
    good = [r for r in rows if "error" not in r]
    if not good:
        return rows[0]
    if len(rows) == 1:
        return rows[0]
    medians = [r["step_s_median"] for r in good]
    merged = dict(good[0])
    merged.update({
        "step_s_median": statistics.median(medians),
        "step_s_min": min(r["step_s_min"] for r in good),
        "step_s_max": max(r["step_s_max"] for r in good),
        "step_s_all": [t for r in good for t in r["step_s_all"]],
        "round_medians": medians,
        "peak_rss_gb": max(r["peak_rss_gb"] for r in good),
        "load_before": good[0]["load_before"], "load_after": good[-1]["load_after"],
        "rounds": [{k: r.get(k) for k in ("step_s_median", "step_s_min", "step_s_max", "step_s_all",
                                          "cpu_s_median", "peak_rss_gb", "load_before", "load_after",
                                          "error")} for r in rows],
    })
    if all(r.get("cpu_s_median") for r in good):
        merged["cpu_s_median"] = statistics.median(r["cpu_s_median"] for r in good)
    return merged


def _ratios(results: list[dict], setting: str) -> None:
    rows = {r["mode"]: r for r in results if r["setting"] == setting and "error" not in r}
    for r in rows.values():
        for base in ("torch-float", "torch-float-frozen", "ours-float"):
            if base in rows:
                key = "ratio_to_" + base.replace("-", "_")
                r[key] = r["step_s_median"] / rows[base]["step_s_median"]
                if r.get("cpu_s_median") and rows[base].get("cpu_s_median"):
                    r["cpu_" + key] = r["cpu_s_median"] / rows[base]["cpu_s_median"]
                if base.startswith("torch"):
                    r["rss_ratio_to_" + base.replace("-", "_")] = r["peak_rss_gb"] / rows[base]["peak_rss_gb"]


if __name__ == "__main__":
    main()
