"""A batch split over replicas computes the step of the whole batch (runs/replicas.py), checked in one process.

Each replica runs in a thread of this process with its own supernet; the peers' ``deposit`` is called
directly instead of through Ray (tests/test_workers.py runs the real Ray workers). After k steps every
replica must hold the same bits, and those must equal the single-process search at the same global batch
within a tolerance on ‖difference‖ / ‖values‖ per kind of tensor (α and β, weights, BN running
statistics). The tolerances are stated with the reason for each, and each wrong change the module's
design guards against (gradients averaged again, BN statistics left per replica, a share dropped, the
8-bit range left per replica) must break them.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

from approxdarts_np.kernels._util import force_variant
from approxdarts_np.runs import replicas
from approxdarts_np.runs.replicas import ReplicaGroup, StepAborted, replicated, share
from approxdarts_np.runs.search import SearchConfig, build_searcher
from run_helpers import FLOAT, ONE_8BIT_STEP, SECOND_ORDER, relative_errors, within

TINY = dict(epochs=1, channels=4, layers=3, batch_size=8, max_train_images=64, threads=1, seed=3)

class InProcess:
    """A peer's handle in this process: ``deposit.remote(...)`` delivers at once."""

    def __init__(self, group: ReplicaGroup):
        self.group = group
        self.deposit = self

    def remote(self, *args) -> None:
        self.group.deposit(*args)


@pytest.fixture(autouse=True)
def serial_kernels():
    """The replicas' threads share this process: every kernel runs its serial variant."""
    before = force_variant("serial")
    yield
    force_variant(before)


def _searcher(**kw):
    return build_searcher(SearchConfig.quick(output_dir="unused", **{**TINY, **kw}))


def _steps(searcher, steps: int) -> None:
    searcher.begin_epoch(0)
    for step in range(steps):
        searcher.step(0, step)


def _replicated(n: int, steps: int, **kw) -> tuple[list, list[ReplicaGroup]]:
    groups = [ReplicaGroup(rank, n) for rank in range(n)]
    for group in groups:
        group.connect([InProcess(g) for g in groups], generation=1)
    searchers = [_searcher(**kw) for _ in range(n)]
    errors = []

    def run(rank: int) -> None:
        try:
            with replicated(groups[rank]):
                _steps(searchers[rank], steps)
        except BaseException as exc:  # noqa: BLE001  (raised again in the test's thread)
            errors.append(exc)
            for group in groups:
                group.abort(1)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return searchers, groups


def test_shares_cover_the_batch_once():
    for n in range(1, 9):
        for size in range(1, n + 1):
            taken = [i for rank in range(size) for i in range(n)[share(n, rank, size)]]
            assert taken == list(range(n))


@pytest.mark.parametrize("n, steps, kw, bounds", [
    (2, 3, {}, FLOAT),
    (3, 3, {}, FLOAT),
    (2, 2, {"order": 2}, SECOND_ORDER),
    (2, 1, {"arithmetic": "exact"}, ONE_8BIT_STEP),
    (3, 1, {"multipliers": "exact,mul8u_2P7,mul8u_17KS", "energy_weight": 1.0, "warmup_epochs": 0}, ONE_8BIT_STEP),
], ids=["float-2", "float-3", "second-order", "exact-8bit", "multiplier-choice"])
def test_replicas_are_identical_and_equal_one_process(n, steps, kw, bounds):
    reference = _searcher(**kw)
    _steps(reference, steps)
    searchers, groups = _replicated(n, steps, **kw)
    first = searchers[0].model.state_dict()
    for other in searchers[1:]:
        for name, value in other.model.state_dict().items():
            np.testing.assert_array_equal(value, first[name], err_msg=name)
    errors = relative_errors(reference.model.state_dict(), searchers[0].model.state_dict())
    assert within(errors, bounds), errors
    assert all(g.exchanges > 0 and g.bytes_sent > 0 for g in groups)


def _break_gradient_sum(monkeypatch):
    """Gradients averaged over the replicas after the losses were already scaled by their shares."""
    real = replicas._sum_gradients

    def averaged(model, group):
        real(model, group)
        for p in model.parameters():
            if p.requires_grad and p.grad is not None:
                p.grad = p.grad / np.float32(group.size)
    monkeypatch.setattr(replicas, "_sum_gradients", averaged)


