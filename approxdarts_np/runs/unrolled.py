"""Second-order (unrolled) architecture step of DARTS.

The architecture gradient is taken at the weights after one virtual SGD step,

    w' = w − ξ (μ·v + ∇w L_train(w, α) + λ·w)        (μ: momentum, v: momentum buffer, λ: weight decay)
    dα = ∇α L_val(w', α) − ξ · ∇²αw L_train(w, α) · ∇w' L_val(w', α)

and the Hessian-vector product is replaced by a central difference of the
architecture gradient of the training loss,

    ∇²αw L_train(w, α) · u ≈ (∇α L_train(w⁺, α) − ∇α L_train(w⁻, α)) / (2ε),
    w± = w ± ε·u,  u = ∇w' L_val(w', α),  ε = 0.01 / ‖u‖  (norm over all weights together),

as in DARTS (Liu et al., 2019, eq. 7–8, and its ``Architect``). Every pass
is an ordinary forward/backward of the model, so an approximate multiplier
and its straight-through gradients are used unchanged; weight gradients are
computed only where the formula needs them (the virtual step and u).

What the finite difference approximates: ∇α L_train jumps wherever a ReLU or
a max-pool winner flips, and float32 rounding of the two gradients is divided
by 2ε. On the quick supernet (8 channels, 5 cells, batch 32, at
initialisation) the term at r = 0.01 had cosine 0.33 with torch's
double-backward product and an L2 error 6× its size (r = 1e-3: cosine 0.07).
It is DARTS's estimator, reproduced; tests/test_second_order.py shows it equal
to the same difference in float64 torch, and equal to the exact product where
no unit flips (tiny net, r = 1e-3).
"""
from __future__ import annotations

import math

import numpy as np

from approxdarts_np.nas.model_search import Network
from approxdarts_np.nn import SGD, Adam
from approxdarts_np.runs.replicas import loss_and_backward

DARTS_PERTURBATION = 0.01  # ε·‖u‖: length of the weights' finite-difference perturbation (DARTS's r)


def unrolled_architecture_step(model: Network, a_optimizer: Adam, w_optimizer: SGD, train_batch, val_batch,
                               xi: float, perturbation: float = DARTS_PERTURBATION) -> tuple[float, int]:
    """Update α with DARTS's second-order gradient; returns (L_val(w', α), correct predictions at w').

    ``train_batch`` and ``val_batch`` are ``(images, labels)`` pairs; ``xi``
    is the virtual step's learning rate (DARTS uses the current weight
    learning rate); ``perturbation`` is ε·‖u‖ (DARTS: 0.01). The momentum
    buffers, momentum and weight decay of ``w_optimizer`` enter the virtual
    step (a missing buffer counts as zero, as before the first weight step);
    ``w_optimizer`` is only read. The virtual step is not clipped, as in
    DARTS.

    Unchanged on return, bit for bit: the weights, their ``.grad`` and
    ``requires_grad``, the state of ``w_optimizer``, and the running
    statistics of every BatchNorm layer. The four forward passes run in the
    model's current mode (train mode in a search, so BN normalises with batch
    statistics and the running averages are restored afterwards; DARTS's code
    lets three of its passes move the live model's running averages, which
    only the eval-mode validation would see). Changed: α (one
    ``a_optimizer.step()``), α's ``.grad`` (holding dα) and ``a_optimizer``'s
    state. w' is never kept, so a checkpoint needs nothing beyond what a
    first-order search saves.

    A non-finite loss in any pass leaves α and ``a_optimizer`` untouched and
    is returned as the loss, so that the caller can report divergence.
    """
    if getattr(w_optimizer, "nesterov", False):
        raise ValueError("the virtual step follows plain momentum SGD; a Nesterov optimizer is not supported")
    weights, alphas = model.weights(), model.arch_parameters()
    saved_w = [p.data.copy() for p in weights]
    saved_grads = [p.grad for p in weights]
    saved_flags = [p.requires_grad for p in weights + alphas]
    saved_buffers = [(b, b.copy()) for _, b in model.named_buffers()]
    a_optimizer.zero_grad()
    try:
        loss, correct, d_alpha = _unrolled_alpha_gradient(model, w_optimizer, train_batch, val_batch, xi,
                                                          perturbation, saved_w)
    finally:
        for p, w, g in zip(weights, saved_w, saved_grads):
            p.data[...] = w
            p.grad = g
        for p, flag in zip(weights + alphas, saved_flags):
            p.requires_grad = flag
        for live, copy in saved_buffers:
            live[...] = copy
    if d_alpha is None:
        for a in alphas:
            a.grad = None
        return loss, correct
    for a, g in zip(alphas, d_alpha):
        a.grad = g
    a_optimizer.step()
    return loss, correct


