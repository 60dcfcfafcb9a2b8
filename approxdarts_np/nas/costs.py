"""Per-layer MAC counts of a network, marked with what runs in 8 bit, for the energy report."""
from __future__ import annotations

import numpy as np

from approxdarts_np.approx.energy import LayerCost
from approxdarts_np.autodiff import Tensor, no_grad
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
        mult = getattr(layer, "multiplier", None)
        costs.append(LayerCost(name=names.get(id(layer), type(layer).__name__), kind=kind,
                               macs=layer.macs(shape), quantised=id(layer) in searched,
                               multiplier=mult.name if mult is not None else None))
    return costs

