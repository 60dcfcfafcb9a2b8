"""Energy budgets of a multiplier-aware search: the ratio a genotype costs, the dual variable that meets a
budget during the search, the projection that makes the derived genotype meet it, and the cap on
parameter-free ops.

The budget is a ratio r: the multiplication energy of the searched convolutions (the depthwise and
pointwise convs inside sep/dil convs) with their chosen multipliers, divided by the energy of the same
convolutions in exact 8 bit. It does not depend on how many images are classified, and only mildly on the
network's size (through the MAC shares of the ops), so a budget set on the small search network is checked
on the evaluation network (DARTS's 20 cells and 36 channels by default).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from approxdarts_np.nas.genotypes import PAIRS, SEARCHED_OPS, STEPS, Genotype
from approxdarts_np.nas.operations import PRIMITIVES

PARAMETER_FREE_OPS = ("max_pool_3x3", "avg_pool_3x3", "skip_connect")

# (kernel size, padding, dilation, depthwise+pointwise blocks) of each searched op, as OPS builds them
_CONV_GEOMETRY = {"sep_conv_3x3": (3, 1, 1, 2), "sep_conv_5x5": (5, 2, 1, 2),
                  "dil_conv_3x3": (3, 2, 2, 1), "dil_conv_5x5": (5, 4, 2, 1)}


def _out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def op_multiplies(op: str, channels: int, size: int, stride: int) -> int:
    """Multiplies of one image through a searched op's depthwise and pointwise convs (0 for other ops).

    ``size`` is the op's input height (= width); the first depthwise conv carries the stride.
    """
    if op not in _CONV_GEOMETRY:
        return 0
    kernel, padding, dilation, blocks = _CONV_GEOMETRY[op]
    out = _out_size(size, kernel, stride, padding, dilation)
    per_block = channels * kernel * kernel * out * out + channels * channels * out * out
    return blocks * per_block


def genotype_op_multiplies(genotype: Genotype, channels: int = 36, layers: int = 20,
                           image_size: int = 32) -> dict[str, np.ndarray]:
    """Multiplies per image of each of the 8 kept ops of each cell type, summed over the cells of the
    evaluation network (``channels``, ``layers``): ``{"normal": (8,), "reduce": (8,)}`` int64 arrays."""
    totals = {"normal": np.zeros(PAIRS, np.int64), "reduce": np.zeros(PAIRS, np.int64)}
    c, size = channels, image_size
    reductions = (layers // 3, 2 * layers // 3)
    for i in range(layers):
        reduction = i in reductions
        kind = "reduce" if reduction else "normal"
        if reduction:
            c *= 2
        for k, (op, j) in enumerate(getattr(genotype, kind)):
            stride = 2 if reduction and j < 2 else 1
            # edges from a reduction cell's inputs see the input size; every other edge the cell's output size
            in_size = size if stride == 2 or not reduction else _out_size(size, 3, 2, 1, 1)
            totals[kind][k] += op_multiplies(op, c, in_size, stride)
        if reduction:
            size = _out_size(size, 3, 2, 1, 1)
    return totals


def energy_ratio(genotype: Genotype, pj: dict[str, float], exact_pj: float, channels: int = 36,
                 layers: int = 20) -> float:
    """Energy of the searched convs with the genotype's multipliers over the same convs in exact 8 bit.

    ``pj`` maps a multiplier name to its energy per multiply. A genotype without searched convs costs
    nothing in either arithmetic; its ratio is 0.
    """
    macs = genotype_op_multiplies(genotype, channels, layers)
    spent = reference = 0.0
    for kind in ("normal", "reduce"):
        for k, ((op, _), name) in enumerate(zip(getattr(genotype, kind), genotype.multipliers(kind))):
            if op in SEARCHED_OPS:
                spent += float(macs[kind][k]) * (pj[name] if name is not None else exact_pj)
                reference += float(macs[kind][k]) * exact_pj
    return spent / reference if reference else 0.0


def edge_index(node: int, j: int) -> int:
    """Row of α (and β) of the edge from state ``j`` into intermediate node ``node``."""
    return sum(2 + i for i in range(node)) + j


def project_to_budget(genotype: Genotype, betas: dict[str, np.ndarray], names: list[str], pj: np.ndarray,
                      exact_pj: float, budget: float, channels: int = 36,
                      layers: int = 20) -> tuple[Genotype, list[dict]]:
    """The genotype with multipliers cheapened until its :func:`energy_ratio` is at most ``budget``.

    While over budget, among the kept searched ops that have a cheaper candidate, the op whose β prefers
    its current multiplier least over its best cheaper one (the smallest margin β[k] − max β[cheaper])
    moves to that cheaper one. Each move lowers the energy, so this ends; it meets any budget at or
    above the cheapest candidate's ratio. Moves that turn out not to be needed once the budget holds are
    undone. Returns the genotype and the moves kept (cell, op, from, to, margin).
    """
    pj = np.asarray(pj, dtype=np.float64)
    index = {name: k for k, name in enumerate(names)}
    prices = dict(zip(names, map(float, pj)))
    chosen = {kind: list(genotype.multipliers(kind)) for kind in ("normal", "reduce")}
    moves = []

    def ratio() -> float:
        return energy_ratio(_with_multipliers(genotype, chosen), prices, exact_pj, channels, layers)

    while ratio() > budget:
        best = None
        for kind in ("normal", "reduce"):
            for k, (op, j) in enumerate(getattr(genotype, kind)):
                if op not in SEARCHED_OPS:
                    continue
                row = betas[kind][edge_index(k // 2, j), SEARCHED_OPS.index(op)]
                now = index[chosen[kind][k]]
                cheaper = [c for c in range(len(names)) if pj[c] < pj[now]]
                if not cheaper:
                    continue
                to = max(cheaper, key=lambda c: (row[c], -pj[c]))
                margin = float(row[now] - row[to])
                if best is None or margin < best[0]:
                    best = (margin, kind, k, now, to)
        if best is None:
            break  # every kept conv already has the cheapest candidate
        margin, kind, k, now, to = best
        chosen[kind][k] = names[to]
        moves.append({"cell": kind, "op": k, "from": names[now], "to": names[to], "margin": margin})
    kept = _undo_unneeded(moves, chosen, ratio, budget)
    return _with_multipliers(genotype, chosen), kept


def _with_multipliers(genotype: Genotype, chosen: dict) -> Genotype:
    return Genotype(genotype.normal, genotype.normal_concat, genotype.reduce, genotype.reduce_concat,
                    normal_multipliers=chosen["normal"], reduce_multipliers=chosen["reduce"])


def _undo_unneeded(moves: list[dict], chosen: dict, ratio, budget: float) -> list[dict]:
    """Undo every move but the last (latest first) that the budget still allows, in ``chosen``; the moves kept.

    The last move may have saved more than was needed, so earlier ones can turn out unnecessary. A move
    whose op a later move changed again is kept (the later one decides).
    """
    for move in reversed(moves[:-1]):
        kind, k = move["cell"], move["op"]
        if chosen[kind][k] != move["to"]:
            continue
        chosen[kind][k] = move["from"]
        if ratio() > budget:
            chosen[kind][k] = move["to"]
        else:
            move["undone"] = True
    return [m for m in moves if not m.get("undone")]


def allocate_by_sensitivity(genotype: Genotype, increase: dict, names: list[str], pj: np.ndarray,
                            exact_pj: float, budget: float, channels: int = 36,
                            layers: int = 20) -> tuple[Genotype, list[dict]]:
    """Multipliers for the genotype's kept searched ops from their measured loss increases, within ``budget``.

    ``increase[(cell, op)]`` holds, for the op at position ``op`` of the cell type's 8 kept ops, the loss
    increase measured with each candidate (0 for the reference, the most expensive). Every op starts on
    the reference; while over budget, the move to a cheaper candidate with the smallest loss increase per
    pJ saved is made (a greedy knapsack, as HAQ allocates bit widths); moves the budget turns out not to
    need are then undone, latest first. Meets every budget at or above the cheapest candidate's ratio.
    """
    pj = np.asarray(pj, dtype=np.float64)
    prices = dict(zip(names, map(float, pj)))
    reference = int(np.argmax(pj))
    macs = genotype_op_multiplies(genotype, channels, layers)
    chosen = {kind: [names[reference] if op in SEARCHED_OPS else None for op, _ in getattr(genotype, kind)]
              for kind in ("normal", "reduce")}
    index = {name: k for k, name in enumerate(names)}
    moves = []

    def ratio() -> float:
        return energy_ratio(_with_multipliers(genotype, chosen), prices, exact_pj, channels, layers)

    while ratio() > budget:
        best = None
        for (kind, k), losses in sorted(increase.items()):
            now = index[chosen[kind][k]]
            for c in range(len(names)):
                saved = float(macs[kind][k]) * (pj[now] - pj[c])
                if saved <= 0:
                    continue
                score = (float(losses[c]) - float(losses[now])) / saved
                if best is None or score < best[0]:
                    best = (score, kind, k, now, c)
        if best is None:
            break
        score, kind, k, now, c = best
        chosen[kind][k] = names[c]
        moves.append({"cell": kind, "op": k, "from": names[now], "to": names[c], "loss_per_pj": score})
    kept = _undo_unneeded(moves, chosen, ratio, budget)
    return _with_multipliers(genotype, chosen), kept


def cap_parameter_free(weights: dict[str, np.ndarray], genotype: Genotype, limit: int) -> Genotype:
    """At most ``limit`` parameter-free ops (pools, skip) per cell, P-DARTS-style.

    ``weights`` holds the softmax-ed α (14×8) of each cell type. The parameter-free ops beyond the limit
    — the weakest first, by their weight — are each replaced by the strongest searched conv on the same
    edge, so the cell keeps its inputs. Multipliers are not carried (derive them after the cap).
    """
    fields = {}
    for kind in ("normal", "reduce"):
        pairs = list(getattr(genotype, kind))
        w = weights[kind]
        free = [k for k, (op, _) in enumerate(pairs) if op in PARAMETER_FREE_OPS]
        excess = len(free) - limit
        if excess > 0:
            free.sort(key=lambda k: (w[edge_index(k // 2, pairs[k][1]), PRIMITIVES.index(pairs[k][0])], -k))
            for k in free[:excess]:
                row = w[edge_index(k // 2, pairs[k][1])]
                conv = max(SEARCHED_OPS, key=lambda op: (row[PRIMITIVES.index(op)], -SEARCHED_OPS.index(op)))
                pairs[k] = (conv, pairs[k][1])
        fields[kind] = tuple(pairs)
    return Genotype(fields["normal"], genotype.normal_concat, fields["reduce"], genotype.reduce_concat)


def parameter_free_share(genotype: Genotype) -> float:
    ops = [op for op, _ in genotype.normal + genotype.reduce]
    return sum(op in PARAMETER_FREE_OPS for op in ops) / len(ops)


@dataclass
class DualAscent:
    """λ of the constraint E/E_ref ≤ r, by projected dual ascent: λ ← max(0, λ + η·(E/E_ref − r)).

    λ rises while the expected ratio is over the budget and falls back (to 0 at most) once it is met, so
    the energy term weighs exactly as much as the constraint needs.
    """

    budget: float
    step_size: float
    value: float = 0.0

    def update(self, ratio: float) -> float:
        self.value = max(0.0, self.value + self.step_size * (ratio - self.budget))
        return self.value


def gumbel_temperature(epoch: int, epochs: int, start: float, end: float) -> float:
    """τ of ``epoch``: geometric from ``start`` (first epoch) to ``end`` (last epoch)."""
    if epochs <= 1 or start == end:
        return float(start)
    return float(start * (end / start) ** (min(epoch, epochs - 1) / (epochs - 1)))


def random_genotype(rng: np.random.Generator, names: list[str], max_parameter_free: int = PAIRS) -> Genotype:
    """A random cell pair, as DARTS's random-search baseline draws it: per node two distinct inputs and an
    op for each (uniform over the non-``none`` ops), a uniform multiplier for each searched conv; cells with
    more than ``max_parameter_free`` parameter-free ops are drawn again."""
    ops = [op for op in PRIMITIVES if op != "none"]
    fields = {}
    for kind in ("normal", "reduce"):
        while True:
            pairs = []
            for node in range(STEPS):
                inputs = rng.choice(2 + node, size=2, replace=False)
                pairs.extend((ops[int(rng.integers(len(ops)))], int(j)) for j in sorted(inputs))
            if sum(op in PARAMETER_FREE_OPS for op, _ in pairs) <= max_parameter_free:
                break
        mults = [names[int(rng.integers(len(names)))] if op in SEARCHED_OPS else None for op, _ in pairs]
        fields[kind] = (tuple(pairs), mults)
    concat = tuple(range(2, 2 + STEPS))
    return Genotype(fields["normal"][0], concat, fields["reduce"][0], concat,
                    normal_multipliers=fields["normal"][1], reduce_multipliers=fields["reduce"][1])
