"""A batch split over replicas: every replica computes the step of the whole batch.

A search with ``--workers N`` runs N replicas of the supernet, each in its own process
(:mod:`approxdarts_np.runs.workers`). Every replica draws the same global batch (the loaders, the
augmentation and the Gumbel draws are seeded by the run's seed, the epoch and the step, never by
the replica) and takes its share of the images: replica r of N takes images
[r·B/N, (r+1)·B/N) of a batch of B (:func:`share`). Then, for every forward and backward pass:

* batch norm sums each channel's sum and sum of squares over the replicas before normalising,
  and the sums its gradient needs (Σ dy, Σ dy·(x − mean)) in backward
  (:func:`approxdarts_np.autodiff.conv.sum_batch_statistics_with`);
* an 8-bit convolution quantises its input with the range of the whole batch, the largest of
  the replicas' maxima and the smallest of their minima
  (:func:`approxdarts_np.approx.lut_conv.range_activations_with`); the weights are the same on
  every replica;
* the loss of a share is its mean cross-entropy times its share of the batch, so that the
  shares' losses and gradients add up to the batch's; an energy penalty is added by replica 0
  only, so it is counted once;
* after backward, the gradients of the parameters that take one are summed over the replicas
  (one flat float32 vector), and the loss and the correct predictions with them.

Every sum adds the replicas' parts in replica order, so every replica gets the same bits and
applies the same update: the replicas stay identical without exchanging weights. A step then
equals the single-process step at the same global batch up to the order of float additions.

:class:`ReplicaGroup` moves the parts. A replica sends its part to every other replica (one
call per peer on the handles it was given, which have a ``deposit`` method) and waits until the
parts of all the others have arrived; no replica waits for a reply. Parts are keyed by the
group's generation and a sequence number that every replica advances in the same order; a new
generation (after a replica was lost and replaced) drops whatever an abandoned step left.
This module does not import Ray: the handles come from :mod:`~approxdarts_np.runs.workers`.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import math
import threading
import time

import numba
import numpy as np

from approxdarts_np.autodiff import Tensor, run_independent_with
from approxdarts_np.autodiff import functional as F
from approxdarts_np.approx.lut_conv import range_activations_with
from approxdarts_np.autodiff.conv import sum_batch_statistics_with


class StepAborted(Exception):
    """The step was abandoned: a replica was lost, or the driver asked every replica to stop."""


def share(n: int, rank: int, size: int) -> slice:
    """Replica ``rank``'s images of a batch of ``n``: [rank·n/size, (rank+1)·n/size)."""
    return slice(rank * n // size, (rank + 1) * n // size)


def combine(parts: list, how) -> np.ndarray:
    """``how`` (np.add, np.maximum) over the replicas' parts, in replica order: every replica gets the same bits."""
    total = parts[0].copy()
    for other in parts[1:]:
        total = how(total, other)
    return total


class ReplicaGroup:
    """This replica's place among ``size`` replicas, and the sums over all of them."""

    def __init__(self, rank: int, size: int):
        if not 0 <= rank < size:
            raise ValueError(f"rank must lie in 0..{size - 1}, got {rank}")
        self.rank, self.size = rank, size
        self.peers: list = []
        self.generation = 0
        self._seq = 0
        self._parts: dict = {}
        self._aborted = -1  # the generation whose step was abandoned
        self._cv = threading.Condition()
        self.exchanges = 0  # sums taken, bytes sent to the other replicas, seconds spent in sums
        self.bytes_sent = 0
        self.exchange_s = 0.0

    def connect(self, peers: list, generation: int) -> None:
        """Use ``peers`` (one handle per rank; this replica's own is not called) from ``generation`` on."""
        with self._cv:
            self.peers, self.generation, self._seq = list(peers), generation, 0
            self._parts = {}

    def deposit(self, generation: int, seq: int, rank: int, part: np.ndarray) -> None:
        """Receive replica ``rank``'s part of sum ``seq`` (a part of an older generation is dropped)."""
        with self._cv:
            if generation == self.generation:
                self._parts.setdefault(seq, {})[rank] = part
                self._cv.notify_all()

    def abort(self, generation: int) -> None:
        """Abandon the step of ``generation``: a sum waiting for parts raises :class:`StepAborted`."""
        with self._cv:
            self._aborted = max(self._aborted, generation)
            self._cv.notify_all()

    def sum(self, part: np.ndarray) -> np.ndarray:
        """The sum of every replica's ``part`` (same shape and dtype on each), added in replica order."""
        return combine(self._gather(part), np.add)

    def maximum(self, part: np.ndarray) -> np.ndarray:
        """The elementwise maximum of every replica's ``part``."""
        return combine(self._gather(part), np.maximum)

    def _gather(self, part: np.ndarray) -> list:
        """Every replica's ``part``, in replica order: this one's is sent to each peer, theirs awaited."""
        part = np.ascontiguousarray(part)
        if self.size == 1:
            return [part]
        start = time.perf_counter()
        generation, seq = self.generation, self._seq
        self._seq += 1
        for rank, peer in enumerate(self.peers):
            if rank != self.rank:
                peer.deposit.remote(generation, seq, self.rank, part)
        with self._cv:
            while True:
                if self._aborted >= generation:
                    raise StepAborted(f"step abandoned (generation {generation})")
                parts = self._parts.get(seq, {})
                if len(parts) == self.size - 1:
                    break
                self._cv.wait()
            del self._parts[seq]
        parts[self.rank] = part
        self.exchanges += 1
        self.bytes_sent += part.nbytes * (self.size - 1)
        self.exchange_s += time.perf_counter() - start
        return [parts[rank] for rank in range(self.size)]

    def counters(self) -> dict:
        return {"exchanges": self.exchanges, "bytes_sent": self.bytes_sent, "exchange_s": self.exchange_s}


class Lanes:
    """Independent computations of one replica run side by side, their exchanges batched.

    :func:`~approxdarts_np.autodiff.run_independent` hands over computations that do not use each
    other's results: the op chains of a cell's node in forward, the batch norms of one level in
    backward. Each runs in a thread of its own (the kernels hold the interpreter lock, so they still
    run one at a time). When every lane still running waits for a sum or a range, the lanes' parts
    go to the other replicas in one exchange, in lane order; every lane's k-th request is in the
    k-th exchange, whatever the threads' timing, so the replicas exchange the same parts in the
    same order.
    """

    def __init__(self, group: ReplicaGroup):
        self.group = group
        self._cv = threading.Condition()
        self._pool = None
        self._threads = 0
        self._running = 0
        self._pending: dict = {}
        self._results: dict = {}
        self._round = 0
        self._error: BaseException | None = None

    def run(self, functions: list) -> list:
        if len(functions) <= 1 or getattr(_ACTIVE, "lane", False):
            return [f() for f in functions]
        if len(functions) > self._threads:
            # every lane needs a thread of its own: a round waits for all of them
            self.close()
            self._threads = max(64, len(functions))
            self._pool = concurrent.futures.ThreadPoolExecutor(self._threads, thread_name_prefix="replica-lane")
        with self._cv:
            self._running, self._pending, self._results, self._error = len(functions), {}, {}, None
        threads = numba.get_num_threads()  # a per-thread setting: each lane takes this thread's
        futures = [self._pool.submit(self._lane, i, f, contextvars.copy_context(), threads)
                   for i, f in enumerate(functions)]
        concurrent.futures.wait(futures)  # every lane ended (also when one failed) before the next run
        return [future.result() for future in futures]

    def _lane(self, index: int, function, context, threads: int):
        numba.set_num_threads(threads)
        _ACTIVE.lane = True
        sum_batch_statistics_with(lambda part: self._request(index, np.add, part))
        range_activations_with(lambda part: self._request(index, np.maximum, part))
        try:
            return context.run(function)
        finally:
            sum_batch_statistics_with(None)
            range_activations_with(None)
            _ACTIVE.lane = False
            with self._cv:
                self._running -= 1
                self._exchange_if_all_wait()

    def _request(self, index: int, how, part: np.ndarray) -> np.ndarray:
        with self._cv:
            self._pending[index] = (how, np.asarray(part, np.float64))
            round_ = self._round
            self._exchange_if_all_wait()
            while self._round == round_:
                self._cv.wait()
            if self._error is not None:
                raise self._error
            return self._results.pop(index)

    def _exchange_if_all_wait(self) -> None:
        """With the lock held: when every running lane waits, exchange their parts and wake them."""
        if not self._pending or len(self._pending) < self._running:
            return
        order = sorted(self._pending)
        requests = [self._pending[i] for i in order]
        sizes = [part.size for _, part in requests]
        try:
            parts = self.group._gather(np.concatenate([part.ravel() for _, part in requests]))
            offsets = np.cumsum([0] + sizes)
            for i, (how, part), lo, hi in zip(order, requests, offsets[:-1], offsets[1:]):
                self._results[i] = combine([p[lo:hi] for p in parts], how).reshape(part.shape)
        except BaseException as exc:  # noqa: BLE001  (every waiting lane raises it)
            self._error = exc
        self._pending = {}
        self._round += 1
        self._cv.notify_all()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool, self._threads = None, 0


_ACTIVE = threading.local()  # .group: the ReplicaGroup of this thread's steps; .lane: in a Lanes thread


@contextlib.contextmanager
def replicated(group: ReplicaGroup, lanes: Lanes | None = None):
    """Within, in this thread: losses, gradients and batch statistics are those of the batch ``group``
    splits, and independent computations run as ``lanes`` (by default new :class:`Lanes`, closed on
    exit; a caller that steps many times passes its own, so that the lanes' threads are reused). A
    group of one replica computes as one process does."""
    if group.size == 1:
        yield group
        return
    own = lanes is None
    lanes = Lanes(group) if own else lanes
    _ACTIVE.group = group
    sum_batch_statistics_with(group.sum)
    range_activations_with(group.maximum)
    run_independent_with(lanes.run)
    try:
        yield group
    finally:
        _ACTIVE.group = None
        sum_batch_statistics_with(None)
        range_activations_with(None)
        run_independent_with(None)
        if own:
            lanes.close()


def loss_and_backward(model, images, labels, penalty=None) -> tuple[float, int]:
    """Cross-entropy of a batch (plus ``penalty()``, a differentiable term) and its backward, when the
    loss is finite; returns (cross-entropy, or the non-finite total; correct predictions).

    In one process this is the plain forward and backward. Within :func:`replicated` it is the
    same for the whole batch, computed on this replica's share: see the module's docstring.
    """
    group = getattr(_ACTIVE, "group", None)
    if group is None:
        logits = model(Tensor(images))
        loss = F.cross_entropy(logits, labels)
        value = loss.item()
        if penalty is not None:
            loss = loss + penalty()
            if not math.isfinite(loss.item()):
                value = loss.item()
        if math.isfinite(value):
            loss.backward()
        return value, int((logits.data.argmax(axis=1) == np.asarray(labels)).sum())
    n = len(labels)
    mine = share(n, group.rank, group.size)
    images, labels = images[mine], np.asarray(labels)[mine]
    logits = model(Tensor(images))
    loss = F.cross_entropy(logits, labels) * np.float32(len(labels) / n)
    extra = penalty() if penalty is not None and group.rank == 0 else None
    correct = int((logits.data.argmax(axis=1) == labels).sum())
    totals = group.sum(np.array([loss.item(), 0.0 if extra is None else extra.item(), correct]))
    value = float(totals[0])
    if penalty is not None and not math.isfinite(value + totals[1]):
        value = float(value + totals[1])
    if math.isfinite(value):
        if extra is not None:
            loss = loss + extra
        loss.backward()
        _sum_gradients(model, group)
    return value, int(totals[2])


def _sum_gradients(model, group: ReplicaGroup) -> None:
    """Replace the gradient of every parameter that takes one by its sum over the replicas."""
    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    if not params:
        return
    total = group.sum(np.concatenate([p.grad.ravel() for p in params]))
    offset = 0
    for p in params:
        p.grad = total[offset:offset + p.grad.size].reshape(p.grad.shape)
        offset += p.grad.size