def _break_bn_statistics(monkeypatch):
    """Batch norm normalises each share with its own statistics."""
    monkeypatch.setattr(replicas, "sum_batch_statistics_with", lambda reduce: None)


def _break_a_share(monkeypatch):
    """The gradients of the last replica's share are dropped from the sum."""
    def dropping(self, part):
        parts = self._gather(part)
        if part.dtype == np.float32 and part.size > 100:  # the gradient vector
            parts = parts[:-1]
        total = parts[0].copy()
        for other in parts[1:]:
            total += other
        return total
    monkeypatch.setattr(ReplicaGroup, "sum", dropping)


def _break_8bit_range(monkeypatch):
    """8-bit convolutions quantise each share with its own range."""
    monkeypatch.setattr(replicas, "range_activations_with", lambda reduce: None)


@pytest.mark.parametrize("breaking, kw, bounds", [
    (_break_gradient_sum, {}, FLOAT),
    (_break_bn_statistics, {}, FLOAT),
    (_break_a_share, {}, FLOAT),
    (_break_8bit_range, {"arithmetic": "mul8u_17KS"}, ONE_8BIT_STEP),
], ids=["gradients-averaged-again", "bn-statistics-per-replica", "a-share-dropped", "8bit-range-per-replica"])
def test_the_equality_test_catches_a_wrong_split(monkeypatch, breaking, kw, bounds):
    steps = 3 if bounds is FLOAT else 1
    reference = _searcher(**kw)
    _steps(reference, steps)
    breaking(monkeypatch)
    searchers, _ = _replicated(2, steps, **kw)
    errors = relative_errors(reference.model.state_dict(), searchers[0].model.state_dict())
    assert not within(errors, bounds), errors


def test_an_abandoned_sum_raises_and_a_new_generation_drops_old_parts():
    groups = [ReplicaGroup(rank, 2) for rank in range(2)]
    for group in groups:
        group.connect([InProcess(g) for g in groups], generation=1)
    raised = []

    def wait_for_the_lost_peer() -> None:
        try:
            groups[0].sum(np.ones(3))
        except StepAborted:
            raised.append(True)

    waiting = threading.Thread(target=wait_for_the_lost_peer)
    waiting.start()
    waiting.join(0.2)
    assert waiting.is_alive()  # replica 1 never sends its part
    groups[0].abort(1)
    waiting.join(5)
    assert raised == [True]
    # a part of generation 1 arriving after generation 2 began is dropped
    groups[0].connect([InProcess(g) for g in groups], generation=2)
    groups[0].deposit(1, 0, 1, np.full(3, 100.0))
    groups[0].deposit(2, 0, 1, np.full(3, 2.0))
    np.testing.assert_array_equal(groups[0].sum(np.ones(3)), np.full(3, 3.0))


def test_lanes_send_each_round_of_requests_in_one_exchange():
    """100 lanes (more than the 64 threads a first run starts), each asking for two sums: two exchanges,
    every lane getting the sum of its own parts over both replicas."""
    from approxdarts_np.autodiff.conv import _BATCH_SUMS
    from approxdarts_np.runs.replicas import Lanes

    groups = [ReplicaGroup(rank, 2) for rank in range(2)]
    for group in groups:
        group.connect([InProcess(g) for g in groups], generation=1)
    results = {}

    def lane(rank: int, i: int) -> float:
        first = _BATCH_SUMS.reduce(np.array([float(i + rank)]))
        second = _BATCH_SUMS.reduce(np.array([float(10 * i)]))
        return float(first[0] + second[0])

    def replica(rank: int) -> None:
        lanes = Lanes(groups[rank])
        lanes.run([lambda: 0.0, lambda: 0.0])  # a first run starts a smaller pool
        results[rank] = lanes.run([lambda i=i: lane(rank, i) for i in range(100)])
        lanes.close()

    threads = [threading.Thread(target=replica, args=(rank,)) for rank in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert results[0] == results[1] == [2 * i + 1 + 20 * i for i in range(100)]
    assert groups[0].exchanges == groups[1].exchanges == 2
