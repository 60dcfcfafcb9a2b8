"""A search whose steps are split over N Ray workers by image (``search --workers N``).

The driver (this process) runs the ordinary run loop (:class:`~approxdarts_np.runs.loop.RunLoop`)
on a :class:`ReplicatedSearch`: the same files, checkpoints and ``--resume`` as a search in one
process. Each worker is a Ray actor holding a full replica of the search (data, supernet,
optimizers) and computing its share of every step (:mod:`approxdarts_np.runs.replicas`); the
replicas stay identical, so the driver reads the state from worker 0 when it writes a
checkpoint or ends an epoch (the validation, the genotype and the result files are the
driver's, on its own copy of the search).

Faults. Every worker keeps the state it had before the step in progress. When a worker dies
during a step, the driver abandons the step (the others stop waiting for the lost one's
parts), returns every remaining worker to that state, starts a replacement with the state of
worker 0, and runs the step again; a replica computes the same bits for the same step, so the
run goes on as if nothing had happened. When no worker is left, or the replacements keep
dying, the run stops with a :class:`WorkersLost` error and the last checkpoint stays.

Ray is an optional extra: :func:`run_replicated_search` imports it (through
:func:`~approxdarts_np.runs.ray_cluster.import_ray`) and starts a local Ray unless an address
is given.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import numba

from approxdarts_np.errors import UserError
from approxdarts_np.kernels.threads import configure_threads
from approxdarts_np.runs.config import available_cores
from approxdarts_np.runs.loop import ProgressCallback, RunLoop, StepResult
from approxdarts_np.runs.ray_cluster import check_address_form, error_line, import_ray, quiet_ray_lines, start_ray
from approxdarts_np.runs.replicas import Lanes, ReplicaGroup, StepAborted, replicated
from approxdarts_np.runs.search import SearchConfig, Searcher, build_searcher, resolved_facts

#: The parts of a search's state that the replicas share (and a checkpoint takes from worker 0).
REPLICA_STATE = ("model", "w_optimizer", "a_optimizer", "b_optimizer", "dual")
#: Replacements started for one step before the run gives up.
MAX_REPLACEMENTS_PER_STEP = 3


class WorkersLost(UserError):
    """Every worker was lost, or the replacements kept dying: the run stopped at its last checkpoint."""


class SearchWorker:
    """One replica of a search, run as a Ray actor (see :func:`_actor_class`)."""

    def __init__(self, config: dict, rank: int, size: int, threads: int):
        self.threads = configure_threads(threads)
        self.searcher: Searcher = build_searcher(SearchConfig.from_dict(config))
        self.group = ReplicaGroup(rank, size)
        self.lanes = Lanes(self.group)  # kept across steps: their threads are reused
        self.before_step: dict | None = None

    def pid(self) -> int:
        return os.getpid()

    def connect(self, peers: list, generation: int) -> None:
        self.group.connect(peers, generation)

    def deposit(self, generation: int, seq: int, rank: int, part) -> None:
        self.group.deposit(generation, seq, rank, part)

    def abort(self, generation: int) -> None:
        self.group.abort(generation)

    def begin_epoch(self, epoch: int) -> dict:
        return self.searcher.begin_epoch(epoch)

    def step(self, epoch: int, step: int) -> StepResult:
        numba.set_num_threads(self.threads)  # a per-thread setting: Ray may call from another thread
        self.before_step = copy.deepcopy(self.state())
        with replicated(self.group, self.lanes):
            return self.searcher.step(epoch, step)

    def restore(self) -> None:
        """Back to the state before the step in progress (an abandoned step leaves it half done)."""
        if self.before_step is not None:
            self.load_state(self.before_step)

    def state(self) -> dict:
        tree = self.searcher.state_tree()
        return {key: tree[key] for key in REPLICA_STATE if key in tree}

    def load_state(self, tree: dict) -> None:
        self.searcher.load_state_tree({**self.searcher.state_tree(), **tree})

    def counters(self) -> dict:
        return self.group.counters()


def _actor_class(ray):
    """SearchWorker as a Ray actor: the calls that compute run one at a time on one thread; the peers'
    ``deposit``, the driver's ``abort`` and the counters run on threads of their own meanwhile."""
    messages = ray.method(concurrency_group="messages")
    calls = {name: messages(getattr(SearchWorker, name)) for name in ("deposit", "abort", "counters", "pid")}
    return ray.remote(concurrency_groups={"messages": 2})(type("SearchWorker", (SearchWorker,), calls))


