"""The DARTS evaluation network built from a genotype: cells, auxiliary head, drop-path."""
from __future__ import annotations

import numpy as np

from approxdarts_np.autodiff import Tensor
from approxdarts_np.autodiff import functional as F
from approxdarts_np.nas.genotypes import Genotype
from approxdarts_np.nas.operations import (OPS, FactorizedReduce, ReLUConvBN, check_network_size, cifar_stem,
                                          set_arithmetic)
from approxdarts_np.nn import (AvgPool2d, BatchNorm2d, Conv2d, GlobalAvgPool2d, Identity, Linear, Module,
                               ModuleList, ReLU, Sequential)


def drop_path(x: Tensor, drop_prob: float, rng: np.random.Generator) -> Tensor:
    """Zero whole samples with probability ``drop_prob`` and rescale the kept ones by 1/(1-p)."""
    keep = 1.0 - drop_prob
    mask = (rng.random((x.shape[0], 1, 1, 1)) < keep).astype(np.float32) / np.float32(keep)
    return F.mul(x, mask)


class EvalCell(Module):
    """A cell with the genotype's two operations per node (BN affine)."""

    def __init__(self, genotype: Genotype, c_prev_prev, c_prev, c, reduction, reduction_prev, rng=None):
        super().__init__()
        self.reduction = reduction
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(c_prev_prev, c, rng=rng)
        else:
            self.preprocess0 = ReLUConvBN(c_prev_prev, c, 1, 1, 0, rng=rng)
        self.preprocess1 = ReLUConvBN(c_prev, c, 1, 1, 0, rng=rng)
        pairs = genotype.reduce if reduction else genotype.normal
        self.concat = tuple(genotype.reduce_concat if reduction else genotype.normal_concat)
        self.indices = tuple(j for _, j in pairs)
        self.op_names = tuple(name for name, _ in pairs)
        self.steps = len(pairs) // 2
        self.ops = ModuleList(OPS[name](c, 2 if reduction and j < 2 else 1, True, rng) for name, j in pairs)
        self.n_concat = len(self.concat)  # DARTS's "multiplier": the cell outputs C * n_concat channels

    def forward(self, s0: Tensor, s1: Tensor, drop_prob: float = 0.0, rng=None) -> Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i in range(self.steps):
            hs = []
            for k in (2 * i, 2 * i + 1):
                op = self.ops[k]
                h = op(states[self.indices[k]])
                if self.training and drop_prob > 0 and not isinstance(op, Identity):
                    h = drop_path(h, drop_prob, rng)
                hs.append(h)
            states.append(hs[0] + hs[1])
        return F.concat([states[i] for i in self.concat], axis=1)


class AuxiliaryHead(Module):
    """The DARTS CIFAR auxiliary classifier on the 8×8 feature map after the second reduction."""

    def __init__(self, c: int, num_classes: int, rng=None):
        super().__init__()
        self.features = Sequential(
            ReLU(), AvgPool2d(5, stride=3, padding=0, count_include_pad=False),
            Conv2d(c, 128, 1, rng=rng), BatchNorm2d(128), ReLU(),
            Conv2d(128, 768, 2, rng=rng), BatchNorm2d(768), ReLU())
        self.classifier = Linear(768, num_classes, rng=rng)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        return self.classifier(F.reshape(x, (x.shape[0], -1)))


class NetworkCIFAR(Module):
    """Stem, ``layers`` cells of the genotype (reductions at L//3 and 2L//3), optional auxiliary head."""

    def __init__(self, genotype: Genotype, channels: int = 36, num_classes: int = 10, layers: int = 20,
                 auxiliary: bool = True, stem_multiplier: int = 3, arithmetic=None, seed: int = 0):
        super().__init__()
        check_network_size(layers, channels)
        rng = np.random.default_rng(seed)
        self.genotype, self.layers, self.channels = genotype, layers, channels
        self.aux_index = 2 * layers // 3
        c_curr = stem_multiplier * channels
        self.stem = cifar_stem(c_curr, rng)
        c_prev_prev, c_prev, c_curr = c_curr, c_curr, channels
        self.cells = ModuleList()
        reduction_prev = False
        c_aux = None
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                c_curr *= 2
            cell = EvalCell(genotype, c_prev_prev, c_prev, c_curr, reduction, reduction_prev, rng)
            self.cells.append(cell)
            reduction_prev = reduction
            c_prev_prev, c_prev = c_prev, cell.n_concat * c_curr
            if i == self.aux_index:
                c_aux = c_prev
        self.auxiliary_head = AuxiliaryHead(c_aux, num_classes, rng) if auxiliary else None
        self.global_pooling = GlobalAvgPool2d()
        self.classifier = Linear(c_prev, num_classes, rng=rng)
        self.drop_path_prob = 0.0
        self.arithmetic = None
        self.set_arithmetic(arithmetic)

    def set_arithmetic(self, arithmetic) -> None:
        """Run the searched convolutions (inside sep/dil convs) with ``arithmetic`` (None: float32)."""
        self.arithmetic = arithmetic
        set_arithmetic(self, arithmetic)

    def forward(self, x: Tensor, rng: np.random.Generator | None = None):
        """Logits, and the auxiliary logits in training mode with an auxiliary head (else None).

        ``rng`` draws the drop-path masks; it is needed when training with drop-path.
        """
        if self.training and self.drop_path_prob > 0 and rng is None:
            raise ValueError("drop-path in training mode needs an rng")
        logits_aux = None
        s0 = s1 = self.stem(x)
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob, rng)
            if i == self.aux_index and self.auxiliary_head is not None and self.training:
                logits_aux = self.auxiliary_head(s1)
        logits = self.classifier(self.global_pooling(s1))
        return logits, logits_aux
