"""The evaluation network built from a genotype, against the torch mirror; MAC counts; sizes.

Tolerances as in test_supernet.py.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as TF

from approxdarts_np.approx.arithmetic import arithmetic_from_spec
from approxdarts_np.approx.energy import energy_report
from approxdarts_np.approx.multipliers import load_multiplier
from approxdarts_np.autodiff import Tensor
from approxdarts_np.autodiff import functional as F
from approxdarts_np.nas.costs import network_costs
from approxdarts_np.nas.genotypes import DARTS_V2, Genotype
from approxdarts_np.nas.model_eval import NetworkCIFAR
from approxdarts_np.nn import Conv2d, DepthwiseConv2d, Linear
from torch_reference import TorchMirror, quantize_reference, table_conv_reference

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


# ------------------------------------------------------------ which layers run in 8 bit

def _expected_searched(genotype, net):
    """From the genotype alone: the depthwise and pointwise convs of every kept sep/dil conv."""
    expected = set()
    for i, cell in enumerate(net.cells):
        pairs = genotype.reduce if cell.reduction else genotype.normal
        for k, (op, _) in enumerate(pairs):
            base = f"cells.items.{i}.ops.items.{k}"
            if op.startswith("sep_conv"):
                expected |= {f"{base}.{half}.{conv}" for half in ("first", "second")
                             for conv in ("depthwise", "pointwise")}
            elif op.startswith("dil_conv"):
                expected |= {f"{base}.depthwise", f"{base}.pointwise"}
    return expected


def _layers(net):
    return {name: m for name, m in net.named_modules() if isinstance(m, (Conv2d, DepthwiseConv2d, Linear))}


@pytest.mark.parametrize("genotype", [DARTS_V2, MIXED], ids=["DARTS_V2", "MIXED"])
def test_quantises_exactly_the_sep_and_dil_convolutions(genotype):
    arithmetic = arithmetic_from_spec("mul8u_2P7")
    net = NetworkCIFAR(genotype, channels=4, layers=5, auxiliary=True, arithmetic=arithmetic, seed=0)
    expected = _expected_searched(genotype, net)
    if genotype is DARTS_V2:
        # 5 sep_conv_3x3 (4 convs each) and 1 dil_conv_3x3 (2) per normal cell, none in the
        # reduction cells (pools and skips); 3 normal cells of 5.
        assert len(expected) == 3 * (5 * 4 + 2) == 66
    else:
        # MIXED per normal cell: sep5 + dil3 + dil5 + sep3 = 12; per reduction cell: sep3 + dil3 +
        # sep5 + dil5 = 12.
        assert len(expected) == 5 * 12
    layers = _layers(net)
    assert expected <= set(layers)
    set_to_8bit = {name for name, m in layers.items() if getattr(m, "arithmetic", None) is not None}
    assert set_to_8bit == expected
    assert all(layers[name].arithmetic is arithmetic for name in expected)
    # What stays FP32 is really there: stem, preprocessing, factorized reduce, classifier, aux head.
    fp32 = set(layers) - expected
    for name in ("stem.layers.0", "cells.items.0.preprocess0.op.layers.1", "cells.items.0.preprocess1.op.layers.1",
                 "cells.items.2.preprocess0.conv_1", "cells.items.2.preprocess0.conv_2", "classifier",
                 "auxiliary_head.features.layers.2", "auxiliary_head.features.layers.5",
                 "auxiliary_head.classifier"):
        assert name in fp32, name
    if genotype is MIXED:
        # skip_connect on a stride-2 edge of a reduction cell is a FactorizedReduce: FP32.
        assert {"cells.items.1.ops.items.1.conv_1", "cells.items.1.ops.items.1.conv_2"} <= fp32
    # The energy report marks the same set, and prices it with the layer's multiplier.
    costs = network_costs(net)
    assert {c.name for c in costs if c.quantised} == expected
    assert {c.name for c in costs if c.multiplier is not None} == expected
    assert {c.multiplier for c in costs if c.quantised} == {"mul8u_2P7"}
    # None back to float: nothing is left in 8 bit.
    net.set_arithmetic(None)
    assert not any(getattr(m, "arithmetic", None) for m in _layers(net).values())


def test_search_network_quantises_exactly_the_sep_and_dil_convolutions():
    from approxdarts_np.nas.model_search import Network
    from approxdarts_np.nas.operations import DilConv, SepConv
    net = Network(4, 10, 5, arithmetic=arithmetic_from_spec("exact"), seed=0)
    expected = set()
    for name, m in net.named_modules():
        if isinstance(m, SepConv):
            expected |= {f"{name}.{half}.{conv}" for half in ("first", "second") for conv in ("depthwise", "pointwise")}
        elif isinstance(m, DilConv) and not name.endswith((".first", ".second")):
            expected |= {f"{name}.depthwise", f"{name}.pointwise"}
    # 14 edges x (2 sep x 4 + 2 dil x 2) convs per cell.
    assert len(expected) == 5 * 14 * 12
    set_to_8bit = {name for name, m in _layers(net).items() if getattr(m, "arithmetic", None) is not None}
    assert set_to_8bit == expected


def _record_layer_calls(net):
    """Wrap each conv/linear layer's forward to keep (input, output) of every call."""
    calls = []
    for name, layer in _layers(net).items():
        def forward(x, layer=layer, name=name, inner=layer.forward):
            y = inner(x)
            calls.append((name, layer, x.data.copy(), y.data.copy()))
            return y
        layer.forward = forward
    return calls


