"""The DARTS supernet: MixedOp on every edge, search cells, and the Network that owns α."""
from __future__ import annotations

import functools

import numpy as np

from approxdarts_np.autodiff import Tensor, run_independent
from approxdarts_np.autodiff import functional as F
from approxdarts_np.nas.budget import cap_parameter_free
from approxdarts_np.nas.genotypes import Genotype, derive_genotype
from approxdarts_np.nas.operations import (OPS, PRIMITIVES, FactorizedReduce, ReLUConvBN, check_network_size,
                                          cifar_stem, set_arithmetic)
from approxdarts_np.nn import (BatchNorm2d, GlobalAvgPool2d, Linear, Module,
                               ModuleList, Parameter, Sequential)

STEPS = 4  # intermediate nodes per cell
NUM_EDGES = sum(2 + i for i in range(STEPS))  # 14
_NONE = PRIMITIVES.index("none")


class MixedOp(Module):
    """``Σ_o softmax(α)_o · op_o(x)`` over the candidate operations of one edge.

    ``none`` contributes zeros, so it is not computed; its weight still takes part
    in the softmax, exactly as in DARTS. Pools are followed by a non-affine BN.
    """

    def __init__(self, c: int, stride: int, rng=None):
        super().__init__()
        self.ops = ModuleList()
        for name in PRIMITIVES:
            if name == "none":
                continue
            op = OPS[name](c, stride, False, rng)
            if "pool" in name:
                op = Sequential(op, BatchNorm2d(c, affine=False))
            self.ops.append(op)
        active = [i for i in range(len(PRIMITIVES)) if i != _NONE]
        # A slice when the computed ops are contiguous (``none`` first, as in DARTS): basic
        # indexing, whose backward is a plain store instead of a scatter-add.
        contiguous = active == list(range(active[0], active[-1] + 1))
        self.active = slice(active[0], active[-1] + 1) if contiguous else np.array(active)

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        return self.mix([op(x) for op in self.ops], weights)

    def mix(self, outputs: list, weights: Tensor) -> Tensor:
        """The edge's output from its computed ops' outputs (in ``self.ops`` order)."""
        return F.weighted_sum(weights[self.active], outputs)


class SearchCell(Module):
    """Two preprocessed inputs, STEPS nodes each summing MixedOps over all earlier states."""

    def __init__(self, c_prev_prev, c_prev, c, reduction: bool, reduction_prev: bool, rng=None):
        super().__init__()
        self.reduction = reduction
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(c_prev_prev, c, affine=False, rng=rng)
        else:
            self.preprocess0 = ReLUConvBN(c_prev_prev, c, 1, 1, 0, affine=False, rng=rng)
        self.preprocess1 = ReLUConvBN(c_prev, c, 1, 1, 0, affine=False, rng=rng)
        self.edges = ModuleList()
        for i in range(STEPS):
            for j in range(2 + i):
                stride = 2 if reduction and j < 2 else 1
                self.edges.append(MixedOp(c, stride, rng))

    def forward(self, s0: Tensor, s1: Tensor, weights: Tensor) -> Tensor:
        # The ops of every edge into a node are independent computations (run_independent: in turn
        # in one process; side by side when the batch is split over replicas, see runs/replicas.py).
        states = run_independent([functools.partial(self.preprocess0, s0), functools.partial(self.preprocess1, s1)])
        offset = 0
        for _ in range(STEPS):
            edges = [(self.edges[offset + j], h) for j, h in enumerate(states)]
            outputs = run_independent([functools.partial(op, h) for edge, h in edges for op in edge.ops])
            node = None
            for j, (edge, _) in enumerate(edges):
                out = edge.mix(outputs[:len(edge.ops)], weights[offset + j])
                outputs = outputs[len(edge.ops):]
                node = out if node is None else node + out
            offset += len(states)
            states.append(node)
        return F.concat(states[-STEPS:], axis=1)


class Network(Module):
    """The search network: stem, ``layers`` search cells (reductions at L//3 and 2L//3), classifier.

    Architecture parameters (``alphas_normal``, ``alphas_reduce``; 14×8 each)
    belong to the network: :meth:`arch_parameters` returns them and
    :meth:`weights` returns everything else.
    """

    def __init__(self, channels: int = 16, num_classes: int = 10, layers: int = 8,
                 stem_multiplier: int = 3, arithmetic=None, seed: int = 0):
        super().__init__()
        check_network_size(layers, channels)
        rng = np.random.default_rng(seed)
        self.channels, self.num_classes, self.layers = channels, num_classes, layers
        c_curr = stem_multiplier * channels
        self.stem = cifar_stem(c_curr, rng)
        c_prev_prev, c_prev, c_curr = c_curr, c_curr, channels
        self.cells = ModuleList()
        reduction_prev = False
        for i in range(layers):
            reduction = i in self.reduction_indices(layers)
            if reduction:
                c_curr *= 2
            self.cells.append(SearchCell(c_prev_prev, c_prev, c_curr, reduction, reduction_prev, rng))
            reduction_prev = reduction
            c_prev_prev, c_prev = c_prev, STEPS * c_curr
        self.global_pooling = GlobalAvgPool2d()
        self.classifier = Linear(c_prev, num_classes, rng=rng)
        alpha_rng = np.random.default_rng([seed, 1])
        n_ops = len(PRIMITIVES)
        self.alphas_normal = Parameter(1e-3 * alpha_rng.standard_normal((NUM_EDGES, n_ops)))
        self.alphas_reduce = Parameter(1e-3 * alpha_rng.standard_normal((NUM_EDGES, n_ops)))
        self.arithmetic = None
        self.set_arithmetic(arithmetic)
        # Both steps ask for the weights; the module tree is fixed once built, so walk it once.
        arch = {id(p) for p in self.arch_parameters()}
        self._weights = tuple(p for p in self.parameters() if id(p) not in arch)

    @staticmethod
    def reduction_indices(layers: int) -> tuple[int, int]:
        return (layers // 3, 2 * layers // 3)

    def set_arithmetic(self, arithmetic) -> None:
        """Run the searched convolutions with ``arithmetic`` (None: float32)."""
        self.arithmetic = arithmetic
        set_arithmetic(self, arithmetic)

    def arch_parameters(self) -> list[Parameter]:
        return [self.alphas_normal, self.alphas_reduce]

    def weights(self) -> list[Parameter]:
        return list(self._weights)

    def forward(self, x: Tensor) -> Tensor:
        s0 = s1 = self.stem(x)
        w_normal = F.softmax(self.alphas_normal, axis=-1)
        w_reduce = F.softmax(self.alphas_reduce, axis=-1)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, w_reduce if cell.reduction else w_normal)
        return self.classifier(self.global_pooling(s1))

    def genotype(self, max_parameter_free: int | None = None) -> Genotype:
        """The discrete cell pair that the current α selects (DARTS rule); with ``max_parameter_free``, at
        most that many pools and skips per cell (:func:`~approxdarts_np.nas.budget.cap_parameter_free`)."""
        weights = {"normal": _softmax(self.alphas_normal.data), "reduce": _softmax(self.alphas_reduce.data)}
        genotype = derive_genotype(weights["normal"], weights["reduce"])
        if max_parameter_free is None:
            return genotype
        return cap_parameter_free(weights, genotype, max_parameter_free)


def _softmax(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)