def _unrolled_alpha_gradient(model: Network, w_optimizer: SGD, train_batch, val_batch, xi: float,
                             perturbation: float, w0):
    """(val loss at w', correct at w', dα or None when a loss is not finite); leaves the weights at w0 ± εu."""
    weights, alphas = model.weights(), model.arch_parameters()
    # virtual step: w' = w − ξ (μ·v + ∇w L_train(w, α) + λ·w)
    loss, _ = _forward_backward(model, *train_batch, wanted=weights, frozen=alphas)
    if not math.isfinite(loss):
        return loss, 0, None
    _virtual_step(weights, w_optimizer, xi, w0)
    # direct term ∇α L_val(w', α), and u = ∇w' L_val(w', α)
    val_loss, val_correct = _forward_backward(model, *val_batch, wanted=weights + alphas, frozen=[])
    if not math.isfinite(val_loss):
        return val_loss, val_correct, None
    direct = [a.grad for a in alphas]
    u = [np.zeros_like(p.data) if p.grad is None else p.grad for p in weights]
    hvp = _alpha_hessian_vector_product(model, train_batch, u, w0, perturbation)
    if hvp is None:
        return math.nan, val_correct, None
    d_alpha = [(g - np.float32(xi) * h).astype(np.float32) for g, h in zip(direct, hvp)]
    return val_loss, val_correct, d_alpha


def _virtual_step(weights, w_optimizer: SGD, xi: float, w0) -> None:
    """Set each weight to w' = w − ξ (μ·v + g + λ·w); g: its ``.grad``, v: its momentum buffer (0 if none)."""
    momentum, decay, step = (np.float32(w_optimizer.momentum), np.float32(w_optimizer.weight_decay),
                             np.float32(xi))
    index = {id(p): i for i, p in enumerate(w_optimizer.params)}
    for p, w in zip(weights, w0):
        d = decay * w if p.grad is None else p.grad + decay * w  # no gradient: the loss does not use p
        buf = w_optimizer.state[index[id(p)]].get("momentum_buffer")
        if buf is not None and momentum:
            d = d + momentum * buf
        p.data[...] = w - step * d
        p.grad = None


def _alpha_hessian_vector_product(model: Network, train_batch, u, w0, perturbation: float):
    """∇²αw L_train(w0, α)·u by a central difference of ∇α L_train at w0 ± εu, ε = perturbation/‖u‖.

    None when a loss is not finite. The perturbed weights are formed from w0
    each time (not by adding and subtracting in place), so w⁺ and w⁻ are
    symmetric to float32 rounding of a single operation.
    """
    weights, alphas = model.weights(), model.arch_parameters()
    norm = math.sqrt(sum(float(np.dot(g.ravel().astype(np.float64), g.ravel().astype(np.float64))) for g in u))
    if norm == 0.0:
        return [np.zeros_like(a.data) for a in alphas]
    eps = perturbation / norm
    grads = []
    for sign in (1.0, -1.0):
        step = np.float32(sign * eps)
        for p, w, g in zip(weights, w0, u):
            p.data[...] = w + step * g
        loss, _ = _forward_backward(model, *train_batch, wanted=alphas, frozen=weights)
        if not math.isfinite(loss):
            return None
        grads.append([a.grad for a in alphas])
    return [((gp.astype(np.float64) - gm) / (2 * eps)).astype(np.float32) for gp, gm in zip(*grads)]


def _forward_backward(model: Network, images, labels, wanted, frozen) -> tuple[float, int]:
    """Cross-entropy of a batch; ``wanted`` get fresh ``.grad``s, ``frozen`` get none (none is computed)."""
    for p in wanted:
        p.grad = None
        p.requires_grad = True
    for p in frozen:
        p.requires_grad = False
    return loss_and_backward(model, images, labels)