def test_an_approximate_multiplier_changes_exactly_the_searched_layers():
    """Every layer is recomputed from its own recorded input: the 66 searched convs equal the
    plain table gather of mul8u_2P7 bit for bit and differ from the float conv; every other
    layer (stem, preprocessing, factorized reduce, classifier, aux head) equals the float op."""
    table = load_multiplier("mul8u_2P7").table
    net = NetworkCIFAR(DARTS_V2, channels=4, layers=5, auxiliary=True,
                       arithmetic=arithmetic_from_spec("mul8u_2P7"), seed=0)
    expected = _expected_searched(DARTS_V2, net)
    calls = _record_layer_calls(net)
    net.train()  # so the auxiliary head runs too
    x = np.random.default_rng(5).standard_normal((2, 3, 32, 32)).astype(np.float32)
    _, aux = net(Tensor(x))
    assert aux is not None
    changed, unchanged = set(), set()
    for name, layer, inp, out in calls:
        if isinstance(layer, Linear):
            ref = inp @ layer.weight.data.T + (layer.bias.data if layer.bias is not None else 0)
            np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6, err_msg=name)
            unchanged.add(name)
            continue
        groups = layer.weight.shape[0] if isinstance(layer, DepthwiseConv2d) else layer.groups
        geometry = (layer.stride, layer.padding, layer.dilation, groups)
        float_ref = TF.conv2d(torch.tensor(inp), torch.tensor(layer.weight.data), None, *geometry).numpy()
        if name in expected:
            gathered = table_conv_reference(quantize_reference(inp), quantize_reference(layer.weight.data),
                                            table, *geometry)
            np.testing.assert_array_equal(out, gathered, err_msg=name)
            scale = float(np.abs(float_ref).max())
            assert float(np.abs(out - float_ref).max()) > 1e-3 * scale, f"{name} computed in float"
            changed.add(name)
        else:
            np.testing.assert_allclose(out, float_ref, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(float_ref).max())),
                                       err_msg=name)
            unchanged.add(name)
    assert changed == expected
    assert unchanged == set(_layers(net)) - expected
    assert {"stem.layers.0", "classifier", "auxiliary_head.classifier",
            "cells.items.2.preprocess0.conv_1"} <= unchanged


# ------------------------------------------------------------ the README's network figures

def _energy(genotype, channels, layers, multiplier):
    net = NetworkCIFAR(genotype, channels, 10, layers, auxiliary=False)
    report = energy_report(network_costs(net), load_multiplier(multiplier))
    return report, sum(p.size for p in net.parameters())


def test_readme_figures_of_darts_v2_at_paper_size():
    """README "Energy of the paper-size network" (20 cells, 36 channels, one 32x32 image, mul8u_17KS)."""
    report, params = _energy(DARTS_V2, 36, 20, "mul8u_17KS")
    assert params == 3_349_342
    assert report.macs == 528_359_040
    assert report.macs_quantised == 301_086_720
    assert round(100 * report.macs_quantised / report.macs, 1) == 57.0
    assert [round(e / 1e6, 1) for e in (report.energy_fp32_pj, report.energy_exact8_pj, report.energy_approx_pj)] \
        == [1954.9, 901.1, 856.9]
    assert round(report.energy_exact8_pj / report.energy_fp32_pj, 3) == 0.461


# The genotype the README's default search printed (section "A worked example", commit 1a02503).
README_SAMPLE = Genotype(
    normal=(("sep_conv_3x3", 1), ("sep_conv_5x5", 0), ("sep_conv_5x5", 2), ("dil_conv_5x5", 1),
            ("dil_conv_3x3", 0), ("sep_conv_3x3", 1), ("dil_conv_3x3", 3), ("dil_conv_3x3", 4)),
    normal_concat=(2, 3, 4, 5),
    reduce=(("max_pool_3x3", 0), ("dil_conv_5x5", 1), ("dil_conv_3x3", 2), ("max_pool_3x3", 0),
            ("sep_conv_3x3", 0), ("sep_conv_5x5", 3), ("dil_conv_5x5", 3), ("sep_conv_5x5", 1)),
    reduce_concat=(2, 3, 4, 5),
)


def test_readme_figures_of_the_sample_network():
    """README "Search → train → evaluate → energy": 8 channels, 6 cells, the genotype above."""
    report, params = _energy(README_SAMPLE, 8, 6, "mul8u_17KS")
    assert params == 67_410
    assert report.macs == 14_048_512
    assert report.macs_quantised == 9_648_128
    assert round(100 * report.macs_quantised / report.macs, 1) == 68.7
    assert [round(e / 1e6, 2) for e in (report.energy_fp32_pj, report.energy_exact8_pj, report.energy_approx_pj)] \
        == [51.98, 18.21, 16.79]
    assert round(report.energy_exact8_pj / report.energy_fp32_pj, 3) == 0.350
    report_1446, _ = _energy(README_SAMPLE, 8, 6, "mul8u_1446")
    assert round(report_1446.energy_approx_pj / 1e6, 2) == 18.20
    paper, _ = _energy(README_SAMPLE, 36, 20, "mul8u_17KS")  # README "At paper size": 0.403
    assert round(paper.energy_exact8_pj / paper.energy_fp32_pj, 3) == 0.403
    # The energy command's own path gives the same report.
    from approxdarts_np.runs.report import network_energy
    cli_report, cli_params = network_energy(README_SAMPLE, 8, 6, "mul8u_17KS")
    assert cli_params == params and cli_report.to_dict() == report.to_dict()
