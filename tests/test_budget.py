"""The budgeted multiplier search: warm-up, the energy scope, the dual variable, the projection into the
budget, the cap on parameter-free ops, β's own learning rate and the annealed temperature — each checked
against the fact it must hold, not only that a run finishes."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from approxdarts_np.approx.arithmetic import arithmetic_from_spec
from approxdarts_np.approx.energy import EnergyModel
from approxdarts_np.io.checkpoint import load_tree
from approxdarts_np.nas.budget import (PARAMETER_FREE_OPS, SEARCHED_OPS, DualAscent, cap_parameter_free,
                                       edge_index, energy_ratio, genotype_op_multiplies, gumbel_temperature,
                                       parameter_free_share, project_to_budget, random_genotype)
from approxdarts_np.nas.genotypes import DARTS_V2, Genotype, derive_genotype
from approxdarts_np.nas.operations import PRIMITIVES
from approxdarts_np.runs.loop import RunInterrupted
from approxdarts_np.runs.report import network_energy
from approxdarts_np.runs.search import SearchConfig, Searcher, energy_prices, run_search
from approxdarts_np_cli.main import app
from run_helpers import ctrl_c_at, metrics_without_times

TINY = dict(epochs=2, channels=2, layers=3, batch_size=4, max_train_images=24, threads=1, seed=3)
CANDIDATES = ["exact", "mul8u_2P7", "mul8u_17KS", "mul8u_L40"]
TABLE = EnergyModel()
PJ = np.array([TABLE.approx_mul_pj(arithmetic_from_spec(n).multiplier) for n in CANDIDATES])
PRICES = dict(zip(CANDIDATES, map(float, PJ)))
EXACT_PJ = TABLE.int8_mul_pj
CHEAPEST = float(PJ.min() / EXACT_PJ)


def _searcher(tmp_path, **kw):
    cfg = SearchConfig.quick(output_dir=str(tmp_path), multipliers=",".join(CANDIDATES), **{**TINY, **kw})
    candidates = [arithmetic_from_spec(s) for s in cfg.candidate_specs()]
    return Searcher(cfg, candidates=candidates, energy=energy_prices(candidates, required=True))


def _arch(searcher):
    m = searcher.model
    return [p.data.copy() for p in (m.alphas_normal, m.alphas_reduce, m.betas_normal, m.betas_reduce)]


# ----------------------------------------------------------------------------- warm-up
def test_a_warmup_epoch_leaves_alpha_and_beta_bit_identical_and_trains_the_weights(tmp_path):
    searcher = _searcher(tmp_path, warmup_epochs=1, energy_budget=0.5)
    before, weights = _arch(searcher), [p.data.copy() for p in searcher.model.weights()]
    begun = searcher.begin_epoch(0)
    assert begun.get("warmup") is True
    drawn = set()
    for step in range(searcher.steps_per_epoch):
        searcher.step(0, step)
        drawn |= set(np.unique(searcher.model.choice["normal"][0]).tolist())
    for a, b in zip(before, _arch(searcher)):
        np.testing.assert_array_equal(a, b)
    assert searcher.dual.value == 0.0
    assert any(not np.array_equal(a, p.data) for a, p in zip(weights, searcher.model.weights()))
    assert len(drawn) > 1  # multipliers are still drawn during warm-up, so every candidate's weights adapt
    searcher.begin_epoch(1)  # after warm-up the architecture moves
    searcher.step(1, 0)
    assert all(not np.array_equal(a, b) for a, b in zip(before, _arch(searcher)))


def test_the_default_warmup_is_a_quarter_of_a_multiplier_search_and_none_for_a_plain_one():
    assert SearchConfig.quick(epochs=8, multipliers="exact,mul8u_17KS").warmup() == 2
    assert SearchConfig.quick(epochs=8, arithmetic="mul8u_17KS").warmup() == 0
    assert SearchConfig.quick(epochs=8, multipliers="exact,mul8u_17KS", warmup_epochs=0).warmup() == 0


# ----------------------------------------------------------------------------- scope
def _arch_gradients(tmp_path, **kw):
    searcher = _searcher(tmp_path, warmup_epochs=0, **kw)
    searcher.begin_epoch(0)
    searcher.step(0, 0)
    m = searcher.model
    return [p.grad.copy() for p in (m.alphas_normal, m.alphas_reduce, m.betas_normal, m.betas_reduce)]


def test_by_default_the_energy_term_reaches_beta_only(tmp_path):
    plain = _arch_gradients(tmp_path / "a", energy_weight=0.0)
    weighted = _arch_gradients(tmp_path / "b", energy_weight=5.0)
    budgeted = _arch_gradients(tmp_path / "c", energy_budget=0.3, budget_step=100.0)
    everywhere = _arch_gradients(tmp_path / "d", energy_weight=5.0, energy_scope="all")
    for g in (weighted, budgeted):  # α: exactly the task loss's gradient
        np.testing.assert_array_equal(g[0], plain[0])
        np.testing.assert_array_equal(g[1], plain[1])
    assert not np.array_equal(weighted[2], plain[2])  # β: the energy term acts
    assert not np.array_equal(everywhere[0], plain[0])  # scope all: it moves α too


def test_a_budget_below_the_start_lowers_the_genotype_ratio_within_an_epoch(tmp_path):
    searcher = _searcher(tmp_path, warmup_epochs=0, energy_budget=CHEAPEST, budget_step=50.0, beta_lr=0.05)
    searcher.begin_epoch(0)
    start = searcher.genotype_ratio()
    for step in range(searcher.steps_per_epoch):
        searcher.step(0, step)
    assert searcher.genotype_ratio() < start
    assert searcher.dual.value > 0


# ----------------------------------------------------------------------------- dual ascent
def test_the_dual_variable_rises_over_budget_and_falls_back_once_it_is_met():
    dual = DualAscent(budget=0.5, step_size=2.0)
    rising = [dual.update(r) for r in (0.9, 0.8, 0.7)]
    assert rising == pytest.approx([0.8, 1.4, 1.8])
    falling = [dual.update(r) for r in (0.3, 0.3, 0.3)]
    assert falling == pytest.approx([1.4, 1.0, 0.6])
    assert [dual.update(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]  # never negative


def test_in_a_search_lambda_rises_while_the_genotype_ratio_is_over_budget_then_falls(tmp_path):
    searcher = _searcher(tmp_path, warmup_epochs=0, energy_budget=0.6, budget_step=5.0, beta_lr=0.05,
                         max_train_images=64)
    searcher.begin_epoch(0)
    trace = []
    for step in range(searcher.steps_per_epoch):
        before = searcher.dual.value
        searcher.step(0, step)
        trace.append((before, searcher.genotype_ratio(), searcher.dual.value))
    for before, ratio, after in trace:
        # the update uses the ratio after the step's β update
        assert after == pytest.approx(max(0.0, before + 5.0 * (ratio - 0.6)), rel=1e-12, abs=1e-15)
    assert any(ratio > 0.6 for _, ratio, _ in trace) and any(ratio <= 0.6 for _, ratio, _ in trace), trace
    assert max(after for *_, after in trace) > 0


# ----------------------------------------------------------------------------- energy ratio and projection
@pytest.mark.parametrize("channels, layers", [(36, 20), (4, 3), (8, 5), (6, 7)])
def test_the_shape_count_of_searched_multiplies_equals_the_forward_pass_count(channels, layers):
    rng = np.random.default_rng(channels * 100 + layers)
    for genotype in [DARTS_V2] + [random_genotype(rng, CANDIDATES) for _ in range(3)]:
        report, _ = network_energy(genotype.without_multipliers(), channels, layers, "exact")
        counted = genotype_op_multiplies(genotype, channels, layers)
        assert int(counted["normal"].sum() + counted["reduce"].sum()) == report.macs_quantised


def test_energy_ratio_matches_the_energy_report():
    rng = np.random.default_rng(5)
    for _ in range(4):
        g = random_genotype(rng, CANDIDATES)
        report, _ = network_energy(g, 8, 5, "genotype")
        quantised = [r for r in report.layers if r.quantised]
        by_report = sum(r.mul_energy_approx_pj for r in quantised) / sum(r.mul_energy_exact8_pj for r in quantised)
        assert energy_ratio(g, PRICES, EXACT_PJ, 8, 5) == pytest.approx(by_report, rel=1e-12)


def _betas(rng):
    return {k: rng.standard_normal((14, 4, len(CANDIDATES))) for k in ("normal", "reduce")}


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), budget=st.floats(CHEAPEST, 1.0))
def test_the_projection_always_meets_the_budget_and_keeps_what_it_need_not_change(seed, budget):
    rng = np.random.default_rng(seed)
    g = random_genotype(rng, CANDIDATES)
    projected, moves = project_to_budget(g, _betas(rng), CANDIDATES, PJ, EXACT_PJ, budget)
    ratio = energy_ratio(projected, PRICES, EXACT_PJ)
    assert ratio <= budget + 1e-12
    assert projected.without_multipliers() == g.without_multipliers()  # ops and inputs untouched
    changed = [(kind, k, a, b) for kind in ("normal", "reduce")
               for k, (a, b) in enumerate(zip(g.multipliers(kind), projected.multipliers(kind))) if a != b]
    assert {(m["cell"], m["op"]) for m in moves} == {(kind, k) for kind, k, _, _ in changed}
    for _, _, before, after in changed:  # only ever cheaper
        assert PRICES[after] < PRICES[before]
    if energy_ratio(g, PRICES, EXACT_PJ) <= budget:
        assert projected == g and not moves
    # no more than needed: putting any changed op back on its original multiplier breaks the budget
    for kind, k, before, _ in changed:
        names = list(projected.multipliers(kind))
        names[k] = before
        other = "reduce" if kind == "normal" else "normal"
        undone = Genotype(g.normal, g.normal_concat, g.reduce, g.reduce_concat,
                          **{f"{kind}_multipliers": names, f"{other}_multipliers": projected.multipliers(other)})
        assert energy_ratio(undone, PRICES, EXACT_PJ) > budget


def test_the_projection_cheapens_the_op_with_the_smallest_beta_margin_first():
    g = Genotype(normal=[("sep_conv_3x3", 0), ("sep_conv_3x3", 1)] * 4, normal_concat=(2, 3, 4, 5),
                 reduce=[("sep_conv_3x3", 0), ("sep_conv_3x3", 1)] * 4, reduce_concat=(2, 3, 4, 5),
                 normal_multipliers=["exact"] * 8, reduce_multipliers=["exact"] * 8)
    betas = {k: np.zeros((14, 4, 4)) for k in ("normal", "reduce")}
    for kind in betas:
        betas[kind][:, :, 0] = 5.0  # every op prefers exact strongly ...
    row = edge_index(2, 1)  # ... except normal op 5 (node 2, input 1), which barely prefers it over L40
    betas["normal"][row, 0, 0], betas["normal"][row, 0, 3] = 1.0, 0.9
    full = energy_ratio(g, PRICES, EXACT_PJ)
    projected, moves = project_to_budget(g, betas, CANDIDATES, PJ, EXACT_PJ, full - 1e-9)
    assert moves == [{"cell": "normal", "op": 5, "from": "exact", "to": "mul8u_L40", "margin": pytest.approx(0.1)}]
    assert projected.multipliers("normal")[5] == "mul8u_L40"


def test_a_budget_below_the_cheapest_candidate_is_refused_before_anything_is_written(tmp_path):
    result = CliRunner().invoke(app, ["search", "--multipliers", ",".join(CANDIDATES), "--energy-budget", "0.1",
                                      "--output-dir", str(tmp_path / "out"), "--threads", "1"])
    assert result.exit_code == 2 and "cheapest" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "out" / "config.json").exists()


# ----------------------------------------------------------------------------- parameter-free cap
def _softmax(a):
    e = np.exp(a - a.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("limit", [0, 1, 2, 3])
def test_the_cap_holds_on_an_alpha_that_prefers_skips_everywhere(limit):
    rng = np.random.default_rng(limit)
    alphas = 1e-2 * rng.standard_normal((14, 8))
    alphas[:, PRIMITIVES.index("skip_connect")] += 5.0
    alphas[:, PRIMITIVES.index("max_pool_3x3")] += 4.0
    weights = {"normal": _softmax(alphas), "reduce": _softmax(alphas[::-1].copy())}
    base = derive_genotype(weights["normal"], weights["reduce"])
    assert parameter_free_share(base) == 1.0
    capped = cap_parameter_free(weights, base, limit)
    for kind in ("normal", "reduce"):
        before, after = getattr(base, kind), getattr(capped, kind)
        assert sum(op in PARAMETER_FREE_OPS for op, _ in after) == limit
        assert [j for _, j in before] == [j for _, j in after]  # the cell keeps its inputs
        for k, ((op0, j), (op1, _)) in enumerate(zip(before, after)):
            if op1 != op0:  # a replacement is the strongest conv of that very edge
                row = weights[kind][edge_index(k // 2, j)]
                assert op1 == max(SEARCHED_OPS, key=lambda o: row[PRIMITIVES.index(o)])
        # the weakest parameter-free ops went first: every kept one outweighs every replaced one
        kept = [weights[kind][edge_index(k // 2, j), PRIMITIVES.index(op)]
                for k, (op, j) in enumerate(after) if op in PARAMETER_FREE_OPS]
        gone = [weights[kind][edge_index(k // 2, j), PRIMITIVES.index(op)]
                for k, ((op, j), (new, _)) in enumerate(zip(before, after)) if new != op]
        assert not kept or not gone or min(kept) >= max(gone)


def test_a_search_writes_the_capped_genotype_and_records_the_uncapped_share(tmp_path):
    out = tmp_path / "s"
    run_search(SearchConfig.quick(output_dir=str(out), max_parameter_free=0, **{**TINY, "epochs": 1}))
    metrics = metrics_without_times(out)[-1]
    assert metrics["skip_pool_share"] == 0.0
    assert "skip_pool_share_uncapped" in metrics
    text = (out / "genotype.txt").read_text()
    assert not any(op in text for op in PARAMETER_FREE_OPS)


# ----------------------------------------------------------------------------- β's learning rate, temperature
def test_beta_and_alpha_step_at_their_own_learning_rates(tmp_path):
    searcher = _searcher(tmp_path, warmup_epochs=0, arch_lr=1e-3, beta_lr=0.03, arch_weight_decay=0.0,
                         energy_weight=1.0)
    before = _arch(searcher)
    searcher.begin_epoch(0)
    searcher.step(0, 0)
    after = _arch(searcher)
    # Adam's first step moves every coordinate with a clear gradient by its learning rate
    for (b, a), lr in zip(zip(before, after), (1e-3, 1e-3, 0.03, 0.03)):
        moved = np.abs(a.astype(np.float64) - b)
        assert moved.max() == pytest.approx(lr, rel=1e-3)


def test_the_temperature_follows_its_geometric_schedule():
    assert gumbel_temperature(0, 5, 5.0, 0.5) == 5.0
    assert gumbel_temperature(4, 5, 5.0, 0.5) == pytest.approx(0.5)
    assert gumbel_temperature(2, 5, 5.0, 0.5) == pytest.approx(np.sqrt(5.0 * 0.5))
    assert gumbel_temperature(3, 1, 5.0, 0.5) == 5.0


def test_temperature_beta_lr_and_lambda_resume_bit_identically(tmp_path):
    cfg = dict(TINY, epochs=3, multipliers=",".join(CANDIDATES), energy_budget=0.5, warmup_epochs=1,
               beta_lr=0.05, gumbel_temperature=4.0, gumbel_temperature_end=0.5, budget_step=3.0)
    ref = tmp_path / "ref"
    run_search(SearchConfig.quick(output_dir=str(ref), **cfg))
    out = tmp_path / "run"
    with pytest.raises(RunInterrupted):
        run_search(SearchConfig.quick(output_dir=str(out), **cfg), progress=ctrl_c_at(2, epoch=1))
    run_search(resume=out)
    a, b = load_tree(out / "alpha.h5"), load_tree(ref / "alpha.h5")
    for k in a:
        if isinstance(a[k], np.ndarray):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    metrics = metrics_without_times(out)
    assert metrics == metrics_without_times(ref)
    assert [m["gumbel_temperature"] for m in metrics] == pytest.approx([4.0, np.sqrt(2.0), 0.5])
    assert metrics[0]["warmup"] is True and metrics[0]["lagrange_multiplier"] == 0.0
    assert metrics[-1]["genotype_energy_ratio"] <= 0.5
    assert (out / "genotype.txt").read_text() == (ref / "genotype.txt").read_text()


# ----------------------------------------------------------------------------- the options end to end
SEARCH = ["search", "--epochs", "1", "--channels", "2", "--layers", "3", "--batch-size", "4",
          "--max-train-images", "16", "--threads", "1"]


@pytest.mark.parametrize("args, fragment", [
    (["--energy-budget", "0.5"], "--energy-budget needs --multipliers"),
    (["--multipliers", "exact,mul8u_17KS", "--energy-budget", "0"], "--energy-budget must lie in (0, 1]"),
    (["--multipliers", "exact,mul8u_17KS", "--energy-budget", "1.5"], "--energy-budget must lie in (0, 1]"),
    (["--multipliers", "exact,mul8u_17KS", "--energy-budget", "0.5", "--energy-weight", "1"], "not both"),
    (["--multipliers", "exact,mul8u_17KS", "--energy-budget", "0.5", "--budget-step", "0"], "--budget-step"),
    (["--energy-weight", "1"], "no multiplier to choose"),
    (["--multipliers", "exact,mul8u_17KS", "--energy-scope", "ops"], "--energy-scope"),
    (["--max-parameter-free", "9"], "--max-parameter-free"),
    (["--warmup-epochs", "1"], "--warmup-epochs"),
    (["--multipliers", "exact,mul8u_17KS", "--beta-lr", "0"], "--beta-lr"),
    (["--multipliers", "exact,mul8u_17KS", "--gumbel-temperature", "5:0"], "--gumbel-temperature"),
    (["--multipliers", "exact,mul8u_17KS", "--gumbel-temperature", "5:1:2"], "--gumbel-temperature"),
    (["--multipliers", "exact,mul8u_17KS", "--gumbel-temperature", "hot"], "--gumbel-temperature"),
    (["--multipliers", "exact,mul8u_17KS", "--energy-budget", "0.5", "--sensitivity-images", "0"],
     "--sensitivity-images"),
    (["--multipliers", "exact,mul8u_17KS", "--energy-budget", "0.5", "--allocation", "best"], "--allocation"),
])
def test_bad_budget_options_are_one_line(tmp_path, args, fragment):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, SEARCH + ["--output-dir", str(out)] + args)
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert not (out / "config.json").exists()


@pytest.mark.parametrize("args", [
    ["--multipliers", "exact,mul8u_17KS", "--energy-weight", "1", "--energy-target", "1000"],
    ["--multipliers", "exact,mul8u_17KS", "--energy-weight", "1", "--energy-scope", "all"],
    ["--arithmetic", "mul8u_17KS", "--energy-weight", "1", "--energy-scope", "all"],
    ["--multipliers", "exact,mul8u_17KS,mul8u_L40", "--energy-budget", "0.6", "--warmup-epochs", "0",
     "--beta-lr", "0.02", "--gumbel-temperature", "3:1", "--max-parameter-free", "1", "--budget-step", "2",
     "--sensitivity-images", "4"],
    ["--multipliers", "exact,mul8u_17KS,mul8u_L40", "--energy-budget", "0.6", "--allocation", "beta"],
])
def test_every_energy_option_runs_end_to_end(tmp_path, args):
    import json

    out = tmp_path / "out"
    result = CliRunner().invoke(app, SEARCH + ["--output-dir", str(out)] + args)
    assert result.exit_code == 0, result.output
    assert (out / "genotype.json").exists()
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    if "--energy-budget" in args:  # the sensitivities are measured only for the default allocation
        assert ("sensitivity" in last) == ("--allocation" not in args)
        assert last["genotype_energy_ratio"] <= 0.6


def test_the_sensitivity_images_are_the_first_of_the_architecture_val_half(tmp_path, monkeypatch):
    """--sensitivity-images N measures on the first N architecture-val images, never on weight-train ones."""
    import approxdarts_np.runs.search as search_module

    seen = []
    real = search_module.BatchLoader

    def recording(x, y, batch_size, **kw):
        seen.append(np.asarray(kw["indices"]).copy())
        return real(x, y, batch_size, **kw)

    searcher = _searcher(tmp_path, warmup_epochs=0, energy_budget=0.6, epochs=1, sensitivity_images=6)
    monkeypatch.setattr(search_module, "BatchLoader", recording)
    searcher.measure_sensitivity()
    assert len(seen) == 1
    np.testing.assert_array_equal(seen[0], searcher.val_loader.indices[:6])
    assert not set(seen[0]) & set(searcher.train_loader.indices)


# ----------------------------------------------------------------------------- the energy term by hand
def _probabilities(a):
    a = np.asarray(a, np.float64)
    e = np.exp(a - a.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("order", [CANDIDATES, CANDIDATES[::-1]])
def test_the_energy_term_and_its_beta_gradient_by_hand(tmp_path, order):
    """λ·E/E_ref with E_ref priced at the exact 8-bit multiply whatever the candidates' order, and β's gradient
    λ/E_ref · p_op·M · p_k (pJ_k − Σ_j p_j pJ_j), each cell type from its own β."""
    weight = 0.7
    cfg = SearchConfig.quick(output_dir=str(tmp_path), multipliers=",".join(order), energy_weight=weight, **TINY)
    candidates = [arithmetic_from_spec(s) for s in cfg.candidate_specs()]
    searcher = Searcher(cfg, candidates=candidates, energy=energy_prices(candidates, required=True))
    m = searcher.model
    rng = np.random.default_rng(1)
    for p in (m.alphas_normal, m.alphas_reduce, m.betas_normal, m.betas_reduce):
        p.data[...] = rng.standard_normal(p.data.shape).astype(np.float32)
    pj = np.array([PRICES[n] for n in order])
    columns = [PRIMITIVES.index(op) for op in SEARCHED_OPS]
    spent = reference = 0.0
    grads = {}
    for kind in ("normal", "reduce"):
        p_op = _probabilities(getattr(m, f"alphas_{kind}").data)[:, columns]
        p_mul = _probabilities(getattr(m, f"betas_{kind}").data)
        macs = searcher.macs[kind]
        per = (p_mul * pj).sum(-1)
        spent += float((p_op * macs * per).sum())
        reference += float((p_op * macs).sum()) * EXACT_PJ
        grads[kind] = (p_op * macs)[..., None] * p_mul * (pj - per[..., None])
    for p in m.arch_parameters():
        p.grad = None
    penalty = searcher.energy_penalty()
    assert penalty.item() == pytest.approx(weight * spent / reference, rel=1e-5)
    penalty.backward()
    for kind in ("normal", "reduce"):
        expected = weight / reference * grads[kind]
        got = getattr(m, f"betas_{kind}").grad
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
        assert getattr(m, f"alphas_{kind}").grad is None or not getattr(m, f"alphas_{kind}").grad.any()


def test_each_cell_type_takes_its_multipliers_from_its_own_beta(tmp_path):
    searcher = _searcher(tmp_path)
    m = searcher.model
    m.betas_normal.data[...] = 0
    m.betas_reduce.data[...] = 0
    m.betas_normal.data[..., CANDIDATES.index("mul8u_17KS")] = 1
    m.betas_reduce.data[..., CANDIDATES.index("exact")] = 1
    g = m.genotype(2)
    for kind, name in (("normal", "mul8u_17KS"), ("reduce", "exact")):
        for (op, _), mult in zip(getattr(g, kind), g.multipliers(kind)):
            assert mult == (name if op in SEARCHED_OPS else None)


NEW_SETTINGS = ("energy_budget", "budget_step", "energy_scope", "max_parameter_free", "warmup_epochs", "beta_lr",
                "gumbel_temperature_end", "budget_channels", "budget_layers")


def test_a_multiplier_search_saved_before_the_budget_settings_resumes_as_it_ran(tmp_path):
    """An older run folder (no budget settings in config.json, one Adam over α and β in the checkpoint)
    resumes with the behaviour it had: energy scope all, no cap, no warm-up, β at α's learning rate."""
    import json

    from approxdarts_np.io.checkpoint import save_tree
    from approxdarts_np.runs.config import resolve_run_config

    out = tmp_path / "old"
    run_search(SearchConfig.quick(output_dir=str(out), multipliers="exact,mul8u_17KS", energy_weight=1.0,
                                  energy_scope="all", max_parameter_free=8, warmup_epochs=0, **{**TINY, "epochs": 1}))
    config = json.loads((out / "config.json").read_text())
    for key in NEW_SETTINGS:
        config.pop(key)
    (out / "config.json").write_text(json.dumps(config))
    tree = load_tree(out / "checkpoint.h5")
    a, b = tree["a_optimizer"], tree.pop("b_optimizer")
    tree["a_optimizer"] = {**a, "state": list(a["state"]) + list(b["state"])}
    tree["config"] = json.dumps({k: v for k, v in json.loads(tree["config"]).items() if k not in NEW_SETTINGS})
    save_tree(out / "checkpoint.h5", tree)
    loaded, _ = resolve_run_config(SearchConfig, None, out, {"epochs": 2})
    assert (loaded.energy_scope, loaded.max_parameter_free, loaded.warmup(), loaded.beta_lr) == \
        ("all", 8, 0, loaded.arch_lr)
    run_search(resume=out, overrides={"epochs": 2})
    assert len(metrics_without_times(out)) == 2


