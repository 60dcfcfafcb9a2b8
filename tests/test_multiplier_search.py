"""The multiplier-aware search as a whole: K = 1 is the plain search, a large energy weight picks the cheapest
multiplier with a falling expected energy, β resumes exactly, and genotypes carry their multipliers into
training, evaluation and the energy report."""
from __future__ import annotations

import json

import numpy as np
import pytest

from approxdarts_np.approx.arithmetic import arithmetic_from_spec
from approxdarts_np.approx.energy import EnergyModel
from approxdarts_np.io.checkpoint import load_tree
from approxdarts_np.nas.genotypes import DARTS_V2, Genotype, read_genotype
from approxdarts_np.nas.model_eval import NetworkCIFAR
from approxdarts_np.nas.multiplier_choice import set_genotype_multipliers
from approxdarts_np.nas.operations import searched_convs
from approxdarts_np.runs.loop import RunInterrupted
from approxdarts_np.runs.report import network_energy
from approxdarts_np.runs.search import SearchConfig, Searcher, energy_prices, run_search
from run_helpers import ctrl_c_at, metrics_without_times

TINY = dict(epochs=1, channels=2, layers=3, batch_size=4, max_train_images=24, threads=1, seed=3)
CANDIDATES = "exact,mul8u_2P7,mul8u_17KS"


def _arrays(path):
    tree = load_tree(path)
    return {k: v for k, v in tree.items() if isinstance(v, np.ndarray)}


