"""Choosing the multiplier of every searched convolution: β, the sampled path, and the expected energy.

For each searched conv op o (sep_conv_3x3, sep_conv_5x5, dil_conv_3x3,
dil_conv_5x5) on each edge e of a cell type, β[e, o, :] holds one logit per
candidate multiplier k; p_mul = softmax(β[e, o]). Cells of a type share β,
as they share α.

Sampled path (straight-through Gumbel-softmax, as in GDAS/FBNet). Each step
draws Gumbel noise g and takes k* = argmax(β + g); every searched conv of
(e, o) then runs with multiplier k* only, so a step costs what a
single-multiplier step costs, whatever K. The op's output is scaled by the
straight-through factor

    s[e, o] = 1 + y[e, o, k*] − stop_gradient(y[e, o, k*]),   y = softmax((β + g) / τ),

which is exactly 1 in the forward pass (so the network computes the plain
op with multiplier k*) and passes ∂L/∂s = Σ (∂L/∂out · out) to y[k*] and so
to β in the backward pass.

Expected energy (docs/design.md §4). With M[e, o] the multiplies of op o on edge e
summed over the cells of the type (depthwise and pointwise convs, at each
cell's size) and pJ[k] the energy of one multiply with multiplier k,

    E = Σ_type Σ_e Σ_o p_op[e, o] · M[e, o] · Σ_k p_mul[e, o, k] · pJ[k],

p_op = softmax(α[e]) over all eight ops (pools, skip and none multiply
nothing here and cost 0). E_ref is the same sum with every searched conv in
exact 8 bit, at the current p_op; it is a normaliser (no gradient flows
through it), so the penalty λ·E/E_ref pulls β towards cheaper multipliers
and α towards ops that multiply less.
"""
from __future__ import annotations

import numpy as np

from approxdarts_np.autodiff import Tensor, no_grad
from approxdarts_np.autodiff import functional as F
from approxdarts_np.nas.budget import edge_index
from approxdarts_np.nas.genotypes import SEARCHED_OPS, Genotype
from approxdarts_np.nas.model_search import Network
from approxdarts_np.nas.operations import PRIMITIVES, searched_convs
from approxdarts_np.nn import Parameter
from approxdarts_np.nn.costs import recording_calls

SEARCHED_COLUMNS = tuple(PRIMITIVES.index(op) for op in SEARCHED_OPS)  # α columns of the searched ops


def searched_op_macs(network, image_shape=(3, 32, 32)) -> dict[str, np.ndarray]:
    """Multiplies per image of every searched op, summed over the cells of each type: ``{"normal", "reduce"}``
    → float64 arrays of shape (edges, 4), columns in :data:`SEARCHED_OPS` order.

    Counted from a real forward pass of one zero image (eval mode), so the
    counts are those of the layers that actually run, at each cell's size.
    """
    owner = {}  # id(conv layer) -> (cell type, edge, column)
    n_edges = len(network.cells[0].edges)
    for cell in network.cells:
        kind = "reduce" if cell.reduction else "normal"
        for e, mixed in enumerate(cell.edges):
            for op_name, op in zip(_computed_names(), mixed.ops):
                if op_name in SEARCHED_OPS:
                    for conv in searched_convs(op):
                        owner[id(conv)] = (kind, e, SEARCHED_OPS.index(op_name))
    macs = {"normal": np.zeros((n_edges, len(SEARCHED_OPS))), "reduce": np.zeros((n_edges, len(SEARCHED_OPS)))}
    was_training = network.training
    network.eval()
    try:
        with no_grad(), recording_calls() as calls:
            network(Tensor(np.zeros((1, *image_shape), dtype=np.float32)))
    finally:
        network.train(was_training)
    for layer, shape in calls:
        where = owner.get(id(layer))
        if where is not None:
            kind, e, col = where
            macs[kind][e, col] += layer.macs(shape)
    return macs


def _computed_names() -> list[str]:
    """Names of the ops a MixedOp computes, in its ``ops`` order (every primitive but ``none``)."""
    return [name for name in PRIMITIVES if name != "none"]


