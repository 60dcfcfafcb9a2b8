"""The evaluation network built from a genotype, against the torch mirror; MAC counts; sizes.

Tolerances as in test_supernet.py.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as TF

from approxdarts_np.autodiff import Tensor
from approxdarts_np.autodiff import functional as F
from approxdarts_np.nas.costs import network_costs
from approxdarts_np.nas.genotypes import DARTS_V2, Genotype
from approxdarts_np.nas.model_eval import NetworkCIFAR
from torch_reference import TorchMirror

torch.set_num_threads(2)

MIXED = Genotype(
    normal=(("sep_conv_5x5", 0), ("dil_conv_3x3", 1), ("avg_pool_3x3", 0), ("skip_connect", 2),
            ("dil_conv_5x5", 1), ("max_pool_3x3", 3), ("sep_conv_3x3", 4), ("skip_connect", 0)),
    normal_concat=(2, 3, 4, 5),
    reduce=(("sep_conv_3x3", 0), ("skip_connect", 1), ("dil_conv_3x3", 2), ("avg_pool_3x3", 0),
            ("max_pool_3x3", 1), ("sep_conv_5x5", 3), ("dil_conv_5x5", 4), ("skip_connect", 2)),
    reduce_concat=(2, 3, 4, 5),
)


def _close(ours, theirs, name):
    scale = max(float(np.abs(theirs).max()), 1e-6)
    err = float(np.abs(ours - theirs).max())
    assert err <= 2e-4 + 2e-3 * scale, f"{name}: max error {err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("drop_prob", [0.0, 0.3])
def test_eval_network_matches_torch_with_aux_head_and_drop_path(drop_prob):
    net = NetworkCIFAR(MIXED, channels=4, layers=5, auxiliary=True, seed=1)
    net.drop_path_prob = drop_prob
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, size=2)
    mirror = TorchMirror(net)

    def masks(seed=9, keep=1 - drop_prob):
        r = np.random.default_rng(seed)
        while True:
            yield (r.random((2, 1, 1, 1)) < keep).astype(np.float32)

    mirror.drop_masks = masks()
    logits, aux = net(Tensor(x), rng=np.random.default_rng(9))
    loss = F.cross_entropy(logits, y) + 0.4 * F.cross_entropy(aux, y)
    loss.backward()
    t_logits, t_aux = mirror.run(net, torch.tensor(x))
    t_loss = TF.cross_entropy(t_logits, torch.tensor(y)) + 0.4 * TF.cross_entropy(t_aux, torch.tensor(y))
    t_loss.backward()
    np.testing.assert_allclose(logits.data, t_logits.detach().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(aux.data, t_aux.detach().numpy(), rtol=1e-4, atol=1e-5)
    assert loss.item() == pytest.approx(t_loss.item(), rel=1e-5)
    for name, p in net.named_parameters():
        _close(p.grad, mirror.grad(p), name)


def test_eval_mode_has_no_aux_logits_and_uses_running_statistics():
    net = NetworkCIFAR(MIXED, channels=4, layers=5, auxiliary=True, seed=1)
    net.eval()
    x = np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32)
    logits, aux = net(Tensor(x))
    assert aux is None
    t_logits, t_aux = TorchMirror(net).run(net, torch.tensor(x))
    assert t_aux is None
    np.testing.assert_allclose(logits.data, t_logits.detach().numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("genotype", [MIXED, DARTS_V2])
def test_mac_counts_match_an_independent_count(genotype):
    net = NetworkCIFAR(genotype, channels=4, layers=5, auxiliary=True, seed=0)
    costs = network_costs(net)
    net.eval()
    mirror = TorchMirror(net)
    with torch.no_grad():
        mirror.run(net, torch.zeros((1, 3, 32, 32)))
    assert [c.macs for c in costs] == [m for _, m in mirror.macs]
    # The searched convolutions are exactly the depthwise/pointwise layers of sep/dil convs.
    quantised = [c for c in costs if c.quantised]
    assert quantised and all(c.kind in ("depthwise", "pointwise") for c in quantised)
    assert all(c.name.endswith((".depthwise", ".pointwise")) for c in quantised)


def test_darts_v2_at_paper_size_has_the_published_parameter_count():
    net = NetworkCIFAR(DARTS_V2, channels=36, layers=20, auxiliary=True, seed=0)
    params = sum(p.size for name, p in net.named_parameters() if not name.startswith("auxiliary_head"))
    assert round(params / 1e6, 1) == 3.3  # DARTS paper, Table 1: 3.3 M
