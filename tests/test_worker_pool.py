"""The worker pool's fault handling, on a stand-in for Ray: a lost worker is replaced and the step rerun;
with no survivor, or when the replacements keep dying, the run stops with WorkersLost.

The real pool on Ray (a killed worker, resume, a two-node cluster) is tests/test_workers.py; these cases
drive the pool's own decisions with workers whose fate each test scripts.
"""
from __future__ import annotations

import types

import pytest

from approxdarts_np.runs import workers
from approxdarts_np.runs.replicas import StepAborted
from approxdarts_np.runs.search import SearchConfig


class ActorDied(Exception):
    pass


class TaskFailed(Exception):
    def __init__(self, cause):
        super().__init__(str(cause))
        self.cause = cause


class Ref:
    def __init__(self, value=None, error=None):
        self.value, self.error = value, error


class FakeRay:
    """What WorkerPool uses of Ray. ``deaths`` lists, per step attempt, the ranks whose worker dies in it."""

    exceptions = types.SimpleNamespace(RayActorError=ActorDied, RayTaskError=TaskFailed)

    def __init__(self, deaths):
        self.deaths = list(deaths)
        self.started, self.log = [], []

    def method(self, **_):
        return lambda f: f

    def remote(self, **_):
        ray = self

        class ActorClass:
            def __init__(self, cls):
                pass

            def options(self, **_):
                return self

            def remote(self, config, rank, size, threads):
                worker = Worker(ray, rank)
                ray.started.append(rank)
                return worker

        return ActorClass

    def get(self, refs):
        if isinstance(refs, list):
            return [self.get(r) for r in refs]
        if refs.error is not None:
            raise refs.error
        return refs.value

    def wait(self, pending, num_returns=1):
        return pending[:1], pending[1:]

    def put(self, value):
        return Ref(value)

    def kill(self, worker):
        pass


class Call:
    def __init__(self, fn):
        self.remote = fn


class Worker:
    def __init__(self, ray, rank):
        self.ray, self.rank = ray, rank
        for name in ("connect", "begin_epoch", "abort", "counters"):
            setattr(self, name, Call(lambda *a, _n=name: self._note(_n)))
        self.restore = Call(lambda: self._note("restore"))
        self.state = Call(lambda: Ref({"weights": self.rank}))
        self.load_state = Call(lambda tree: self._note("load_state"))
        self.step = Call(self._step)

    def _note(self, what):
        self.ray.log.append((what, self.rank))
        return Ref(None)

    def _step(self, epoch, step):
        dying = self.ray.deaths[0] if self.ray.deaths else ()
        if self.rank in dying:
            return Ref(error=ActorDied())
        if dying:  # a peer died: this worker is told to abandon the step
            return Ref(error=TaskFailed(StepAborted()))
        return Ref(("result", epoch, step))


def _pool(deaths, size=2):
    """A pool of ``size`` stand-in workers; ``deaths[k]``: the ranks that die in the k-th step attempt."""
    ray = FakeRay(deaths)
    pool = workers.WorkerPool(ray, SearchConfig.quick(workers=size), threads=1)
    lost = pool._lost

    def lost_then_next(refs):  # an attempt's workers were started in one go: the next attempt's fate
        out = lost(refs)
        if ray.deaths:
            ray.deaths.pop(0)
        return out

    pool._lost = lost_then_next
    return ray, pool


def test_a_lost_worker_is_replaced_and_the_step_rerun():
    ray, pool = _pool([{1}])
    assert pool.step(0, 5) == ("result", 0, 5)
    assert ray.started == [0, 1, 1]  # the two workers, then one replacement for rank 1
    assert ("restore", 0) in ray.log and ("load_state", 1) in ray.log and ("begin_epoch", 1) in ray.log
    assert pool.generation == 2  # reconnected under a new generation


def test_with_no_worker_left_the_run_stops():
    ray, pool = _pool([{0, 1}])
    with pytest.raises(workers.WorkersLost, match="every worker was lost at epoch 1, step 6"):
        pool.step(0, 5)
    assert ray.started == [0, 1]  # nothing replaced


def test_replacements_that_keep_dying_stop_the_run():
    attempts = workers.MAX_REPLACEMENTS_PER_STEP + 1
    ray, pool = _pool([{1}] * attempts)
    with pytest.raises(workers.WorkersLost, match="workers kept dying at epoch 3, step 1"):
        pool.step(2, 0)
    assert ray.started == [0, 1] + [1] * attempts


def test_one_replacement_fewer_than_the_limit_still_finishes_the_step():
    ray, pool = _pool([{1}] * workers.MAX_REPLACEMENTS_PER_STEP)
    assert pool.step(0, 0) == ("result", 0, 0)


def test_a_failure_that_is_not_an_abandoned_step_is_raised():
    ray, pool = _pool([])
    pool.workers[1].step.remote = lambda epoch, step: Ref(error=TaskFailed(ValueError("bad batch")))
    with pytest.raises(ValueError, match="bad batch"):
        pool.step(0, 0)