def expected_energy(alphas: Tensor, betas: Tensor | None, macs: np.ndarray, pj: np.ndarray) -> Tensor:
    """E of one cell type (pJ per image) as a differentiable scalar.

    ``alphas`` (edges, 8), ``betas`` (edges, 4, K) or None for a single
    multiplier, ``macs`` (edges, 4), ``pj`` (K,) energy per multiply.
    """
    p_op = F.getitem(F.softmax(alphas, axis=-1), (slice(None), np.array(SEARCHED_COLUMNS)))  # (edges, 4)
    pj = np.asarray(pj, dtype=np.float64)
    if betas is None:
        if pj.size != 1:
            raise ValueError(f"without β there is one multiplier, got {pj.size} energies")
        per_multiply = Tensor(np.full(p_op.shape, pj[0], dtype=np.float32))
    else:
        p_mul = F.softmax(betas, axis=-1)  # (edges, 4, K)
        per_multiply = F.sum(p_mul * Tensor(pj.astype(np.float32)), axis=-1)  # (edges, 4)
    return F.sum(p_op * Tensor(macs.astype(np.float32)) * per_multiply)


def _searched_op_probabilities(alphas: np.ndarray) -> np.ndarray:
    """softmax(α) in float64, the columns of the searched ops: (edges, 4)."""
    a = np.asarray(alphas, dtype=np.float64)
    p = np.exp(a - a.max(axis=-1, keepdims=True))
    return (p / p.sum(axis=-1, keepdims=True))[:, SEARCHED_COLUMNS]


def reference_energy(alphas: np.ndarray, macs: np.ndarray, exact_pj: float) -> float:
    """E_ref of one cell type: every searched conv in exact 8 bit at the current p_op (a plain number)."""
    return float((_searched_op_probabilities(alphas) * macs).sum() * exact_pj)


def gumbel_choice(betas: np.ndarray, rng: np.random.Generator, temperature: float = 1.0):
    """Draw one multiplier per (edge, op): ``(k_star (edges, 4) int, gumbel noise (edges, 4, K))``."""
    noise = rng.gumbel(size=betas.shape).astype(np.float32)
    return np.argmax(betas + noise, axis=-1), noise


def straight_through_factors(betas: Tensor, k_star: np.ndarray, noise: np.ndarray,
                             temperature: float = 1.0) -> Tensor:
    """s[e, o] = 1 + y[e, o, k*] − stop_gradient(y[e, o, k*]): exactly 1 forward, ∂y[k*] backward."""
    y = F.softmax((betas + Tensor(noise)) * (1.0 / temperature), axis=-1)
    edges, ops = np.indices(k_star.shape)
    picked = F.getitem(y, (edges, ops, k_star))
    return picked - Tensor(picked.data) + 1.0


def network_expected_energy(network, macs: dict, pj: np.ndarray, exact_pj: float,
                            ops_fixed: bool = False) -> tuple[Tensor, float]:
    """(E, E_ref) of a supernet: E differentiable in α (and β when the network has them), E_ref a number.

    ``macs`` from :func:`searched_op_macs`; ``pj`` holds the energy per
    multiply of each candidate multiplier (one entry for a network without β).
    ``ops_fixed``: the op probabilities enter E as constants, so E's gradient
    reaches β only (an energy term then cannot delete convolutions).
    """
    energy, reference = None, 0.0
    for kind in ("normal", "reduce"):
        alphas = getattr(network, f"alphas_{kind}")
        if ops_fixed:
            alphas = Tensor(alphas.data)
        betas = getattr(network, f"betas_{kind}", None)
        e = expected_energy(alphas, betas, macs[kind], pj)
        energy = e if energy is None else energy + e
        reference += reference_energy(alphas.data, macs[kind], exact_pj)
    return energy, reference


def argmax_energy_ratio(network, macs: dict, pj: np.ndarray, exact_pj: float) -> float:
    """E/E_ref with every searched op on its argmax-β multiplier (the choice a genotype would make), the op
    probabilities soft as in E: the ratio that a budget constrains (a plain number, no gradient)."""
    spent = reference = 0.0
    pj = np.asarray(pj, dtype=np.float64)
    for kind in ("normal", "reduce"):
        alphas = getattr(network, f"alphas_{kind}").data
        weight = _searched_op_probabilities(alphas) * macs[kind]
        spent += float((weight * pj[np.argmax(getattr(network, f"betas_{kind}").data, axis=-1)]).sum())
        reference += reference_energy(alphas, macs[kind], exact_pj)
    return spent / reference