def test_one_candidate_is_the_plain_search_bit_for_bit(tmp_path):
    run_search(SearchConfig.quick(output_dir=str(tmp_path / "plain"), arithmetic="mul8u_2P7", **TINY))
    run_search(SearchConfig.quick(output_dir=str(tmp_path / "one"), multipliers="mul8u_2P7", **TINY))
    for name in ("alpha.h5",):
        a, b = _arrays(tmp_path / "plain" / name), _arrays(tmp_path / "one" / name)
        assert sorted(a) == sorted(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    plain = load_tree(tmp_path / "plain" / "checkpoint.h5")["model"]
    one = load_tree(tmp_path / "one" / "checkpoint.h5")["model"]
    for k in plain:
        np.testing.assert_array_equal(plain[k], one[k], err_msg=k)


def _searcher(tmp_path, **kw):
    cfg = SearchConfig.quick(output_dir=str(tmp_path), multipliers=CANDIDATES, **{**TINY, **kw})
    candidates = [arithmetic_from_spec(s) for s in cfg.candidate_specs()]
    return Searcher(cfg, candidates=candidates, energy=energy_prices(candidates, required=True))


def test_a_large_energy_weight_picks_the_cheapest_multiplier_and_lowers_the_energy_every_step(tmp_path):
    searcher = _searcher(tmp_path, energy_weight=100.0, arch_lr=0.01, max_train_images=64)
    pj = searcher.energy["pj"]
    cheapest = int(np.argmin(pj))
    assert [a.name for a in searcher.model.candidates][cheapest] == "mul8u_17KS"
    searcher.begin_epoch(0)
    energies = [searcher.energy_figures()["expected_energy_pj"]]
    for step in range(searcher.steps_per_epoch):
        searcher.step(0, step)
        energies.append(searcher.energy_figures()["expected_energy_pj"])
    assert all(b < a for a, b in zip(energies, energies[1:])), energies
    for kind, chosen in searcher.model.chosen_multipliers().items():
        assert (chosen == cheapest).all(), kind
    g = searcher.model.genotype()
    for kind in ("normal", "reduce"):
        for (op, _), m in zip(getattr(g, kind), g.multipliers(kind)):
            assert (m == "mul8u_17KS") == op.startswith(("sep", "dil")), (op, m)


def _beta_gradient_off_the_straight_through_direction(searcher) -> float:
    """One step; the largest part of β's gradient (before Adam) that is not along the straight-through
    direction onehot(k*) − y of its (edge, op), relative to the gradient's size."""
    before = searcher.model.betas_normal.data.copy()
    searcher.begin_epoch(0)
    searcher.step(0, 0)
    k_star, noise = searcher.model.choice["normal"]
    z = (before + noise) / searcher.config.gumbel_temperature
    y = np.exp(z - z.max(-1, keepdims=True))
    y /= y.sum(-1, keepdims=True)
    direction = np.eye(y.shape[-1])[k_star] - y
    grad = searcher.model.betas_normal.grad.astype(np.float64)
    coef = (grad * direction).sum(-1, keepdims=True) / (direction * direction).sum(-1, keepdims=True)
    return float(np.abs(grad - coef * direction).max() / np.abs(grad).max())


def test_the_loss_reaches_beta_through_the_drawn_multiplier_only(tmp_path):
    """λ = 0: β[e, o]'s gradient is the straight-through one, c·(onehot(k*) − y) — what the softmax of the
    drawn multiplier passes back; λ > 0 adds the energy gradient, which is not of that form."""
    assert _beta_gradient_off_the_straight_through_direction(_searcher(tmp_path / "a", energy_weight=0.0)) < 1e-4
    assert _beta_gradient_off_the_straight_through_direction(_searcher(tmp_path / "b", energy_weight=1.0)) > 1e-2


def test_beta_stops_and_resumes_bit_identically(tmp_path):
    cfg = dict(TINY, multipliers=CANDIDATES, energy_weight=1.0)
    ref = tmp_path / "ref"
    run_search(SearchConfig.quick(output_dir=str(ref), **cfg))
    out = tmp_path / "run"

    progress = ctrl_c_at(2)
    with pytest.raises(RunInterrupted):
        run_search(SearchConfig.quick(output_dir=str(out), **cfg), progress=progress)
    run_search(resume=out)
    a, b = _arrays(out / "alpha.h5"), _arrays(ref / "alpha.h5")
    assert "betas_normal" in a and "betas_normal_history" in a
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert (out / "genotype.txt").read_text() == (ref / "genotype.txt").read_text()
    m_out = metrics_without_times(out)
    assert m_out == metrics_without_times(ref)
    assert "multiplier_probabilities" in m_out[-1] and m_out[-1]["expected_energy_pj"] > 0


def _with_multipliers(genotype: Genotype, names) -> Genotype:
    def pick(pairs, offset):
        return [names[(k + offset) % len(names)] if op.startswith(("sep", "dil")) else None
                for k, (op, _) in enumerate(pairs)]
    return Genotype(genotype.normal, genotype.normal_concat, genotype.reduce, genotype.reduce_concat,
                    normal_multipliers=pick(genotype.normal, 0), reduce_multipliers=pick(genotype.reduce, 1))


def test_genotype_with_multipliers_round_trips(tmp_path):
    g = _with_multipliers(DARTS_V2, ["mul8u_2P7", "exact", "mul8u_17KS"])
    assert g.has_multipliers and not DARTS_V2.has_multipliers
    assert Genotype.from_dict(json.loads(g.to_json())) == g
    (tmp_path / "g.txt").write_text(g.to_text() + "\n")
    (tmp_path / "g.json").write_text(g.to_json())
    assert read_genotype(tmp_path / "g.txt") == g == read_genotype(tmp_path / "g.json")
    assert read_genotype(g.to_darts_string()) == DARTS_V2  # the DARTS string alone: no multipliers
    assert g.without_multipliers() == DARTS_V2
    edge = g.to_dict()["normal"][0]
    assert edge == ["sep_conv_3x3", 0, "mul8u_2P7"]
    with pytest.raises(ValueError, match="skip_connect has no multiplier"):
        Genotype(DARTS_V2.normal, DARTS_V2.normal_concat, DARTS_V2.reduce, DARTS_V2.reduce_concat,
                 normal_multipliers=["exact"] * 8)


def test_per_layer_energy_by_hand():
    names = ["mul8u_2P7", "exact", "mul8u_17KS"]
    g = _with_multipliers(DARTS_V2, names)
    report, _ = network_energy(g, 4, 3, "genotype")
    table = EnergyModel()
    pj = {n: table.approx_mul_pj(arithmetic_from_spec(n).multiplier) for n in names}
    # by hand: walk the cells and ops in genotype order, independently of the report's layer names
    net = NetworkCIFAR(g, 4, 10, 3, auxiliary=False)
    set_genotype_multipliers(net, g, arithmetic_from_spec)
    expected_layers = {}
    for cell in net.cells:
        kind = "reduce" if cell.reduction else "normal"
        for op, name in zip(cell.ops, g.multipliers(kind)):
            for conv in searched_convs(op):
                expected_layers[id(conv)] = name
                assert conv.arithmetic.name == name
    assert len(expected_layers) == sum(r.quantised for r in report.layers)
    quantised = [r for r in report.layers if r.quantised]
    assert sorted({r.multiplier for r in quantised}) == sorted(names)
    total = sum(r.macs * (pj[r.multiplier] if r.quantised else table.fp32_mul_pj) for r in report.layers)
    assert report.energy_approx_pj == pytest.approx(total, rel=1e-12)
    exact = sum(r.macs * (table.int8_mul_pj if r.quantised else table.fp32_mul_pj) for r in report.layers)
    assert report.energy_exact8_pj == pytest.approx(exact, rel=1e-12)
    assert report.energy_approx_pj < report.energy_exact8_pj
