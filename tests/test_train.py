"""Training, evaluation and energy commands end to end on tiny settings; exact resume of training."""
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from approxdarts_np.errors import UserError
from approxdarts_np.nas.genotypes import DARTS_V2
from approxdarts_np.runs.loop import RunInterrupted
from approxdarts_np.runs.report import network_energy
from approxdarts_np.nas.genotypes import read_genotype
from approxdarts_np.runs.train import TrainConfig, load_trained_network, run_train
from approxdarts_np_cli.main import app
from run_helpers import ctrl_c_at, metrics_without_times

TINY = dict(epochs=2, channels=4, layers=3, batch_size=4, max_train_images=12, threads=2, seed=3,
            genotype=DARTS_V2.to_dict())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    summary = run_train(TrainConfig.quick(output_dir=str(out), **TINY))
    return out, summary


def test_training_writes_metrics_and_a_loadable_checkpoint(trained):
    out, summary = trained
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert metrics[0]["drop_path_prob"] == 0.0 and metrics[1]["drop_path_prob"] == pytest.approx(0.1)
    model, config = load_trained_network(out / "checkpoint.h5")
    assert config.channels == 4 and not model.training
    assert 0 <= summary["test_acc"] <= 1


def test_ctrl_c_then_resume_matches_uninterrupted_training(trained, tmp_path):
    ref_out, _ = trained
    out = tmp_path / "interrupted"

    progress = ctrl_c_at(1, epoch=1)
    with pytest.raises(RunInterrupted):
        run_train(TrainConfig.quick(output_dir=str(out), **TINY), progress=progress)
    run_train(resume=out)
    ours, _ = load_trained_network(out / "checkpoint.h5")
    ref, _ = load_trained_network(ref_out / "checkpoint.h5")
    for (name, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        np.testing.assert_array_equal(a, b, err_msg=name)
    # the resumed epoch's sums (train loss and accuracy) are those of the uninterrupted run
    assert metrics_without_times(out) == metrics_without_times(ref_out)


def test_cli_evaluate_and_energy(trained, tmp_path):
    out, _ = trained
    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", "--checkpoint", str(out / "checkpoint.h5"), "--arithmetic",
                                 "none,exact,mul8u_1446", "--json", "--output", str(tmp_path / "t.csv")])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["arithmetic"] for r in rows] == ["none", "exact", "mul8u_1446"]
    assert rows[0]["saving_vs_fp32_pct"] == 0 and rows[1]["saving_vs_exact8_pct"] == 0
    assert (tmp_path / "t.csv").read_text().startswith("arithmetic,test_acc")

    result = runner.invoke(app, ["energy", "--genotype", "DARTS_V2", "--channels", "4", "--layers", "3",
                                 "--arithmetic", "mul8u_17KS", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in ("parameters", "macs", "energy_fp32_pj", "energy_exact8_pj", "energy_approx_pj"):
        assert key in data
    assert data["energy_approx_pj"] < data["energy_exact8_pj"] < data["energy_fp32_pj"]

    bad = runner.invoke(app, ["evaluate", "--checkpoint", str(tmp_path / "missing.h5")])
    assert bad.exit_code == 2 and "missing.h5" in bad.output


def test_energy_totals_follow_the_energy_table():
    report, params = network_energy(DARTS_V2, 4, 3, "exact")
    fp32 = sum(row.macs for row in report.layers) * 3.7
    exact = sum(row.macs * (0.2 if row.quantised else 3.7) for row in report.layers)
    assert report.energy_fp32_pj == pytest.approx(fp32, rel=1e-12)
    assert report.energy_exact8_pj == pytest.approx(exact, rel=1e-12)
    assert params > 0


def test_genotype_inputs(tmp_path):
    (tmp_path / "g.txt").write_text(DARTS_V2.to_darts_string())
    (tmp_path / "g.json").write_text(DARTS_V2.to_json())
    assert read_genotype(tmp_path / "g.txt") == DARTS_V2 == read_genotype(tmp_path / "g.json")
    assert read_genotype(DARTS_V2.to_darts_string()) == DARTS_V2
    (tmp_path / "bad.txt").write_text("Genotype(normal=[('conv_9x9', 0)])")
    with pytest.raises(UserError):
        read_genotype(tmp_path / "bad.txt")
    with pytest.raises(UserError, match="does not exist"):
        read_genotype(tmp_path / "nope.json")


def test_evaluate_runs_in_eval_mode():
    """Batch norm with running statistics: the result does not depend on the batch size, the running
    statistics do not move, and the model comes back in the mode it was in."""
    from approxdarts_np.autodiff import Tensor, no_grad
    from approxdarts_np.autodiff import functional as F
    from approxdarts_np.data.augment import normalize
    from approxdarts_np.data.cifar import load_cifar10
    from approxdarts_np.nas.model_eval import NetworkCIFAR
    from approxdarts_np.runs.evaluate import evaluate

    data = load_cifar10()
    images, labels = data.test_x[:12], data.test_y[:12]
    model = NetworkCIFAR(DARTS_V2, 4, 10, 3, auxiliary=False, seed=1)
    rng = np.random.default_rng(0)
    for name, value in model.state_dict().items():  # running statistics far from a batch's own
        if name.endswith("running_mean"):
            value[...] = rng.normal(0, 1, value.shape)
        elif name.endswith("running_var"):
            value[...] = rng.uniform(0.5, 4, value.shape)
    before = {k: v.copy() for k, v in model.state_dict().items()}
    model.train()
    one = evaluate(model, images, labels, batch_size=1)
    twelve = evaluate(model, images, labels, batch_size=12)
    assert model.training
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)
    assert one[1] == twelve[1] and one[0] == pytest.approx(twelve[0], rel=1e-5)
    model.eval()
    with no_grad():
        logits, _ = model(Tensor(normalize(images)))
    assert twelve[0] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)