class MultiplierNetwork(Network):
    """The supernet with a choice of multiplier per searched op: β beside α, one sampled path per step.

    ``candidates`` are K ≥ 2 arithmetics (QuantizedArithmetic), one per candidate multiplier. β has shape
    (edges, 4, K) per cell type, initialised like α (1e-3·N(0, 1)).
    :meth:`choose` draws the multipliers of a step (Gumbel-max, straight-through
    factors in the forward pass); :meth:`choose_most_likely` sets argmax β and
    runs the plain ops (evaluation, genotype).
    """

    def __init__(self, channels: int = 16, num_classes: int = 10, layers: int = 8, stem_multiplier: int = 3,
                 candidates=(), seed: int = 0, temperature: float = 1.0):
        if len(candidates) < 2:
            raise ValueError(f"a choice needs at least 2 candidate arithmetics, got {len(candidates)}")
        if SEARCHED_COLUMNS != tuple(range(len(PRIMITIVES) - len(SEARCHED_OPS), len(PRIMITIVES))):
            raise ValueError("the searched ops must be the last columns of α")
        super().__init__(channels, num_classes, layers, stem_multiplier, arithmetic=None, seed=seed)
        self.candidates = tuple(candidates)
        self.temperature = float(temperature)
        rng = np.random.default_rng([seed, 2])
        shape = (len(self.cells[0].edges), len(SEARCHED_OPS), len(self.candidates))
        self.betas_normal = Parameter(1e-3 * rng.standard_normal(shape))
        self.betas_reduce = Parameter(1e-3 * rng.standard_normal(shape))
        arch = {id(p) for p in self.arch_parameters()}
        self._weights = tuple(p for p in self.parameters() if id(p) not in arch)
        self._layers = {"normal": {}, "reduce": {}}  # (edge, column) -> searched conv layers of that type
        for cell in self.cells:
            kind = "reduce" if cell.reduction else "normal"
            for e, mixed in enumerate(cell.edges):
                for name, op in zip(_computed_names(), mixed.ops):
                    if name in SEARCHED_OPS:
                        key = (e, SEARCHED_OPS.index(name))
                        self._layers[kind].setdefault(key, []).extend(searched_convs(op))
        self.choice: dict | None = None
        self.chosen: dict = {}
        self.choose_most_likely()

    def arch_parameters(self):
        betas = [self.betas_normal, self.betas_reduce] if hasattr(self, "betas_reduce") else []  # not yet in init
        return [self.alphas_normal, self.alphas_reduce, *betas]

    def _apply(self, kind: str, k_star: np.ndarray) -> None:
        for (e, col), layers in self._layers[kind].items():
            arithmetic = self.candidates[int(k_star[e, col])]
            for layer in layers:
                layer.arithmetic = arithmetic
        self.chosen[kind] = k_star

    def choose(self, rng: np.random.Generator) -> None:
        """Draw this step's multiplier of every searched op (per cell type) and set the layers to it."""
        self.choice = {}
        for kind in ("normal", "reduce"):
            k_star, noise = gumbel_choice(getattr(self, f"betas_{kind}").data, rng, self.temperature)
            self.choice[kind] = (k_star, noise)
            self._apply(kind, k_star)

    def choose_most_likely(self) -> None:
        """Set every searched op to its argmax-β multiplier; the forward pass then runs the plain ops."""
        self.choice = None
        for kind in ("normal", "reduce"):
            self._apply(kind, np.argmax(getattr(self, f"betas_{kind}").data, axis=-1))

    def multiplier_probabilities(self) -> dict[str, np.ndarray]:
        out = {}
        for kind in ("normal", "reduce"):
            b = getattr(self, f"betas_{kind}").data.astype(np.float64)
            p = np.exp(b - b.max(axis=-1, keepdims=True))
            out[kind] = p / p.sum(axis=-1, keepdims=True)
        return out

    def forward(self, x: Tensor) -> Tensor:
        s0 = s1 = self.stem(x)
        weights = {"normal": F.softmax(self.alphas_normal, axis=-1), "reduce": F.softmax(self.alphas_reduce, axis=-1)}
        if self.choice is not None:
            for kind, (k_star, noise) in self.choice.items():
                factors = straight_through_factors(getattr(self, f"betas_{kind}"), k_star, noise, self.temperature)
                plain = Tensor(np.ones((factors.shape[0], len(PRIMITIVES) - len(SEARCHED_OPS)), np.float32))
                weights[kind] = weights[kind] * F.concat([plain, factors], axis=1)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, weights["reduce" if cell.reduction else "normal"])
        return self.classifier(self.global_pooling(s1))

    def chosen_multipliers(self) -> dict[str, np.ndarray]:
        """argmax-β multiplier index per (edge, searched op), per cell type."""
        return {kind: np.argmax(getattr(self, f"betas_{kind}").data, axis=-1) for kind in ("normal", "reduce")}

    def genotype(self, max_parameter_free: int | None = None) -> Genotype:
        """DARTS's genotype of α (capped as :meth:`Network.genotype`), with the argmax-β multiplier of every
        kept sep/dil conv."""
        base = super().genotype(max_parameter_free)
        chosen = self.chosen_multipliers()
        mults = {}
        for kind in ("normal", "reduce"):
            names = []
            for k, (op, j) in enumerate(getattr(base, kind)):
                node = k // 2
                edge = edge_index(node, j)
                names.append(self.candidates[int(chosen[kind][edge, SEARCHED_OPS.index(op)])].name
                             if op in SEARCHED_OPS else None)
            mults[kind] = names
        return Genotype(base.normal, base.normal_concat, base.reduce, base.reduce_concat,
                        normal_multipliers=mults["normal"], reduce_multipliers=mults["reduce"])


