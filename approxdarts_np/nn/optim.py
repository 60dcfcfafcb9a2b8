"""SGD and Adam with PyTorch's update rules, the cosine schedule, and gradient-norm clipping.

The updates follow ``torch.optim.SGD`` and ``torch.optim.Adam`` (weight decay
added to the gradient, L2 style; Adam's bias corrections folded as torch folds
them) so that a step here can be compared with a step there.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from approxdarts_np.nn.module import Parameter


class Optimizer:
    """Holds the parameters and their per-parameter state; ``step`` applies the gradients."""

    def __init__(self, params: Sequence[Parameter], lr: float):
        self.params = list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")
        self.lr = float(lr)
        self.state: list[dict[str, np.ndarray]] = [{} for _ in self.params]
        self.steps = 0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        """Plain arrays and numbers: the state a checkpoint needs to resume exactly."""
        return {"lr": self.lr, "steps": self.steps,
                "state": [{k: v.copy() for k, v in s.items()} for s in self.state]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["state"]) != len(self.params):
            raise ValueError("optimizer state does not match the parameter list")
        self.lr = float(state["lr"])
        self.steps = int(state["steps"])
        self.state = [{k: np.array(v, dtype=np.float32) for k, v in s.items()} for s in state["state"]]


class SGD(Optimizer):
    """SGD with momentum and L2 weight decay, as ``torch.optim.SGD`` (dampening 0)."""

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False):
        super().__init__(params, lr)
        self.momentum, self.weight_decay, self.nesterov = momentum, weight_decay, nesterov

    def step(self) -> None:
        lr = np.float32(self.lr)
        for p, st in zip(self.params, self.state):
            if p.grad is None:
                continue
            d = p.grad
            if self.weight_decay:
                d = d + np.float32(self.weight_decay) * p.data
            if self.momentum:
                buf = st.get("momentum_buffer")
                if buf is None:
                    buf = st["momentum_buffer"] = d.astype(np.float32, copy=True)
                else:
                    buf *= np.float32(self.momentum)
                    buf += d
                d = d + np.float32(self.momentum) * buf if self.nesterov else buf
            p.data -= lr * d
        self.steps += 1


class Adam(Optimizer):
    """Adam with L2 weight decay, as ``torch.optim.Adam`` (not AdamW)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, lr)
        self.betas, self.eps, self.weight_decay = tuple(betas), eps, weight_decay

    def step(self) -> None:
        b1, b2 = self.betas
        self.steps += 1
        t = self.steps
        bias1 = 1 - b1 ** t
        bias2_sqrt = math.sqrt(1 - b2 ** t)
        step_size = np.float32(self.lr / bias1)
        for p, st in zip(self.params, self.state):
            if p.grad is None:
                continue
            g = p.grad
            if self.weight_decay:
                g = g + np.float32(self.weight_decay) * p.data
            m = st.setdefault("exp_avg", np.zeros_like(p.data))
            v = st.setdefault("exp_avg_sq", np.zeros_like(p.data))
            m += np.float32(1 - b1) * (g - m)
            v *= np.float32(b2)
            v += np.float32(1 - b2) * g * g
            denom = np.sqrt(v) / np.float32(bias2_sqrt) + np.float32(self.eps)
            p.data -= step_size * (m / denom)


def cosine_lr(base_lr: float, min_lr: float, epoch: int, total_epochs: int) -> float:
    """Learning rate of ``epoch`` under cosine annealing from ``base_lr`` to ``min_lr``.

    Matches ``torch.optim.lr_scheduler.CosineAnnealingLR(T_max=total_epochs, eta_min=min_lr)``
    after ``epoch`` scheduler steps.
    """
    if total_epochs <= 0:
        return base_lr
    return min_lr + (base_lr - min_lr) * (1 + math.cos(math.pi * epoch / total_epochs)) / 2


def clip_grad_norm(params: Sequence[Parameter], max_norm: float) -> float:
    """Scale all gradients so that their joint L2 norm is at most ``max_norm``; returns the norm before.

    As ``torch.nn.utils.clip_grad_norm_``: factor ``max_norm / (norm + 1e-6)`` clamped to 1.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norms = np.array([np.linalg.norm(g.ravel()) for g in grads], dtype=np.float32)
    total = float(np.linalg.norm(norms))
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in grads:
            g *= np.float32(coef)
    return total