def test_a_sweep_lambda_on_one_multiplier_moves_the_ops_and_on_a_choice_the_multipliers(tmp_path):
    from approxdarts_np.runs.sweep_trials import SweepConfig

    sweep = SweepConfig(multipliers=["mul8u_17KS", "exact+mul8u_17KS"], seeds=[0], energy_weights=[0.0, 1.0],
                        stage="search", output_dir=str(tmp_path))
    one = sweep.run_config("search", "mul8u_17KS", 0, tmp_path / "a", 1, 1.0)
    choice = sweep.run_config("search", "exact+mul8u_17KS", 0, tmp_path / "b", 1, 1.0)
    plain = sweep.run_config("search", "mul8u_17KS", 0, tmp_path / "c", 1, 0.0)
    for config in (one, choice, plain):
        config.validate()
    assert (one.energy_scope, choice.energy_scope, plain.energy_scope) == ("all", "beta", "beta")


# ----------------------------------------------------------------------------- allocation by sensitivity
def _increases(rng, g):
    out = {}
    for kind in ("normal", "reduce"):
        for k, (op, _) in enumerate(getattr(g, kind)):
            if op in SEARCHED_OPS:
                losses = np.abs(rng.standard_normal(len(CANDIDATES))) * 1e-2
                losses[0] = 0.0  # exact is the reference
                out[(kind, k)] = losses
    return out


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), budget=st.floats(CHEAPEST, 1.0))
def test_the_sensitivity_allocation_always_meets_the_budget_and_needs_every_move(seed, budget):
    from approxdarts_np.nas.budget import allocate_by_sensitivity

    rng = np.random.default_rng(seed)
    g = random_genotype(rng, CANDIDATES)
    allocated, moves = allocate_by_sensitivity(g, _increases(rng, g), CANDIDATES, PJ, EXACT_PJ, budget)
    assert energy_ratio(allocated, PRICES, EXACT_PJ) <= budget + 1e-12
    assert allocated.without_multipliers() == g.without_multipliers()
    for kind in ("normal", "reduce"):
        for (op, _), name in zip(getattr(allocated, kind), allocated.multipliers(kind)):
            assert (name is not None) == (op in SEARCHED_OPS)
    # every cheapened op is needed: putting it back on exact breaks the budget
    for kind in ("normal", "reduce"):
        for k, name in enumerate(allocated.multipliers(kind)):
            if name in (None, "exact"):
                continue
            names = list(allocated.multipliers(kind))
            names[k] = "exact"
            other = "reduce" if kind == "normal" else "normal"
            undone = Genotype(g.normal, g.normal_concat, g.reduce, g.reduce_concat,
                              **{f"{kind}_multipliers": names, f"{other}_multipliers": allocated.multipliers(other)})
            assert energy_ratio(undone, PRICES, EXACT_PJ) > budget
    if budget >= 1.0:
        assert not moves