def test_evaluate_genotype_runs_each_op_with_the_genotype_multiplier(trained, tmp_path):
    """`evaluate --multiplier genotype` computes with the multipliers the genotype names, per op, in the
    accuracy and in the energy, and the FP32 row does not."""
    from approxdarts_np.approx.arithmetic import arithmetic_from_spec
    from approxdarts_np.data.cifar import load_cifar10
    from approxdarts_np.nas.genotypes import Genotype
    from approxdarts_np.nas.multiplier_choice import set_genotype_multipliers
    from approxdarts_np.runs.evaluate import evaluate
    from approxdarts_np.runs.report import evaluate_checkpoint

    def pick(pairs):
        return [("mul8u_17KS" if op.startswith("sep") else "exact") if op.startswith(("sep", "dil")) else None
                for op, _ in pairs]

    genotype = Genotype(DARTS_V2.normal, DARTS_V2.normal_concat, DARTS_V2.reduce, DARTS_V2.reduce_concat,
                        normal_multipliers=pick(DARTS_V2.normal), reduce_multipliers=pick(DARTS_V2.reduce))
    out = tmp_path / "train"
    run_train(TrainConfig.quick(output_dir=str(out), **dict(TINY, epochs=1, genotype=genotype.to_dict()),
                                arithmetic="none"))
    rows = {r["arithmetic"]: r for r in evaluate_checkpoint(out / "checkpoint.h5", ["genotype", "none"],
                                                             batch_size=200)}
    model, _ = load_trained_network(out / "checkpoint.h5")
    set_genotype_multipliers(model, genotype, arithmetic_from_spec)
    data = load_cifar10()
    loss, acc = evaluate(model, data.test_x, data.test_y, 200)
    assert rows["genotype"]["test_loss"] == loss and rows["genotype"]["test_acc"] == acc
    assert rows["none"]["test_loss"] != loss
    report, _ = network_energy(genotype, TINY["channels"], TINY["layers"], "genotype")
    assert rows["genotype"]["energy_pj"] == pytest.approx(report.energy_approx_pj, rel=1e-12)
    assert report.energy_approx_pj < report.energy_exact8_pj  # 17KS is cheaper than exact