class WorkerPool:
    """N search workers on Ray, connected to each other; steps them and replaces the ones that die."""

    def __init__(self, ray, config: SearchConfig, threads: int):
        self.ray, self.threads, self.size = ray, threads, config.workers
        self.config = config.to_dict()
        self.actor = _actor_class(ray)
        self.generation = 0
        self.workers = [self._start(rank) for rank in range(self.size)]
        self._connect()

    def _start(self, rank: int):
        return self.actor.options(num_cpus=self.threads).remote(self.config, rank, self.size, self.threads)

    def _connect(self) -> None:
        self.generation += 1
        self.ray.get([w.connect.remote(self.workers, self.generation) for w in self.workers])

    def all(self, method: str, *args) -> list:
        return self.ray.get([getattr(w, method).remote(*args) for w in self.workers])

    def begin_epoch(self, epoch: int) -> None:
        self.all("begin_epoch", epoch)

    def state(self) -> dict:
        return self.ray.get(self.workers[0].state.remote())

    def load_state(self, tree: dict) -> None:
        shared = self.ray.put({key: tree[key] for key in REPLICA_STATE if key in tree})
        self.ray.get([w.load_state.remote(shared) for w in self.workers])

    def step(self, epoch: int, step: int) -> StepResult:
        for _ in range(MAX_REPLACEMENTS_PER_STEP + 1):
            refs = [w.step.remote(epoch, step) for w in self.workers]
            lost = self._lost(refs)
            if not lost:
                return self.ray.get(refs[0])
            self._replace(lost, epoch, step)
        raise WorkersLost(f"workers kept dying at epoch {epoch + 1}, step {step + 1}: the run stopped and its "
                          f"last checkpoint is kept")

    def _lost(self, refs: list) -> list[int]:
        """Ranks whose worker died during the step; the others are told to abandon it when one did."""
        ray = self.ray
        lost, pending = [], list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(done[0])
            except ray.exceptions.RayActorError:
                lost.append(refs.index(done[0]))
                for w in self.workers:  # the others wait for the lost worker's parts: stop them
                    w.abort.remote(self.generation)
            except ray.exceptions.RayTaskError as exc:
                if not isinstance(exc.cause, StepAborted):
                    raise exc.cause from None
        return sorted(lost)

    def _replace(self, lost: list[int], epoch: int, step: int) -> None:
        """Every surviving worker back to its state before the step; a new worker for each lost one."""
        ray = self.ray
        survivors = [r for r in range(self.size) if r not in lost]
        if not survivors:
            raise WorkersLost(f"every worker was lost at epoch {epoch + 1}, step {step + 1}: the run stopped and "
                              f"its last checkpoint is kept")
        ray.get([self.workers[r].restore.remote() for r in survivors])
        state = ray.put(ray.get(self.workers[survivors[0]].state.remote()))
        for r in lost:
            self.workers[r] = self._start(r)
        ray.get([self.workers[r].load_state.remote(state) for r in lost])
        ray.get([self.workers[r].begin_epoch.remote(epoch) for r in lost])
        self._connect()

    def counters(self) -> list[dict]:
        return self.all("counters")

    def stop(self) -> None:
        for w in self.workers:
            self.ray.kill(w)


class ReplicatedSearch:
    """The run-loop task of a search over workers: steps on the workers, the rest on a local copy."""

    kind = "search"

    def __init__(self, local: Searcher, pool: WorkerPool):
        self.local, self.pool = local, pool
        self.config = local.config
        self.steps_per_epoch = local.steps_per_epoch
        self._pulled = False  # whether the local copy holds the replicas' state (no step since)

    def parameter_count(self) -> int:
        return self.local.parameter_count()

    def begin_epoch(self, epoch: int) -> dict:
        self.pool.begin_epoch(epoch)
        return self.local.begin_epoch(epoch)

    def step(self, epoch: int, step: int) -> StepResult:
        self._pulled = False
        return self.pool.step(epoch, step)

    def _pull(self) -> None:
        """The local copy takes the replicas' state (they are identical; worker 0's is read), once after
        the steps (an epoch's end and the checkpoint after it read it once)."""
        if not self._pulled:
            self.local.load_state_tree({**self.local.state_tree(), **self.pool.state()})
            self._pulled = True

    def end_epoch(self, epoch: int, sums: dict, begun: dict) -> dict:
        self._pull()
        return self.local.end_epoch(epoch, sums, begun)

    def state_tree(self) -> dict:
        self._pull()
        return self.local.state_tree()

    def load_state_tree(self, tree: dict) -> None:
        self.local.load_state_tree(tree)
        self.pool.load_state(tree)
        self._pulled = True

    def write_results(self, folder: Path) -> None:
        self.local.write_results(folder)

    def summary(self, metrics: list) -> dict:
        return self.local.summary(metrics)


def worker_threads(config: SearchConfig, address: str | None) -> int:
    """Threads of each worker: ``--threads``, else (on a local Ray) the cores shared out among the workers."""
    if config.threads is not None:
        return config.threads
    return max(1, available_cores() // config.workers) if address is None else 1


def run_replicated_search(config: SearchConfig, output_dir: Path, resume: bool,
                          progress: ProgressCallback | None = None, address: str | None = None) -> dict:
    """:func:`~approxdarts_np.runs.search.run_search` with the steps split over ``config.workers`` Ray workers."""
    check_address_form(address)
    threads = worker_threads(config, address)
    if address is None and config.workers * threads > available_cores():
        raise UserError(f"--workers {config.workers} with --threads {threads} needs {config.workers * threads} "
                        f"cores; this machine has {available_cores()} (give --address to use a Ray cluster)")
    ray = import_ray("a search over several workers")  # a missing Ray fails before the data is read
    local = build_searcher(config)
    quiet_ray_lines()
    started_here = start_ray(ray, address)
    pool = None
    try:
        pool = WorkerPool(ray, config, threads)
        loop = RunLoop(ReplicatedSearch(local, pool), output_dir, progress)
        resolved = resolved_facts(local, threads) | {"workers": config.workers}
        configure_threads(None if address is None else threads)
        try:
            return loop.resume(resolved) if resume else loop.start(resolved)
        except ray.exceptions.RayError as exc:
            raise WorkersLost(f"a worker failed: {error_line(exc)}; the last checkpoint is kept") from None
    finally:
        if pool is not None:
            pool.stop()
        if started_here:
            ray.shutdown()
