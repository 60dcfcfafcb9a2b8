"""The command-line options come from the config classes: one option per field declared with help, its help
showing the presets' defaults, and typed values turned into the config's fields."""
import dataclasses
from pathlib import Path

import pytest
import typer

from approxdarts_np.runs.config import RunSettings
from approxdarts_np.runs.search import SearchConfig
from approxdarts_np.runs.sweep_trials import PASSED_THROUGH, SweepConfig
from approxdarts_np.runs.train import TrainConfig
from approxdarts_np_cli.main import app
from approxdarts_np_cli.options import Preset, config_values, option_fields

COMMANDS = typer.main.get_command(app).commands
EXTRA = {"search": {"address", "resume"}, "train": {"resume"}, "sweep": {"address", "resume"}}


def _params(command: str) -> dict:
    return {p.name: p for p in COMMANDS[command].params}


@pytest.mark.parametrize("command, cls", [("search", SearchConfig), ("train", TrainConfig), ("sweep", SweepConfig)])
def test_every_field_with_help_is_an_option_and_nothing_else(command, cls):
    names = {f.name for f in option_fields(cls)}
    if command == "sweep":
        names |= set(PASSED_THROUGH)
    assert set(_params(command)) == names | EXTRA[command]
    # Fields a user cannot set from the command line stay out.
    assert "arch_betas" not in names and "budget_channels" not in names and "gumbel_temperature_end" not in names
    assert "run_options" not in names and "eval_batch_size" not in names


def test_help_shows_each_presets_default():
    search, train, sweep = _params("search"), _params("train"), _params("sweep")
    assert search["epochs"].help.endswith("[quick 4, paper 50]")
    assert train["epochs"].help.endswith("[quick 2, paper 600]")
    assert search["max_train_images"].help.endswith("[quick 2560, paper all]")
    assert search["threads"].help.endswith("[all cores]")
    assert search["weight_decay"].help.endswith("[0.0003]")
    assert train["seed"].help.startswith("Seed of weights, data order, augmentation and drop-path")
    assert "[" not in search["multipliers"].help
    assert sweep["epochs"].help.endswith("[search: quick 4, paper 50; train: quick 2, paper 600]")
    assert sweep["max_failures"].help.endswith("[3]")
    assert search["arithmetic"].opts == ["--arithmetic", "--multiplier"]


def test_typed_values_become_config_fields():
    values = config_values(SearchConfig, dict(
        max_train_images=0, gumbel_temperature="2:0.5", output_dir=Path("out"), preset=Preset.paper,
        epochs=3, seed=None))
    assert values == dict(max_train_images=None, gumbel_temperature=2.0, gumbel_temperature_end=0.5,
                          output_dir="out", preset="paper", epochs=3)
    assert config_values(SearchConfig, dict(gumbel_temperature="1.5")) == dict(gumbel_temperature=1.5,
                                                                               gumbel_temperature_end=None)
    sweep = config_values(SweepConfig, dict(seeds="0,2", energy_weights="0,1.5", multipliers="exact,mul8u_2P7"))
    assert sweep == dict(seeds=[0, 2], energy_weights=[0.0, 1.5], multipliers=["exact", "mul8u_2P7"])
    assert config_values(TrainConfig, dict(genotype="DARTS_V2"))["genotype"]["normal"]


def test_a_subclass_default_keeps_the_settings_help():
    base = {f.name: f for f in dataclasses.fields(RunSettings)}
    train = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name in ("epochs", "layers", "max_train_images", "lr_min"):
        assert train[name].default != base[name].default
        assert train[name].metadata["help"] == base[name].metadata["help"]


def test_cli_run_gets_the_typed_settings(tmp_path, monkeypatch):
    """The command builds the config the options name (the run itself replaced)."""
    from typer.testing import CliRunner

    import approxdarts_np_cli.search as search_cli

    seen = {}

    def fake_run(config, progress=None, address=None):
        seen["config"] = config
        return {"val_acc": None, "epochs": 1, "elapsed_s": 0.0, "genotype_string": "g"}

    monkeypatch.setattr(search_cli, "run_search", fake_run)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["search", "--preset", "paper", "--epochs", "3", "--max-train-images", "0",
                                      "--multiplier", "exact", "--gumbel-temperature", "2:0.5",
                                      "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    config = seen["config"]
    assert (config.preset, config.epochs, config.channels, config.max_train_images) == ("paper", 3, 16, None)
    assert (config.arithmetic, config.gumbel_temperature, config.gumbel_temperature_end) == ("exact", 2.0, 0.5)
    assert config.output_dir == str(out)


LAUNCH = "import sys; sys.argv[0] = 'approxdarts-np'; from approxdarts_np_cli.launch import main; main()"


@pytest.mark.parametrize("args, says", [
    (["search", "--epochs", "x"], "Invalid value for '--epochs'"),
    (["search", "--bogus"], "No such option: --bogus"),
    (["train", "--preset", "huge"], "Invalid value for '--preset'"),
    (["sweep", "--seeds"], "'--seeds' requires an argument"),
    (["nosuch"], "No such command 'nosuch'"),
])
def test_a_bad_command_line_is_one_line_and_exit_2(args, says):
    """Typer's own errors (a value of the wrong type, an unknown option or command) answer as every other
    bad input: one line on stderr, exit 2, nothing on stdout, no usage box."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", LAUNCH, *args], capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], done.stderr
    assert done.stdout == "" and "Usage" not in done.stderr


def test_no_command_still_prints_the_help():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", LAUNCH], capture_output=True, text=True, timeout=120)
    assert "Commands" in done.stdout + done.stderr and "search" in done.stdout + done.stderr