def multiplier_sensitivity(network: "MultiplierNetwork", genotype: Genotype, loss_of, reference: int) -> dict:
    """Loss increase of each kept searched op of ``genotype`` with each candidate multiplier.

    Every searched conv runs candidate ``reference`` (the most expensive one) except the op measured,
    which runs candidate c in every cell of its type; ``loss_of()`` returns the loss of the network as it is set (e.g. on a fixed set of held-out images).
    Returns ``{(cell type, position among the 8 kept ops): array of K loss increases}`` (0 at the
    reference). The network is left on its argmax-β multipliers.
    """
    base = {kind: np.full((len(network.cells[0].edges), len(SEARCHED_OPS)), reference) for kind in ("normal", "reduce")}
    increase = {}
    try:
        network.choice = None
        for kind in ("normal", "reduce"):
            network._apply(kind, base[kind])
        base_loss = loss_of()
        for kind in ("normal", "reduce"):
            for k, (op, j) in enumerate(getattr(genotype, kind)):
                if op not in SEARCHED_OPS:
                    continue
                edge = edge_index(k // 2, j)
                losses = np.zeros(len(network.candidates))
                for c in range(len(network.candidates)):
                    if c == reference:
                        continue
                    trial = base[kind].copy()
                    trial[edge, SEARCHED_OPS.index(op)] = c
                    network._apply(kind, trial)
                    losses[c] = loss_of() - base_loss
                network._apply(kind, base[kind])
                increase[(kind, k)] = losses
    finally:
        network.choose_most_likely()
    return increase


def set_genotype_multipliers(network, genotype: Genotype, arithmetic_of) -> None:
    """Give every searched conv of an evaluation network the multiplier its genotype names for its op.

    ``arithmetic_of(name)`` turns a multiplier name into the layer's arithmetic. Ops the
    genotype gives no multiplier (and every op of a genotype without multipliers) are left as
    they are.
    """
    cache = {}
    for cell in network.cells:
        names = genotype.multipliers("reduce" if cell.reduction else "normal")
        for op, name in zip(cell.ops, names):
            if name is None:
                continue
            if name not in cache:
                cache[name] = arithmetic_of(name)
            for conv in searched_convs(op):
                conv.arithmetic = cache[name]
