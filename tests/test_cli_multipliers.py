"""`approxdarts-np multipliers`: listing, `show`, JSON output and one-line errors."""
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from approxdarts_np.approx.multipliers import BUNDLED_PREFIX, bundled_names, exact_table
from approxdarts_np_cli.main import app

runner = CliRunner()


def _one_error_line(result, *fragments):
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_listing_has_one_row_per_bundled_table():
    result = runner.invoke(app, ["multipliers"], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    names = [n.removeprefix(BUNDLED_PREFIX) for n in bundled_names()]
    rows = [line for line in lines if line.split() and line.split()[0] in names]
    assert len(rows) == 36
    assert "DIFF" not in result.stdout


def test_listing_json():
    result = runner.invoke(app, ["multipliers", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    entries = payload["multipliers"]
    assert [e["name"] for e in entries] == bundled_names()
    assert all(e["mismatches"] == [] for e in entries)
    assert sum(e["published"] is None for e in entries) == 4
    ranks = {e["name"]: e["measured"]["rank"] for e in entries}
    assert ranks["mul8u_2P7"] == 6 and ranks["mul8u_17KS"] == 19
    assert "mre%" in payload["definitions"]


def test_show_bundled():
    result = runner.invoke(app, ["multipliers", "show", "2P7"])
    assert result.exit_code == 0, result.output
    assert "mul8u_2P7" in result.stdout and "check: ok" in result.stdout
    data = json.loads(runner.invoke(app, ["multipliers", "show", "mul8u_2P7", "--json"]).stdout)
    assert data["name"] == "mul8u_2P7" and data["measured"]["rank"] == 6
    assert data["published"]["pwr"] == 0.386


def test_show_user_bin_and_npy(tmp_path):
    table = exact_table()
    table[10, 10] += 3
    path = tmp_path / "my_mul.bin"
    table.astype("<u2").tofile(path)
    result = runner.invoke(app, ["multipliers", "show", str(path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["name"] == "my_mul" and data["published"] is None and data["mismatches"] == []
    assert data["measured"]["rank"] == 1 and data["measured"]["max_abs_error"] == 3
    assert data["measured"]["ep%"] == pytest.approx(100 / 65536)
    npy = tmp_path / "my_mul.npy"
    np.save(npy, table)
    result = runner.invoke(app, ["multipliers", "show", str(npy)])
    assert result.exit_code == 0, result.output
    assert "my_mul" in result.stdout and "exact: no" in result.stdout


def test_bad_file_is_one_line_exit_2(tmp_path):
    path = tmp_path / "broken.bin"
    path.write_bytes(b"\x00" * 100)
    _one_error_line(runner.invoke(app, ["multipliers", "show", str(path)]), "broken.bin", "bytes")


def test_missing_file_and_unknown_name_are_one_line_exit_2(tmp_path):
    _one_error_line(runner.invoke(app, ["multipliers", "show", str(tmp_path / "nope.npy")]),
                    "nope.npy", "not found")
    _one_error_line(runner.invoke(app, ["multipliers", "show", "NOPE"]), "NOPE", "2P7")
