"""The second-order (unrolled) architecture gradient against a torch mirror in float64.

The mirror (tests/torch_reference.py) runs the same supernet on the same weights.
Here it computes, with torch autograd in float64:

* the *same* finite difference as DARTS: w' by autograd, u = ∇w' L_val(w', α),
  ε = r/‖u‖, ∇α L_train at w ± εu; and
* the *exact* unrolled gradient dL_val(w'(α), α)/dα, differentiating through
  the virtual step (double backward), whose Hessian term is the exact
  ∇²αw L_train(w, α)·u.

Tolerances. Our passes run in float32, the reference in float64. The direct
term ∇α L_val(w', α) is a small result of long sums that cancel: measured
4e-5–6e-5 of its largest entry; bound 1e-3 of it. The Hessian term is a
difference of two float32 gradients at w ± εu divided by 2ε, and εu is only
1e-5–1e-4 of the weights it is added to, so the rounding of w ± εu alone tilts
the direction by up to ~1e-3 per element: measured 2e-5–1e-4 of max|HVP| at
DARTS's r = 0.01; bound ξ · 1e-3 · (0.01/r) · max|HVP|, the factor 0.01/r
because that rounding error is divided by ε ∝ r. The two sides share no
arithmetic, so a wrong formula (sign, ξ, momentum, weight decay, ε) falls far
outside these bounds (see the test-the-tester below).

Why the exact comparison uses a smaller r than DARTS's 0.01. ∇α L_train is
discontinuous in w: a ReLU (or a max-pool winner) that flips between w − εu
and w + εu switches a path of the α gradient on or off. Along w + t·u/‖u‖ on
this net the α gradient jumps by 10–200 times what the smooth Hessian
predicts per 5e-4 of t, so at r = 0.01 the finite difference averages over
such flips and differs from the autograd product by several times its size
(ours and torch's finite differences still agree to 3e-6). At r = 1e-3 no unit
flips for this seed and the difference converges to the exact product; below
that float32 rounding (∝ 1/r) takes over. The DARTS-size difference is checked
against the same difference in torch.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

from approxdarts_np.approx.arithmetic import arithmetic_from_spec
from approxdarts_np.autodiff import Tensor
from approxdarts_np.autodiff import functional as F
from approxdarts_np.nas.model_search import NUM_EDGES, Network
from approxdarts_np.nas.operations import PRIMITIVES
from approxdarts_np.nn import SGD, Adam, BatchNorm2d
from approxdarts_np.runs import unrolled
from approxdarts_np.runs.unrolled import DARTS_PERTURBATION, unrolled_architecture_step
from torch_reference import TorchMirror, recording_codes

torch.set_num_threads(2)

C, LAYERS, BATCH, SIZE = 2, 3, 2, 8
XI = 0.1  # larger than DARTS's 0.025 so that the Hessian term is a visible part of dα
MOMENTUM = 0.9
WEIGHT_DECAY = 0.03  # 100× DARTS's 3e-4, so that leaving λ·w out of the virtual step shows at these tolerances


def _batch(seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((BATCH, 3, SIZE, SIZE)).astype(np.float32), rng.integers(0, 10, size=BATCH)


TRAIN, VAL = _batch(1), _batch(2)


def _setup(multiplier=None, warm_momentum=True, weight_decay=WEIGHT_DECAY):
    """Supernet with spread-out α, its two optimizers, and (optionally) momentum buffers from one real step."""
    net = Network(C, 10, LAYERS, seed=0, arithmetic=arithmetic_from_spec(multiplier))
    rng = np.random.default_rng(100)
    net.alphas_normal.data[...] = rng.standard_normal((NUM_EDGES, len(PRIMITIVES)))
    net.alphas_reduce.data[...] = rng.standard_normal((NUM_EDGES, len(PRIMITIVES)))
    a_opt = Adam(net.arch_parameters(), lr=3e-4, betas=(0.5, 0.999), weight_decay=1e-3)
    w_opt = SGD(net.weights(), lr=0.025, momentum=MOMENTUM, weight_decay=weight_decay)
    if warm_momentum:
        for a in net.arch_parameters():
            a.requires_grad = False
        F.cross_entropy(net(Tensor(_batch(50)[0])), _batch(50)[1]).backward()
        for a in net.arch_parameters():
            a.requires_grad = True
        w_opt.step()
        w_opt.zero_grad()
    return net, a_opt, w_opt


# ------------------------------------------------------------------ the torch reference


def _mirror64(net, codes=None):
    m = TorchMirror(net)
    m.leaf = {k: v.detach().double().requires_grad_(True) for k, v in m.leaf.items()}
    m.buffers = {k: (a.double(), b.double()) for k, (a, b) in m.buffers.items()}
    m.codes = codes
    return m


def _loss(m, net, batch):
    return TF.cross_entropy(m.run(net, torch.tensor(batch[0]).double()), torch.tensor(batch[1]))


def torch_unrolled(net, w_opt, xi, perturbation, exact=False, codes=None):
    """DARTS's unrolled α gradient in float64 torch, with the finite difference and (``exact``) without.

    Passes run in the order ours do (train at w, val at w', train at w⁺, train at w⁻) so that
    recorded 8-bit codes replay in step; the exact total adds one val pass after the train pass.
    """
    m = _mirror64(net, codes)
    weights, alphas = net.weights(), net.arch_parameters()
    tw, ta = [m.p(p) for p in weights], [m.p(a) for a in alphas]
    grads = torch.autograd.grad(_loss(m, net, TRAIN), tw + ta, create_graph=exact)
    g_w, g_alpha = grads[:len(tw)], grads[len(tw):]
    index = {id(p): i for i, p in enumerate(w_opt.params)}
    w_prime = []
    for p, t, g in zip(weights, tw, g_w):
        buf = w_opt.state[index[id(p)]].get("momentum_buffer")
        v = torch.zeros_like(t) if buf is None else torch.tensor(buf).double()
        w_prime.append(t - xi * (w_opt.momentum * v + g + w_opt.weight_decay * t))
    out = {"g_alpha_train": [g.detach().numpy() for g in g_alpha]}
    if exact:
        for p, t in zip(weights, w_prime):
            m.leaf[id(p)] = t
        out["total"] = [g.numpy() for g in torch.autograd.grad(_loss(m, net, VAL), ta, retain_graph=True)]
    w_prime = [t.detach().requires_grad_(True) for t in w_prime]
    for p, t in zip(weights, w_prime):
        m.leaf[id(p)] = t
    val_loss = _loss(m, net, VAL)
    grads = torch.autograd.grad(val_loss, w_prime + ta)
    u, direct = grads[:len(tw)], grads[len(tw):]
    norm = math.sqrt(sum(float((g * g).sum()) for g in u))
    eps = perturbation / norm
    sides = []
    for sign in (1.0, -1.0):
        for p, t, g in zip(weights, tw, u):
            m.leaf[id(p)] = t.detach() + sign * eps * g
        sides.append(torch.autograd.grad(_loss(m, net, TRAIN), ta))
    out["fd_hvp"] = [((gp - gm) / (2 * eps)).numpy() for gp, gm in zip(*sides)]
    out["direct"] = [g.numpy() for g in direct]
    out["fd_total"] = [d - xi * h for d, h in zip(out["direct"], out["fd_hvp"])]
    out.update(val_loss=val_loss.item(), u_norm=norm, perturbation=perturbation, xi=xi)
    if exact:
        dot = sum((g * t.detach()).sum() for g, t in zip(g_w, u))
        out["exact_hvp"] = [g.numpy() for g in torch.autograd.grad(dot, ta)]
    return out


def _tolerance(ref, perturbation=None, hvp_key="fd_hvp") -> float:
    """Rounding bound of the direct term plus that of the Hessian term at ε·‖u‖ = perturbation (module doc)."""
    r = ref["perturbation"] if perturbation is None else perturbation
    direct = max(float(np.abs(d).max()) for d in ref["direct"])
    hvp = max(float(np.abs(h).max()) for h in ref[hvp_key])
    return 1e-3 * direct + ref["xi"] * 1e-3 * (DARTS_PERTURBATION / r) * hvp


def assert_alpha_gradient_close(ours, theirs, tol, what):
    for name, o, t in zip(("alphas_normal", "alphas_reduce"), ours, theirs):
        err = float(np.abs(o - t).max())
        assert err <= tol, f"{what} {name}: max error {err:.3g} > {tol:.3g}"


def _step(net, a_opt, w_opt, xi=XI, perturbation=DARTS_PERTURBATION):
    loss, correct = unrolled_architecture_step(net, a_opt, w_opt, TRAIN, VAL, xi, perturbation=perturbation)
    return loss, correct, [a.grad.copy() for a in net.arch_parameters()]


# ------------------------------------------------------------------ float32 supernet


@pytest.fixture(scope="module")
def darts_reference():
    net, _, w_opt = _setup()
    return torch_unrolled(net, w_opt, XI, DARTS_PERTURBATION)


@pytest.mark.parametrize("warm_momentum", [True, False], ids=["momentum", "no-buffer-yet"])
def test_same_finite_difference_as_torch(warm_momentum, darts_reference):
    net, a_opt, w_opt = _setup(warm_momentum=warm_momentum)
    ref = darts_reference if warm_momentum else torch_unrolled(net, w_opt, XI, DARTS_PERTURBATION)
    loss, correct, d_alpha = _step(net, a_opt, w_opt)
    assert loss == pytest.approx(ref["val_loss"], rel=1e-5)
    assert 0 <= correct <= BATCH
    # The Hessian term must matter at this tolerance, or the check could not see it.
    assert XI * max(float(np.abs(h).max()) for h in ref["fd_hvp"]) > 20 * _tolerance(ref)
    assert_alpha_gradient_close(d_alpha, ref["fd_total"], _tolerance(ref), "dα")


@pytest.mark.slow
def test_converges_to_the_exact_unrolled_gradient():
    """At r = 1e-3 and 3e-4 our finite difference meets torch's double backward within rounding."""
    net, _, w_opt = _setup()
    ref = torch_unrolled(net, w_opt, XI, DARTS_PERTURBATION, exact=True)
    # The reference's own chain rule: total = direct − ξ·(exact Hessian-vector product).
    for t, d, h in zip(ref["total"], ref["direct"], ref["exact_hvp"]):
        np.testing.assert_allclose(t, d - XI * h, rtol=0, atol=1e-12)
    for r in (1e-3, 3e-4):
        net, a_opt, w_opt = _setup()
        _, _, d_alpha = _step(net, a_opt, w_opt, perturbation=r)
        assert_alpha_gradient_close(d_alpha, ref["total"], _tolerance(ref, r, "exact_hvp"), f"r={r}")


def test_mixed_partials_agree_in_our_own_arithmetic():
    """⟨a, ∇²αw L·u⟩ by our w-difference of ∇α L equals the α-difference of ⟨u, ∇w L⟩ (no torch).

    u is the unit direction of the val-loss weight gradient, a a random unit α direction, both
    steps 1e-3. The α-side quotient divides the rounding of a float32 sum over all weights by
    2e-3: measured 1.6 % apart; bound 5 %.
    """
    net, _, _ = _setup()
    weights, alphas = net.weights(), net.arch_parameters()
    w0, alpha0 = [p.data.copy() for p in weights], [a.data.copy() for a in alphas]
    unrolled._forward_backward(net, *VAL, wanted=weights, frozen=alphas)
    u = _unit([p.grad for p in weights])
    a_dir = _unit([np.random.default_rng(7).standard_normal(a.shape) for a in alphas])
    r = 1e-3
    hvp = unrolled._alpha_hessian_vector_product(net, TRAIN, u, w0, r)
    for p, w in zip(weights, w0):
        p.data[...] = w
    lhs = _dot(a_dir, hvp)
    sides = []
    for sign in (1.0, -1.0):
        for a, a0, d in zip(alphas, alpha0, a_dir):
            a.data[...] = a0 + np.float32(sign * r) * d
        unrolled._forward_backward(net, *TRAIN, wanted=weights, frozen=alphas)
        sides.append(_dot(u, [p.grad for p in weights]))
    rhs = (sides[0] - sides[1]) / (2 * r)
    assert abs(lhs) > 1e-4
    assert lhs == pytest.approx(rhs, rel=5e-2)
    assert -lhs != pytest.approx(rhs, rel=5e-2)  # the bound separates a wrong sign


def _unit(arrays):
    norm = math.sqrt(_dot(arrays, arrays))
    return [(np.asarray(x, np.float64) / norm).astype(np.float32) for x in arrays]


def _dot(xs, ys) -> float:
    return sum(float(np.dot(np.ravel(x).astype(np.float64), np.ravel(y).astype(np.float64))) for x, y in zip(xs, ys))


# ------------------------------------------------------------------ test the tester


def _negated(f):
    return lambda *a, **k: [-h for h in f(*a, **k)]


def _scaled(f, s):
    return lambda *a, **k: [np.float32(s) * h for h in f(*a, **k)]


def _zeroed(f):
    return lambda *a, **k: [np.zeros_like(h) for h in f(*a, **k)]


class _Without:
    """The w optimizer as the virtual step would see it with one term dropped."""

    def __init__(self, opt, term):
        self.params, self.state, self.nesterov = opt.params, opt.state, False
        self.momentum = 0.0 if term == "momentum" else opt.momentum
        self.weight_decay = 0.0 if term == "weight_decay" else opt.weight_decay


WRONG = {
    "hessian-sign": lambda mp: mp.setattr(unrolled, "_alpha_hessian_vector_product",
                                          _negated(unrolled._alpha_hessian_vector_product)),
    "missing-xi": lambda mp: mp.setattr(unrolled, "_alpha_hessian_vector_product",
                                        _scaled(unrolled._alpha_hessian_vector_product, 1 / XI)),
    "half-epsilon-scale": lambda mp: mp.setattr(unrolled, "_alpha_hessian_vector_product",
                                                _scaled(unrolled._alpha_hessian_vector_product, 0.5)),
    "first-order": lambda mp: mp.setattr(unrolled, "_alpha_hessian_vector_product",
                                         _zeroed(unrolled._alpha_hessian_vector_product)),
}


@pytest.mark.parametrize("mutation", list(WRONG) + ["no-momentum", "no-weight-decay", "no-virtual-step"])
def test_a_wrong_unrolled_gradient_is_caught(mutation, monkeypatch, darts_reference):
    net, a_opt, w_opt = _setup()
    xi = XI
    if mutation in WRONG:
        WRONG[mutation](monkeypatch)
    elif mutation == "no-virtual-step":
        xi = 0.0
    else:
        w_opt = _Without(w_opt, mutation[3:].replace("-", "_"))
    _, _, d_alpha = _step(net, a_opt, w_opt, xi=xi)
    with pytest.raises(AssertionError):
        assert_alpha_gradient_close(d_alpha, darts_reference["fd_total"], _tolerance(darts_reference), "dα")


# ------------------------------------------------------------------ what the step leaves alone


def _bn_buffers(net):
    return [b.copy() for _, b in net.named_buffers()]


@pytest.mark.parametrize("multiplier", [None, "exact"], ids=["float", "exact-8bit"])
def test_step_changes_alpha_only(multiplier):
    net, a_opt, w_opt = _setup(multiplier)
    weights = net.weights()
    marker = np.full(weights[0].shape, 7.0, np.float32)
    weights[0].grad = marker  # a stale weight gradient must come back as it was
    w_before = [p.data.copy() for p in weights]
    grads_before = [p.grad for p in weights]
    opt_before = w_opt.state_dict()
    bn_before = _bn_buffers(net)
    alpha_before = [a.data.copy() for a in net.arch_parameters()]

    loss, _ = unrolled_architecture_step(net, a_opt, w_opt, TRAIN, VAL, XI)

    assert math.isfinite(loss)
    for p, w, g in zip(weights, w_before, grads_before):
        assert np.array_equal(p.data, w)
        assert p.grad is g
        assert p.requires_grad
    opt_after = w_opt.state_dict()
    assert opt_after["steps"] == opt_before["steps"] and opt_after["lr"] == opt_before["lr"]
    for s0, s1 in zip(opt_before["state"], opt_after["state"]):
        assert s0.keys() == s1.keys()
        assert all(np.array_equal(s0[k], s1[k]) for k in s0)
    for b0, b1 in zip(bn_before, _bn_buffers(net)):
        assert np.array_equal(b0, b1)
    for a, a0 in zip(net.arch_parameters(), alpha_before):
        assert a.requires_grad
        assert not np.array_equal(a.data, a0)
    assert a_opt.steps == 1
    # The restore is not vacuous: a train-mode forward does move the running statistics.
    net(Tensor(TRAIN[0]))
    assert any(not np.array_equal(b0, b1) for b0, b1 in zip(bn_before, _bn_buffers(net)))
    assert any(isinstance(m, BatchNorm2d) for m in net.modules())


def test_a_non_finite_loss_leaves_alpha_alone():
    net, a_opt, w_opt = _setup()
    alpha_before = [a.data.copy() for a in net.arch_parameters()]
    w_before = [p.data.copy() for p in net.weights()]
    bad = (np.full_like(TRAIN[0], np.inf), TRAIN[1])
    loss, _ = unrolled_architecture_step(net, a_opt, w_opt, bad, VAL, XI)
    assert not math.isfinite(loss)
    assert a_opt.steps == 0
    for a, a0 in zip(net.arch_parameters(), alpha_before):
        assert np.array_equal(a.data, a0)
    for p, w in zip(net.weights(), w_before):
        assert np.array_equal(p.data, w)


# ------------------------------------------------------------------ 8-bit (exact table, STE)


@pytest.mark.slow
def test_exact_multiplier_same_finite_difference_as_torch():
    """With the exact 8-bit multiplier every pass quantises; torch replays our codes on de-quantised operands.

    The exact (double-backward) product is not a reference here: a straight-through gradient is not
    the derivative of the quantised forward, whose weight codes are piecewise constant in w.
    """
    # DARTS's weight decay here: the mirror asserts that its quantisation scales agree with ours to
    # 1e-5, which the larger virtual step of WEIGHT_DECAY brought to 1.2e-5 in one layer.
    net, a_opt, w_opt = _setup("exact", weight_decay=3e-4)
    alpha_before = [a.data.copy() for a in net.arch_parameters()]
    with recording_codes() as codes:
        _, _, d_alpha = _step(net, a_opt, w_opt)
    for a, a0 in zip(net.arch_parameters(), alpha_before):
        a.data[...] = a0  # the reference starts from α before the step (the weights are unchanged)
    ref = torch_unrolled(net, w_opt, XI, DARTS_PERTURBATION, codes=codes)
    assert_alpha_gradient_close(d_alpha, ref["fd_total"], _tolerance(ref), "dα (exact 8 bit)")
