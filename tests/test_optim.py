"""Optimizers, schedule and clipping step for step against PyTorch.

Tolerance: parameters after 6 steps within rtol=1e-5, atol=1e-6 of torch's.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from approxdarts_np.nn import SGD, Adam, Parameter, clip_grad_norm, cosine_lr

STEPS = 6


def _run_pair(make_ours, make_torch, seed, shapes=((3, 4), (5,))):
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(STEPS)]
    ours = [Parameter(a.copy()) for a in init]
    theirs = [torch.nn.Parameter(torch.tensor(a.copy())) for a in init]
    opt, topt = make_ours(ours), make_torch(theirs)
    for step_grads in grads:
        for p, tp, g in zip(ours, theirs, step_grads):
            p.grad = g.copy()
            tp.grad = torch.tensor(g.copy())
        opt.step()
        topt.step()
    for p, tp in zip(ours, theirs):
        np.testing.assert_allclose(p.data, tp.detach().numpy(), rtol=1e-5, atol=1e-6)


@given(st.integers(0, 2**16), st.sampled_from([0.0, 0.9]), st.sampled_from([0.0, 3e-4]),
       st.booleans())
def test_sgd_matches_torch(seed, momentum, wd, nesterov):
    if nesterov and momentum == 0:
        nesterov = False
    _run_pair(lambda ps: SGD(ps, lr=0.025, momentum=momentum, weight_decay=wd, nesterov=nesterov),
              lambda ps: torch.optim.SGD(ps, lr=0.025, momentum=momentum, weight_decay=wd,
                                         nesterov=nesterov), seed)


@given(st.integers(0, 2**16), st.sampled_from([(0.5, 0.999), (0.9, 0.999)]),
       st.sampled_from([0.0, 1e-3]))
def test_adam_matches_torch(seed, betas, wd):
    _run_pair(lambda ps: Adam(ps, lr=3e-4, betas=betas, weight_decay=wd),
              lambda ps: torch.optim.Adam(ps, lr=3e-4, betas=betas, weight_decay=wd), seed)


def test_optimizer_state_round_trip_continues_identically():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((4, 4)).astype(np.float32)
    gs = [rng.standard_normal((4, 4)).astype(np.float32) for _ in range(4)]
    p1, p2 = Parameter(a.copy()), Parameter(a.copy())
    o1 = Adam([p1], lr=1e-2, betas=(0.5, 0.999), weight_decay=1e-3)
    for g in gs[:2]:
        p1.grad = g.copy()
        o1.step()
    p2.data[...] = p1.data
    o2 = Adam([p2], lr=1.0)
    o2.load_state_dict(o1.state_dict())
    o2.betas, o2.weight_decay = o1.betas, o1.weight_decay
    for g in gs[2:]:
        p1.grad, p2.grad = g.copy(), g.copy()
        o1.step()
        o2.step()
    np.testing.assert_array_equal(p1.data, p2.data)


def test_cosine_schedule_matches_torch():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.025)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50, eta_min=0.001)
    for epoch in range(50):
        assert math.isclose(cosine_lr(0.025, 0.001, epoch, 50), opt.param_groups[0]["lr"],
                            rel_tol=1e-9, abs_tol=1e-12)
        opt.step()
        sched.step()


@given(st.integers(0, 2**16), st.sampled_from([0.1, 5.0, 1e3]))
def test_clip_grad_norm_matches_torch(seed, max_norm):
    rng = np.random.default_rng(seed)
    gs = [rng.standard_normal(s).astype(np.float32) for s in [(3, 3), (7,), (2, 2, 2)]]
    ours = [Parameter(np.zeros_like(g)) for g in gs]
    theirs = [torch.nn.Parameter(torch.zeros(g.shape)) for g in gs]
    for p, tp, g in zip(ours, theirs, gs):
        p.grad, tp.grad = g.copy(), torch.tensor(g)
    norm = clip_grad_norm(ours, max_norm)
    tnorm = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    assert norm == pytest.approx(float(tnorm), rel=1e-5)
    for p, tp in zip(ours, theirs):
        np.testing.assert_allclose(p.grad, tp.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_step_comparison_catches_a_wrong_update():
    class BadSGD(SGD):
        def step(self):
            super().step()
            self.params[0].data[0, 0] += 1e-3

    with pytest.raises(AssertionError):
        _run_pair(lambda ps: BadSGD(ps, lr=0.025, momentum=0.9),
                  lambda ps: torch.optim.SGD(ps, lr=0.025, momentum=0.9), 0)


# Weight decay made visible: gradients (0.05) comparable to decay x parameter (0.1 x ~1), and a
# learning rate (0.05) at which a dropped or doubled decay moves parameters by ~0.2 in 6 steps,
# 10^5 times the comparison tolerance. (With the search defaults, lr 3e-4 and decay 1e-3 on unit
# gradients, the decay's effect is ~1e-7 and hides under any float tolerance.)
DECAY, DECAY_LR, DECAY_GRAD_SCALE = 0.1, 0.05, 0.05


def _decay_run(make, torch_params: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    shapes = ((3, 4), (5,))
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[(DECAY_GRAD_SCALE * rng.standard_normal(s)).astype(np.float32) for s in shapes]
             for _ in range(STEPS)]
    if torch_params:
        params = [torch.nn.Parameter(torch.tensor(a)) for a in init]
    else:
        params = [Parameter(a.copy()) for a in init]
    opt = make(params)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = torch.tensor(g.copy()) if torch_params else g.copy()
        opt.step()
    return [p.detach().numpy() if torch_params else p.data for p in params]


def _assert_close(ours, theirs):
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _max_gap(ours, theirs):
    return max(float(np.abs(a - b).max()) for a, b in zip(ours, theirs))


def _torch_adam(ps):
    # DARTS's architect: torch.optim.Adam(arch_parameters, lr, betas=(0.5, 0.999), weight_decay),
    # i.e. L2 decay added to the gradient before the moments (not AdamW's decoupled decay).
    return torch.optim.Adam(ps, lr=DECAY_LR, betas=(0.5, 0.999), weight_decay=DECAY)


def _torch_sgd(ps):
    return torch.optim.SGD(ps, lr=DECAY_LR, momentum=0.9, weight_decay=DECAY)


def test_adam_weight_decay_is_torch_l2_decay_once():
    theirs = _decay_run(_torch_adam, torch_params=True)
    _assert_close(_decay_run(lambda ps: Adam(ps, lr=DECAY_LR, betas=(0.5, 0.999), weight_decay=DECAY),
                             torch_params=False), theirs)


def test_sgd_weight_decay_is_torch_l2_decay_once():
    theirs = _decay_run(_torch_sgd, torch_params=True)
    _assert_close(_decay_run(lambda ps: SGD(ps, lr=DECAY_LR, momentum=0.9, weight_decay=DECAY),
                             torch_params=False), theirs)


class _AdamDecayTwice(Adam):
    """Decay added to the gradient and applied again, decoupled, after the update."""

    def step(self):
        super().step()
        for p in self.params:
            p.data -= np.float32(self.lr * self.weight_decay) * p.data


def test_the_tester_weight_decay_dropped_doubled_or_decoupled_is_caught():
    """Each wrong decay lands at least 0.05 away from torch's parameters (tolerance ~1e-5)."""
    adam = _decay_run(_torch_adam, torch_params=True)
    sgd = _decay_run(_torch_sgd, torch_params=True)
    wrong = {
        "adam without decay": (lambda ps: Adam(ps, lr=DECAY_LR, betas=(0.5, 0.999)), adam),
        "adam decay doubled": (lambda ps: Adam(ps, lr=DECAY_LR, betas=(0.5, 0.999),
                                               weight_decay=2 * DECAY), adam),
        "adam decay twice": (lambda ps: _AdamDecayTwice(ps, lr=DECAY_LR, betas=(0.5, 0.999),
                                                        weight_decay=DECAY), adam),
        "adamw": (lambda ps: torch.optim.AdamW(ps, lr=DECAY_LR, betas=(0.5, 0.999),
                                               weight_decay=DECAY), adam),
        "sgd without decay": (lambda ps: SGD(ps, lr=DECAY_LR, momentum=0.9), sgd),
        "sgd decay doubled": (lambda ps: SGD(ps, lr=DECAY_LR, momentum=0.9, weight_decay=2 * DECAY), sgd),
    }
    for name, (make, reference) in wrong.items():
        ours = _decay_run(make, torch_params=name == "adamw")
        assert _max_gap(ours, reference) > 0.05, name
        with pytest.raises(AssertionError):
            _assert_close(ours, reference)