def test_the_sensitivity_allocation_cheapens_where_it_costs_least_loss_per_pj():
    from approxdarts_np.nas.budget import allocate_by_sensitivity

    g = Genotype(normal=[("sep_conv_3x3", 0), ("sep_conv_3x3", 1)] * 4, normal_concat=(2, 3, 4, 5),
                 reduce=[("sep_conv_3x3", 0), ("sep_conv_3x3", 1)] * 4, reduce_concat=(2, 3, 4, 5))
    # every op is hurt badly by any cheaper multiplier, except normal op 3, where 17KS is free
    increase = {(kind, k): np.array([0.0, 1.0, 1.0, 1.0]) for kind in ("normal", "reduce") for k in range(8)}
    increase[("normal", 3)] = np.array([0.0, 1.0, 0.0, 1.0])
    full = energy_ratio(g, PRICES, EXACT_PJ)
    allocated, moves = allocate_by_sensitivity(g, increase, CANDIDATES, PJ, EXACT_PJ, full - 1e-9)
    assert [(m["cell"], m["op"], m["to"]) for m in moves] == [("normal", 3, "mul8u_17KS")]
    assert allocated.multipliers("normal")[3] == "mul8u_17KS"
    assert set(allocated.multipliers("reduce")) == {"exact"}


def test_sensitivity_is_zero_at_the_reference_larger_for_a_broken_table_and_leaves_the_model_as_it_was(tmp_path):
    """A table of zeros wrecks any op it runs in; the nearly exact mul8u_1446 hardly changes the loss. The
    measurement restores every weight and BN statistic it touched."""
    from approxdarts_np.autodiff import Tensor, no_grad
    from approxdarts_np.autodiff import functional as F
    from approxdarts_np.nas.multiplier_choice import MultiplierNetwork, multiplier_sensitivity

    zeros = tmp_path / "zeros.npy"
    np.save(zeros, np.zeros((256, 256), np.int64))
    arithmetics = [arithmetic_from_spec(s) for s in ("exact", "mul8u_1446", str(zeros))]
    net = MultiplierNetwork(4, 10, 3, candidates=arithmetics, seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, 8)
    g = net.genotype(8)
    before = net.state_dict()

    def loss_of():
        with no_grad():
            return F.cross_entropy(net(Tensor(x)), y).item()

    net.train()
    increase = multiplier_sensitivity(net, g, loss_of, reference=0)
    searched = [(kind, k) for kind in ("normal", "reduce") for k, (op, _) in enumerate(getattr(g, kind))
                if op in SEARCHED_OPS]
    assert sorted(increase) == sorted(searched)
    for losses in increase.values():
        assert losses[0] == 0.0
    assert np.median([abs(v[2]) for v in increase.values()]) > 10 * np.median([abs(v[1]) for v in increase.values()])
    after = net.state_dict()
    for key in before:
        if "running" not in key and "num_batches" not in key:
            np.testing.assert_array_equal(before[key], after[key], err_msg=key)
    assert net.choice is None  # back on the argmax-β multipliers


def test_a_budgeted_search_restores_its_model_after_measuring_and_writes_the_allocated_genotype(tmp_path):
    searcher = _searcher(tmp_path, warmup_epochs=0, energy_budget=0.6, epochs=1, sensitivity_images=8)
    searcher.begin_epoch(0)
    for step in range(searcher.steps_per_epoch):
        searcher.step(0, step)
    searcher.model.choose_most_likely()
    before = searcher.model.state_dict()
    searcher.measure_sensitivity()
    after = searcher.model.state_dict()
    for key in before:
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)
    genotype = searcher.genotype()
    assert energy_ratio(genotype, PRICES, EXACT_PJ) <= 0.6
    beta, _ = searcher.beta_projection(searcher.model.genotype(2))
    assert genotype.without_multipliers() == beta.without_multipliers()
