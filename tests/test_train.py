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
    result = runner.invoke(app, ["evaluate", "--checkpoint", str(out / "checkpoint.h5"), "--multiplier",
                                 "none,exact,mul8u_1446", "--json", "--output", str(tmp_path / "t.csv")])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["multiplier"] for r in rows] == ["none", "exact", "mul8u_1446"]
    assert rows[0]["saving_vs_fp32_pct"] == 0 and rows[1]["saving_vs_exact8_pct"] == 0
    assert (tmp_path / "t.csv").read_text().startswith("multiplier,test_acc")

    result = runner.invoke(app, ["energy", "--genotype", "DARTS_V2", "--channels", "4", "--layers", "3",
                                 "--multiplier", "mul8u_17KS", "--json"])
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
