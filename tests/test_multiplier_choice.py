"""Multiplier choice: MACs of every searched op by hand, expected energy and its gradients against torch and
a hand count, the straight-through Gumbel factors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from approxdarts_np.autodiff import Tensor
from approxdarts_np.nas.model_search import Network
from approxdarts_np.nas.multiplier_choice import (SEARCHED_COLUMNS, SEARCHED_OPS, expected_energy, gumbel_choice,
                                                  reference_energy, searched_op_macs, straight_through_factors)

def _op_macs(op: str, c: int, size: int) -> int:
    """Multiplies of one searched op on one image: depthwise k×k and pointwise c→c, twice for sep convs.

    ``size`` is the op's output size: a stride-2 edge of a reduction cell runs its (first) depthwise
    conv at the output size too, so every edge of a cell counts the same.
    """
    k = int(op[-1])
    per_block = c * k * k * size * size + c * c * size * size
    return 2 * per_block if op.startswith("sep") else per_block


def test_searched_op_macs_by_hand():
    net = Network(channels=2, layers=3, seed=0)  # cells: normal (C=2, 32×32), reduce (4, 32→16), reduce (8, 16→8)
    macs = searched_op_macs(net)
    normal = np.array([[_op_macs(op, 2, 32) for op in SEARCHED_OPS] for _ in range(14)], dtype=float)
    reduce = np.array([[_op_macs(op, 4, 16) + _op_macs(op, 8, 8) for op in SEARCHED_OPS] for _ in range(14)],
                      dtype=float)
    np.testing.assert_array_equal(macs["normal"], normal)
    np.testing.assert_array_equal(macs["reduce"], reduce)


def _torch_energy(alphas, betas, macs, pj):
    a = torch.tensor(alphas, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(betas, dtype=torch.float64, requires_grad=True)
    p_op = torch.softmax(a, -1)[:, list(SEARCHED_COLUMNS)]
    p_mul = torch.softmax(b, -1)
    e = (p_op * torch.tensor(macs) * (p_mul * torch.tensor(pj)).sum(-1)).sum()
    e.backward()
    return e.item(), a.grad.numpy(), b.grad.numpy()


def _ours(alphas, betas, macs, pj, energy=expected_energy):
    a, b = Tensor(alphas, requires_grad=True), Tensor(betas, requires_grad=True)
    e = energy(a, b, macs, pj)
    e.backward()
    return e.item(), a.grad, b.grad


def _problem(seed=0, k=3):
    rng = np.random.default_rng(seed)
    alphas = rng.standard_normal((14, 8)).astype(np.float32)
    betas = rng.standard_normal((14, 4, k)).astype(np.float32)
    macs = rng.integers(1_000, 100_000, (14, 4)).astype(np.float64)
    pj = np.array([0.2, 0.15, 0.05])[:k]
    return alphas, betas, macs, pj


def _check_against_torch(energy) -> None:
    for seed in range(3):
        alphas, betas, macs, pj = _problem(seed)
        value, ga, gb = _ours(alphas, betas, macs, pj, energy)
        t_value, t_ga, t_gb = _torch_energy(alphas, betas, macs, pj)
        assert value == pytest.approx(t_value, rel=1e-5)
        for ours, ref in ((ga, t_ga), (gb, t_gb)):
            ours = np.zeros_like(ref) if ours is None else ours
            scale = np.abs(ref).max()
            np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5 * scale)


def test_expected_energy_and_gradients_match_torch():
    _check_against_torch(expected_energy)


def test_expected_energy_by_hand():
    alphas = np.zeros((14, 8), np.float32)  # p_op = 1/8 everywhere
    betas = np.zeros((14, 4, 2), np.float32)
    betas[:, :, 1] = np.log(3.0)  # p_mul = (1/4, 3/4)
    macs = np.ones((14, 4))
    pj = np.array([0.2, 0.1])
    value, _, _ = _ours(alphas, betas, macs, pj)
    assert value == pytest.approx(14 * 4 * (1 / 8) * (0.25 * 0.2 + 0.75 * 0.1), rel=1e-6)
    assert reference_energy(alphas, macs, 0.2) == pytest.approx(14 * 4 * (1 / 8) * 0.2, rel=1e-12)


def test_a_wrong_energy_gradient_is_caught():
    """Test the tester: β's probabilities left out of the gradient (a plausible slip) must fail the check."""
    def wrong(alphas, betas, macs, pj):
        from approxdarts_np.autodiff import functional as F
        p_op = F.getitem(F.softmax(alphas, axis=-1), (slice(None), np.array(SEARCHED_COLUMNS)))
        p_mul = Tensor(F.softmax(betas, axis=-1).data)  # detached: no gradient reaches β
        per_multiply = F.sum(p_mul * Tensor(pj.astype(np.float32)), axis=-1)
        return F.sum(p_op * Tensor(macs.astype(np.float32)) * per_multiply)

    with pytest.raises(AssertionError):
        _check_against_torch(wrong)


def test_straight_through_factors_are_one_forward_and_carry_the_softmax_gradient():
    rng = np.random.default_rng(4)
    betas = rng.standard_normal((14, 4, 3)).astype(np.float32)
    k_star, noise = gumbel_choice(betas, np.random.default_rng(9))
    k_again, noise_again = gumbel_choice(betas, np.random.default_rng(9))
    np.testing.assert_array_equal(k_star, k_again)
    np.testing.assert_array_equal(noise, noise_again)
    np.testing.assert_array_equal(k_star, np.argmax(betas + noise, axis=-1))
    b = Tensor(betas, requires_grad=True)
    s = straight_through_factors(b, k_star, noise, temperature=0.5)
    assert np.array_equal(s.data, np.ones((14, 4), np.float32))
    upstream = rng.standard_normal((14, 4)).astype(np.float32)
    (s * Tensor(upstream)).sum().backward()
    tb = torch.tensor(betas, dtype=torch.float64, requires_grad=True)
    y = torch.softmax((tb + torch.tensor(noise, dtype=torch.float64)) / 0.5, -1)
    picked = torch.gather(y, -1, torch.tensor(k_star)[..., None])[..., 0]
    (picked * torch.tensor(upstream, dtype=torch.float64)).sum().backward()
    np.testing.assert_allclose(b.grad, tb.grad.numpy(), rtol=1e-4, atol=1e-6)
