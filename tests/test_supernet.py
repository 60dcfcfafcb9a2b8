"""The DARTS supernet against a torch re-implementation on the same weights (tiny configuration).

Tolerances (float32, different summation orders through ~40 layers):
logits and loss rtol=1e-4 / atol=1e-5; gradients atol=2e-4 + rtol=2e-3 relative
to each tensor's largest entry; parameters after a complete first-order step
within 1e-5 absolute.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as TF

from approxdarts_np.autodiff import Tensor
from approxdarts_np.autodiff import functional as F
from approxdarts_np.nas.genotypes import Genotype, derive_genotype
from approxdarts_np.nas.model_search import NUM_EDGES, Network
from approxdarts_np.nas.operations import PRIMITIVES
from approxdarts_np.runs.search import architecture_step, weight_step
from approxdarts_np.nn import SGD, Adam
from torch_reference import TorchMirror

torch.set_num_threads(2)

C, LAYERS, BATCH, SIZE = 4, 5, 4, 16


def _batch(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((BATCH, 3, SIZE, SIZE)).astype(np.float32)
    y = rng.integers(0, 10, size=BATCH)
    return x, y


def _net(seed=0):
    net = Network(C, 10, LAYERS, seed=seed)
    # Larger α than the 1e-3 initialisation so that the α gradients are not dominated by rounding.
    rng = np.random.default_rng(seed + 100)
    net.alphas_normal.data[...] = rng.standard_normal((NUM_EDGES, len(PRIMITIVES)))
    net.alphas_reduce.data[...] = rng.standard_normal((NUM_EDGES, len(PRIMITIVES)))
    return net


def _close_grad(ours, theirs, name):
    scale = max(float(np.abs(theirs).max()), 1e-6)
    err = float(np.abs(ours - theirs).max())
    assert err <= 2e-4 + 2e-3 * scale, f"{name}: max error {err:.3g} (scale {scale:.3g})"


def test_supernet_forward_and_gradients_match_torch():
    net = _net()
    mirror = TorchMirror(net)
    x, y = _batch(1)
    logits = net(Tensor(x))
    loss = F.cross_entropy(logits, y)
    loss.backward()
    t_logits = mirror.run(net, torch.tensor(x))
    t_loss = TF.cross_entropy(t_logits, torch.tensor(y))
    t_loss.backward()
    np.testing.assert_allclose(logits.data, t_logits.detach().numpy(), rtol=1e-4, atol=1e-5)
    assert loss.item() == pytest.approx(t_loss.item(), rel=1e-5)
    names = {id(p): n for n, p in net.named_parameters()}
    for p in net.parameters():
        _close_grad(p.grad, mirror.grad(p), names[id(p)])
    # Running statistics follow torch's update (momentum 0.1, unbiased variance).
    from approxdarts_np.nn import BatchNorm2d
    for m in net.modules():
        if isinstance(m, BatchNorm2d):
            rm, rv = mirror.buffers[id(m)]
            np.testing.assert_allclose(m._buffers["running_mean"], rm.numpy(), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(m._buffers["running_var"], rv.numpy(), rtol=1e-4, atol=1e-5)


def test_one_first_order_search_step_matches_torch():
    net = _net(3)
    mirror = TorchMirror(net)
    xa, ya = _batch(10)  # architecture-val batch
    xw, yw = _batch(11)  # weight-train batch
    a_opt = Adam(net.arch_parameters(), lr=3e-4, betas=(0.5, 0.999), weight_decay=1e-3)
    w_opt = SGD(net.weights(), lr=0.025, momentum=0.9, weight_decay=3e-4)
    architecture_step(net, a_opt, xa, ya)
    weight_step(net, w_opt, xw, yw, grad_clip=5.0)

    t_arch = [mirror.p(p) for p in net.arch_parameters()]
    t_w = [mirror.p(p) for p in net.weights()]
    t_a_opt = torch.optim.Adam(t_arch, lr=3e-4, betas=(0.5, 0.999), weight_decay=1e-3)
    t_w_opt = torch.optim.SGD(t_w, lr=0.025, momentum=0.9, weight_decay=3e-4)
    # architecture step (first order: gradient of the val loss at the current w)
    t_a_opt.zero_grad()
    TF.cross_entropy(mirror.run(net, torch.tensor(xa)), torch.tensor(ya)).backward()
    t_a_opt.step()
    # weight step
    t_w_opt.zero_grad()
    for t in t_w:
        t.grad = None
    TF.cross_entropy(mirror.run(net, torch.tensor(xw)), torch.tensor(yw)).backward()
    torch.nn.utils.clip_grad_norm_(t_w, 5.0)
    t_w_opt.step()

    names = {id(p): n for n, p in net.named_parameters()}
    for p in net.parameters():
        np.testing.assert_allclose(p.data, mirror.p(p).detach().numpy(), rtol=0, atol=1e-5,
                                   err_msg=names[id(p)])


def test_reference_catches_a_wrong_alpha_gradient():
    net = _net()
    mirror = TorchMirror(net)
    x, y = _batch(1)
    F.cross_entropy(net(Tensor(x)), y).backward()
    TF.cross_entropy(mirror.run(net, torch.tensor(x)), torch.tensor(y)).backward()
    wrong = net.alphas_normal.grad.copy()
    wrong[3, 4] += 1e-2
    with pytest.raises(AssertionError):
        _close_grad(wrong, mirror.grad(net.alphas_normal), "alphas_normal")


def test_arch_parameters_and_weights_partition_the_parameters():
    net = Network(C, 10, LAYERS, seed=0)
    arch = net.arch_parameters()
    assert [a.shape for a in arch] == [(14, 8), (14, 8)]
    ids = {id(p) for p in net.weights()}
    assert not ids & {id(a) for a in arch}
    assert len(ids) + 2 == len(net.parameters())


# ------------------------------------------------------------------ genotype


def _alpha_for(choices):
    """Softmax-ed weights where edge e has op k with weight w (others small)."""
    w = np.full((NUM_EDGES, len(PRIMITIVES)), 0.01)
    for e, k, v in choices:
        w[e, k] = v
    return w


def test_genotype_picks_two_strongest_non_none_edges_per_node():
    idx = PRIMITIVES.index
    w = _alpha_for([
        (0, idx("sep_conv_3x3"), 0.5), (1, idx("none"), 0.9), (1, idx("max_pool_3x3"), 0.2),   # node 0
        (2, idx("dil_conv_5x5"), 0.3), (3, idx("skip_connect"), 0.4), (4, idx("avg_pool_3x3"), 0.6),  # node 1
        (5, idx("sep_conv_5x5"), 0.7), (8, idx("dil_conv_3x3"), 0.8),                      # node 2
        (13, idx("skip_connect"), 0.9), (9, idx("sep_conv_3x3"), 0.85),                    # node 3
    ])
    g = derive_genotype(w, w)
    assert g.normal == (("sep_conv_3x3", 0), ("max_pool_3x3", 1),
                        ("avg_pool_3x3", 2), ("skip_connect", 1),
                        ("dil_conv_3x3", 3), ("sep_conv_5x5", 0),
                        ("skip_connect", 4), ("sep_conv_3x3", 0))
    assert g.normal_concat == (2, 3, 4, 5)


def test_genotype_string_and_json_round_trip():
    g = derive_genotype(np.random.default_rng(0).random((14, 8)), np.random.default_rng(1).random((14, 8)))
    assert Genotype.from_darts_string(g.to_darts_string()) == g
    assert Genotype.from_dict(g.to_dict()) == g
    assert g.to_darts_string().startswith("Genotype(normal=[('")
    assert "normal_concat=range(2, 6)" in g.to_darts_string()
