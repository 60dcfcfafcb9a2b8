"""A checkpoint changed after it was written is refused with one line, never resumed or evaluated silently.

Each case damages a copy of a finished tiny run the way a user or a disk
might (h5py edits, a raw byte flip, NaN, another α, another seed in
config.json) and checks that ``--resume`` (or ``evaluate``) exits 2 with one
line naming the problem, and that the files are left as they were.
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from approxdarts_np.io.checkpoint import load_tree, save_tree
from approxdarts_np.nas.genotypes import DARTS_V2
from approxdarts_np.runs.loop import read_run_checkpoint
from approxdarts_np.runs.search import SearchConfig, run_search
from approxdarts_np.runs.train import TrainConfig, run_train
from approxdarts_np_cli.main import app
from run_helpers import copy_run, one_error_line

runner = CliRunner()
WEIGHT = "model/cells.items.0.preprocess0.op.layers.1.weight"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    run_search(SearchConfig.quick(output_dir=str(root / "search"), epochs=1, channels=2, layers=3, batch_size=4,
                                  max_train_images=16, threads=1))
    run_train(TrainConfig.quick(output_dir=str(root / "train"), epochs=1, channels=2, layers=3, batch_size=4,
                                max_train_images=8, threads=1, seed=1, genotype=DARTS_V2.to_dict()))
    return root


def refused_resume(folder: Path, *fragments) -> str:
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    line = one_error_line(runner.invoke(app, ["search", "--resume", str(folder), "--epochs", "2"]), *fragments)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    return line


def test_the_search_weight_used_below_exists(runs):
    with h5py.File(runs / "search" / "checkpoint.h5", "r") as f:
        assert f[WEIGHT].size > 0 and f[WEIGHT].dtype == np.float32


def test_every_array_is_stored_with_fletcher32_and_a_sha256(runs):
    with h5py.File(runs / "search" / "checkpoint.h5", "r") as f:
        assert "tree_sha256" in f.attrs
        datasets = []
        f.visititems(lambda name, item: datasets.append(item) if isinstance(item, h5py.Dataset) else None)
        assert len(datasets) > 100
        for dataset in datasets:
            assert len(dataset.attrs["sha256"]) == 64
            assert dataset.fletcher32 == (dataset.size > 0 and dataset.ndim > 0), dataset.name


def test_weight_changed_by_one_with_h5py(runs, tmp_path):
    out = copy_run(runs, "search", tmp_path)
    with h5py.File(out / "checkpoint.h5", "r+") as f:
        f[WEIGHT][0, 0, 0, 0] += 1  # h5py writes a fresh Fletcher32 sum: only the SHA-256 can tell
    refused_resume(out, "checkpoint.h5", WEIGHT.split("/")[1], "does not match its checksum")


def test_raw_byte_flipped_inside_a_weight(runs, tmp_path):
    out = copy_run(runs, "search", tmp_path)
    with h5py.File(out / "checkpoint.h5", "r") as f:
        dataset = f[WEIGHT]
        if dataset.chunks is None:
            offset, size = dataset.id.get_offset(), dataset.id.get_storage_size()
        else:
            chunk = dataset.id.get_chunk_info(0)
            offset, size = chunk.byte_offset, chunk.size
    with open(out / "checkpoint.h5", "r+b") as handle:
        handle.seek(offset + size // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0x10]))
    refused_resume(out, "checkpoint.h5", "is damaged", WEIGHT.split("/")[1])


def test_nan_written_into_a_weight(runs, tmp_path):
    out = copy_run(runs, "search", tmp_path)
    with h5py.File(out / "checkpoint.h5", "r+") as f:
        f[WEIGHT][0, 0, 0, 0] = np.nan
    refused_resume(out, "checkpoint.h5", WEIGHT.split("/")[1])


def test_nan_in_a_checkpoint_with_valid_checksums(runs, tmp_path):
    """A file whose checksums were rewritten (or an old file without them) is still refused for its NaN."""
    out = copy_run(runs, "search", tmp_path)
    tree = load_tree(out / "checkpoint.h5")
    tree["model"][WEIGHT.split("/")[1]][0, 0, 0, 0] = np.inf
    save_tree(out / "checkpoint.h5", tree)
    refused_resume(out, "non-finite values in " + WEIGHT)


def test_alpha_changed_in_the_checkpoint(runs, tmp_path):
    out = copy_run(runs, "search", tmp_path)
    with h5py.File(out / "checkpoint.h5", "r+") as f:
        f["model/alphas_normal"][...] = f["model/alphas_normal"][...] * 2
    refused_resume(out, "alphas_normal", "does not match its checksum")


def test_position_attribute_edited(runs, tmp_path):
    out = copy_run(runs, "search", tmp_path)
    with h5py.File(out / "checkpoint.h5", "r+") as f:
        f["position"].attrs["elapsed"] = 0.5
    refused_resume(out, "checkpoint.h5", "changed after it was written")


@pytest.mark.parametrize("setting, value", [("seed", 7), ("lr", 0.5), ("arch_lr", 0.01)])
def test_config_json_edited(runs, tmp_path, setting, value):
    out = copy_run(runs, "search", tmp_path)
    config = json.loads((out / "config.json").read_text())
    was = config[setting]
    config[setting] = value
    (out / "config.json").write_text(json.dumps(config))
    refused_resume(out, "config.json does not match", f"{setting} is {value!r} there but {was!r} in the checkpoint")


def test_evaluate_refuses_an_edited_train_checkpoint(runs, tmp_path):
    out = copy_run(runs, "train", tmp_path)
    with h5py.File(out / "checkpoint.h5", "r+") as f:
        name = next(k for k in f["model"] if k.endswith("weight"))
        f["model"][name][...] = f["model"][name][...] + 1
    one_error_line(runner.invoke(app, ["evaluate", "--checkpoint", str(out / "checkpoint.h5")]),
                   name, "does not match its checksum")


def test_checkpoint_without_checksums_still_resumes(runs, tmp_path):
    """A checkpoint from before the checksums (no sha256 attributes, no tree digest) loads and resumes."""
    out = copy_run(runs, "search", tmp_path)
    tree = load_tree(out / "checkpoint.h5")
    with h5py.File(out / "checkpoint.h5", "r+") as f:
        del f.attrs["tree_sha256"]
        f.visititems(lambda name, item: item.attrs.__delitem__("sha256") if "sha256" in item.attrs else None)
    with h5py.File(out / "checkpoint.h5", "r") as f:
        assert "tree_sha256" not in f.attrs and "sha256" not in f[WEIGHT].attrs
    loaded = read_run_checkpoint(out / "checkpoint.h5", "search")
    assert np.array_equal(loaded["model"]["alphas_normal"], tree["model"]["alphas_normal"])
    result = runner.invoke(app, ["search", "--resume", str(out), "--epochs", "2", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
