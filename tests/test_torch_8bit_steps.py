"""One search step and one train step in 8-bit modes against the torch mirror.

The mirror quantises with its own code and runs each searched convolution on the de-quantised
operands: ``exact`` as torch's float conv of the de-quantised tensors (so ours, an integer
conv scaled once, equals it up to float rounding), ``mul8u_2P7`` as a custom torch op whose
forward is the plain NumPy table gather and whose backward is the straight-through estimator.
Logits, loss, every gradient and every updated parameter are compared.

Quantisation is discontinuous: an activation within float rounding of a rounding tie can take
the neighbouring code, and through the following batch statistics one such flip moves the logits
by ~1e-2. So the mirror quantises every operand itself, checks that our codes agree (scales to
1e-5, codes within one step in at most 0.1 % of the entries), and then computes on our codes
(``recording_codes``). Tolerances are then those of test_supernet.py: logits and loss rtol 1e-4,
gradients 2e-4 + 2e-3 x the tensor's largest entry, updated parameters 1e-5 absolute.
Test the tester: a wrong table behind our layers (the mirror keeps the right one) fails.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as TF

from approxdarts_np.approx.arithmetic import arithmetic_from_spec
from approxdarts_np.approx.convolution import QuantizedArithmetic
from approxdarts_np.approx.multipliers import Multiplier, load_multiplier
from approxdarts_np.autodiff import Tensor
from approxdarts_np.nas.genotypes import Genotype
from approxdarts_np.nas.model_eval import NetworkCIFAR
from approxdarts_np.nas.model_search import NUM_EDGES, Network
from approxdarts_np.nas.operations import PRIMITIVES, searched_convs
from approxdarts_np.nn import SGD, Adam
from approxdarts_np.runs.search import architecture_step, weight_step
from approxdarts_np.runs.train import Trainer
from torch_reference import TorchMirror, recording_codes

torch.set_num_threads(2)

C, LAYERS, BATCH, SIZE = 4, 3, 4, 12
MODES = ["exact", "mul8u_2P7"]

GENOTYPE = Genotype(
    normal=(("sep_conv_3x3", 0), ("dil_conv_3x3", 1), ("sep_conv_5x5", 1), ("skip_connect", 0),
            ("dil_conv_5x5", 2), ("avg_pool_3x3", 1), ("sep_conv_3x3", 3), ("max_pool_3x3", 0)),
    normal_concat=(2, 3, 4, 5),
    reduce=(("sep_conv_3x3", 0), ("max_pool_3x3", 1), ("dil_conv_3x3", 2), ("skip_connect", 1),
            ("sep_conv_5x5", 0), ("skip_connect", 2), ("dil_conv_5x5", 4), ("avg_pool_3x3", 1)),
    reduce_concat=(2, 3, 4, 5),
)


def _batch(seed, size=SIZE):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((BATCH, 3, size, size)).astype(np.float32), rng.integers(0, 10, size=BATCH)


def _close(ours, theirs, name):
    scale = max(float(np.abs(theirs).max()), 1e-6)
    err = float(np.abs(ours - theirs).max())
    assert err <= 2e-4 + 2e-3 * scale, f"{name}: max error {err:.3g} (scale {scale:.3g})"


def _supernet(mode, seed=3):
    net = Network(C, 10, LAYERS, arithmetic=arithmetic_from_spec(mode), seed=seed)
    rng = np.random.default_rng(seed + 100)
    net.alphas_normal.data[...] = rng.standard_normal((NUM_EDGES, len(PRIMITIVES)))
    net.alphas_reduce.data[...] = rng.standard_normal((NUM_EDGES, len(PRIMITIVES)))
    return net


def _capture_grads(model):
    return {id(p): (None if p.grad is None else p.grad.copy()) for p in model.parameters()}


@pytest.mark.slow  # 11-15 s on a quiet 2-core machine, 1-3 min on a loaded one: 2,000 quantised convs
@pytest.mark.parametrize("mode", MODES)
def test_search_step_in_8bit_mode_matches_torch(mode):
    net = _supernet(mode)
    assert all(conv.arithmetic is not None for conv in searched_convs(net))
    mirror = TorchMirror(net)
    names = {id(p): n for n, p in net.named_parameters()}
    xa, ya = _batch(10)  # architecture-val batch
    xw, yw = _batch(11)  # weight-train batch

    # ours: the run's own step functions; gradients read after each step, before the next zeroes them
    a_opt = Adam(net.arch_parameters(), lr=3e-4, betas=(0.5, 0.999), weight_decay=1e-3)
    w_opt = SGD(net.weights(), lr=0.025, momentum=0.9, weight_decay=3e-4)
    before = {id(p): p.data.copy() for p in net.parameters()}
    with recording_codes() as codes:
        logits = net(Tensor(xa)).data  # the logits the architecture step starts from
        a_loss, _ = architecture_step(net, a_opt, xa, ya)
        a_grads = _capture_grads(net)
        w_loss, _ = weight_step(net, w_opt, xw, yw, grad_clip=5.0)
        w_grads = _capture_grads(net)
    mirror.codes = codes

    # torch: the same two steps on the mirror
    t_arch = [mirror.p(p) for p in net.arch_parameters()]
    t_w = [mirror.p(p) for p in net.weights()]
    t_a_opt = torch.optim.Adam(t_arch, lr=3e-4, betas=(0.5, 0.999), weight_decay=1e-3)
    t_w_opt = torch.optim.SGD(t_w, lr=0.025, momentum=0.9, weight_decay=3e-4)
    with torch.no_grad():
        t_logits = mirror.run(net, torch.tensor(xa))
    np.testing.assert_allclose(logits, t_logits.numpy(), rtol=1e-4, atol=1e-5)
    t_a_loss = TF.cross_entropy(mirror.run(net, torch.tensor(xa)), torch.tensor(ya))
    t_a_loss.backward()
    assert len(mirror.quantised_calls) == 2 * sum(1 for _ in searched_convs(net)) > 0  # all searched convs 8 bit
    for p in net.arch_parameters():
        _close(a_grads[id(p)], mirror.grad(p), "architecture step: " + names[id(p)])
    for t in t_w:
        t.grad = None  # first order: the architecture step leaves w alone
    t_a_opt.step()
    t_w_loss = TF.cross_entropy(mirror.run(net, torch.tensor(xw)), torch.tensor(yw))
    t_w_opt.zero_grad()
    for t in t_arch:
        t.grad = None
    t_w_loss.backward()
    torch.nn.utils.clip_grad_norm_(t_w, 5.0)  # ours were read after the step's clipping too
    for p in net.weights():
        _close(w_grads[id(p)], mirror.grad(p), "weight step: " + names[id(p)])
    t_w_opt.step()

    assert a_loss == pytest.approx(t_a_loss.item(), rel=1e-5)
    assert w_loss == pytest.approx(t_w_loss.item(), rel=1e-5)
    for p in net.parameters():
        np.testing.assert_allclose(p.data, mirror.p(p).detach().numpy(), rtol=0, atol=1e-5,
                                   err_msg=names[id(p)])
    # the steps did something: α moved by Adam's ~lr, the weights by SGD's
    for group in (net.arch_parameters(), net.weights()):
        assert max(float(np.abs(p.data - before[id(p)]).max()) for p in group) > 1e-4
    assert not any(codes.values())  # every call of ours was mirrored


class _TrainSettings:
    """What Trainer.train_step reads from its run: config, model, optimizer."""

    def __init__(self, model, optimizer):
        self.config = type("Config", (), {"seed": 0, "auxiliary_weight": 0.4, "grad_clip": 5.0})()
        self.model, self.optimizer = model, optimizer


@pytest.mark.parametrize("mode", MODES)
def test_train_step_in_8bit_mode_matches_torch(mode):
    net = NetworkCIFAR(GENOTYPE, channels=C, layers=LAYERS, auxiliary=True,
                       arithmetic=arithmetic_from_spec(mode), seed=1)
    net.drop_path_prob = 0.0
    net.train()
    mirror = TorchMirror(net)
    names = {id(p): n for n, p in net.named_parameters()}
    x, y = _batch(12, size=32)  # the auxiliary head needs the 8x8 map of a 32x32 image
    opt = SGD(net.parameters(), lr=0.025, momentum=0.9, weight_decay=3e-4)
    with recording_codes() as codes:
        logits, aux = net(Tensor(x))  # the logits the step starts from
        loss, _ = Trainer.train_step(_TrainSettings(net, opt), x, y, 0, 0)
        grads = _capture_grads(net)
    mirror.codes = codes

    t_params = [mirror.p(p) for p in net.parameters()]
    t_opt = torch.optim.SGD(t_params, lr=0.025, momentum=0.9, weight_decay=3e-4)
    with torch.no_grad():
        t_logits, t_aux = mirror.run(net, torch.tensor(x))
    np.testing.assert_allclose(logits.data, t_logits.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(aux.data, t_aux.numpy(), rtol=1e-4, atol=1e-5)
    t_logits, t_aux = mirror.run(net, torch.tensor(x))
    assert len(mirror.quantised_calls) == 2 * sum(1 for _ in searched_convs(net)) > 0
    t_loss = TF.cross_entropy(t_logits, torch.tensor(y)) + 0.4 * TF.cross_entropy(t_aux, torch.tensor(y))
    t_loss.backward()
    assert loss == pytest.approx(t_loss.item(), rel=1e-5)
    torch.nn.utils.clip_grad_norm_(t_params, 5.0)  # ours were read after the step's clipping too
    for p in net.parameters():
        _close(grads[id(p)], mirror.grad(p), names[id(p)])
    t_opt.step()
    for p in net.parameters():
        np.testing.assert_allclose(p.data, mirror.p(p).detach().numpy(), rtol=0, atol=1e-5,
                                   err_msg=names[id(p)])
    assert not any(codes.values())


def _forward_against_mirror(arithmetic, x):
    net = NetworkCIFAR(GENOTYPE, channels=C, layers=LAYERS, auxiliary=False, arithmetic=arithmetic, seed=1)
    net.eval()
    mirror = TorchMirror(net)
    with recording_codes() as codes:
        logits, _ = net(Tensor(x))
    mirror.codes = codes
    with torch.no_grad():
        t_logits, _ = mirror.run(net, torch.tensor(x))
    np.testing.assert_allclose(logits.data, t_logits.numpy(), rtol=1e-4, atol=1e-5)


def test_the_tester_a_wrong_table_behind_our_layers_is_caught():
    """Our layers compute through a table with the diagonal off by 40 while their multiplier still
    reads as mul8u_2P7 (the mirror uses that): the comparison must fail (at the latest at the
    logits; here already where the next layer's codes part ways), and pass with the right table."""
    x, _ = _batch(12, size=32)
    right = load_multiplier("mul8u_2P7")
    _forward_against_mirror(QuantizedArithmetic(right), x)
    wrong_table = right.table.copy()
    wrong_table[np.arange(256), np.arange(256)] += 40
    broken = QuantizedArithmetic(Multiplier("wrong_2P7", wrong_table, "test"))
    broken.multiplier = right
    with pytest.raises(AssertionError):
        _forward_against_mirror(broken, x)
