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

Expected energy (DESIGN §9). With M[e, o] the multiplies of op o on edge e
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
from approxdarts_np.nas.operations import PRIMITIVES, searched_convs
from approxdarts_np.nn.costs import recording_calls

SEARCHED_OPS = ("sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")
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


def reference_energy(alphas: np.ndarray, macs: np.ndarray, exact_pj: float) -> float:
    """E_ref of one cell type: every searched conv in exact 8 bit at the current p_op (a plain number)."""
    a = np.asarray(alphas, dtype=np.float64)
    p = np.exp(a - a.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return float((p[:, SEARCHED_COLUMNS] * macs).sum() * exact_pj)


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
