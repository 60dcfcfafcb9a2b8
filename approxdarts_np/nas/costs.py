"""Per-layer MAC counts of a network, marked with what runs in 8 bit, for the energy report."""
from __future__ import annotations

from typing import Callable

import numpy as np

from approxdarts_np.approx.energy import LayerCost
from approxdarts_np.autodiff import Tensor, no_grad
from approxdarts_np.kernels._util import conv_output_size
from approxdarts_np.nas.genotypes import Genotype
from approxdarts_np.nas.operations import searched_convs
from approxdarts_np.nn import Conv2d, DepthwiseConv2d, Linear, Module
from approxdarts_np.nn.costs import recording_calls


def network_costs(model: Module, image_shape=(3, 32, 32)) -> list[LayerCost]:
    """MACs of every convolution and linear layer for one image, in execution order.

    Counted from a real forward pass (eval mode, one zero image), so only layers
    the network actually runs appear. ``quantised`` marks the searched
    convolutions (inside sep/dil convs): those run in 8 bit in exact and
    approximate mode; their ``multiplier`` is the one the layer is set to, if any.
    """
    names = {id(m): name for name, m in model.named_modules()}
    searched = {id(m) for m in searched_convs(model)}
    was_training = model.training
    model.eval()
    try:
        with no_grad(), recording_calls() as calls:
            model(Tensor(np.zeros((1, *image_shape), dtype=np.float32)))
    finally:
        model.train(was_training)
    costs = []
    for layer, shape in calls:
        if isinstance(layer, DepthwiseConv2d):
            kind = "depthwise"
        elif isinstance(layer, Conv2d):
            kind = "pointwise" if layer.weight.shape[2:] == (1, 1) else "conv"
        elif isinstance(layer, Linear):
            kind = "linear"
        else:  # pragma: no cover - only these layers record calls
            continue
        mult = getattr(layer, "arithmetic", None)
        costs.append(LayerCost(name=names.get(id(layer), type(layer).__name__), kind=kind,
                               macs=layer.macs(shape), quantised=id(layer) in searched,
                               multiplier=mult.name if mult is not None else None))
    return costs



def evaluation_network_costs(genotype: Genotype, channels: int, layers: int,
                             multiplier_name: Callable[[str], str | None] | None = None,
                             image_size: int = 32) -> tuple[list[LayerCost], int]:
    """:func:`network_costs` of ``NetworkCIFAR(genotype, channels, 10, layers, auxiliary=False)`` and its
    parameter count, from the layer shapes alone: no weights are made and nothing runs.

    The rows are those of the forward pass, in its order, with its names (the tests hold the two equal on
    several genotypes and sizes); this is what lets the energy of a very wide or deep network be counted
    without the memory its weights would take. ``multiplier_name(spec)``, when given, names the
    multiplier of every searched conv whose op the genotype gives one (as ``set_genotype_multipliers``
    would set it); otherwise searched convs carry none.
    """
    rows: list[LayerCost] = []
    params = 0

    def conv(name, kind, c_in, c_out, k, stride, padding, dilation, size, quantised=False, mult=None) -> int:
        nonlocal params
        out = conv_output_size(size, k, stride, padding, dilation)
        c_in_per_group = 1 if kind == "depthwise" else c_in
        rows.append(LayerCost(name=name, kind=kind, macs=c_out * out * out * c_in_per_group * k * k,
                              quantised=quantised, multiplier=mult))
        params += c_out * c_in_per_group * k * k
        return out

    def batch_norm(c) -> None:  # affine everywhere in the evaluation network
        nonlocal params
        params += 2 * c

    def pointwise(name, c_in, c_out, size, stride=1, quantised=False, mult=None) -> int:
        return conv(name, "pointwise", c_in, c_out, 1, stride, 0, 1, size, quantised, mult)

    def factorized_reduce(name, c_in, c_out, size) -> int:
        out = pointwise(f"{name}.conv_1", c_in, c_out // 2, size, stride=2)
        pointwise(f"{name}.conv_2", c_in, c_out // 2, size - 1, stride=2)  # on x[:, :, 1:, 1:]
        batch_norm(c_out)
        return out

    def dil_conv(name, c, k, stride, padding, dilation, size, mult) -> int:
        size = conv(f"{name}.depthwise", "depthwise", c, c, k, stride, padding, dilation, size, True, mult)
        size = pointwise(f"{name}.pointwise", c, c, size, quantised=True, mult=mult)
        batch_norm(c)
        return size

    def op(name, primitive, c, stride, size, mult) -> int:
        if primitive in ("max_pool_3x3", "avg_pool_3x3"):
            return conv_output_size(size, 3, stride, 1, 1)
        if primitive == "skip_connect":
            return size if stride == 1 else factorized_reduce(name, c, c, size)
        k = int(primitive[-1])
        if primitive.startswith("sep_conv"):
            size = dil_conv(f"{name}.first", c, k, stride, k // 2, 1, size, mult)
            return dil_conv(f"{name}.second", c, k, 1, k // 2, 1, size, mult)
        if primitive.startswith("dil_conv"):
            return dil_conv(name, c, k, stride, k - 1, 2, size, mult)
        raise ValueError(f"no evaluation-network op {primitive!r}")  # pragma: no cover - genotypes check names

    c_curr = 3 * channels
    size = conv("stem.layers.0", "conv", 3, c_curr, 3, 1, 1, 1, image_size)
    batch_norm(c_curr)
    c_prev_prev, c_prev, c_curr = c_curr, c_curr, channels
    size_prev_prev, size_prev = size, size
    reduction_prev = False
    names: dict[str, str | None] = {}
    for i in range(layers):
        reduction = i in (layers // 3, 2 * layers // 3)
        if reduction:
            c_curr *= 2
        cell = f"cells.items.{i}"
        if reduction_prev:
            s0 = factorized_reduce(f"{cell}.preprocess0", c_prev_prev, c_curr, size_prev_prev)
        else:
            s0 = pointwise(f"{cell}.preprocess0.op.layers.1", c_prev_prev, c_curr, size_prev_prev)
            batch_norm(c_curr)
        s1 = pointwise(f"{cell}.preprocess1.op.layers.1", c_prev, c_curr, size_prev)
        batch_norm(c_curr)
        field = "reduce" if reduction else "normal"
        pairs = genotype.reduce if reduction else genotype.normal
        multipliers = genotype.multipliers(field) if multiplier_name is not None else (None,) * len(pairs)
        states = [s0, s1]
        for node in range(len(pairs) // 2):
            outs = []
            for k in (2 * node, 2 * node + 1):
                primitive, j = pairs[k]
                spec = multipliers[k]
                if spec is not None and spec not in names:
                    names[spec] = multiplier_name(spec)
                outs.append(op(f"{cell}.ops.items.{k}", primitive, c_curr, 2 if reduction and j < 2 else 1,
                               states[j], names.get(spec) if spec is not None else None))
            states.append(outs[0])
        concat = genotype.reduce_concat if reduction else genotype.normal_concat
        reduction_prev = reduction
        c_prev_prev, c_prev = c_prev, len(concat) * c_curr
        size_prev_prev, size_prev = size_prev, states[concat[0]]
    rows.append(LayerCost(name="classifier", kind="linear", macs=c_prev * 10, quantised=False))
    params += c_prev * 10 + 10
    return rows, params
