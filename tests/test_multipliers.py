"""Multiplier tables: loading, validation, characterisation vs the published figures, exact rank.

References: the published figures in ``tables/multipliers.json`` (compared to the precision they
are printed with), the ranks quoted in DESIGN §4, a Fraction-based Gaussian elimination for
``exact_rank`` and float SVD rank as a cross-check.
"""
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from approxdarts_np.approx import multipliers as mm
from approxdarts_np.approx.multipliers import (
    Multiplier, bundled_names, characterise, exact_rank, exact_table, load_multiplier,
    matches_published, published_mismatches, summarise,
)
from approxdarts_np.errors import UserError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "evoapprox-mul8u"
TABLES = Path(mm.__file__).resolve().parent / "tables"
NO_FIGURES = {"mul8u_199Z", "mul8u_96D", "mul8u_EXZ", "mul8u_PKY"}
DESIGN_RANKS = {"mul8u_1446": 1, "mul8u_Y48": 1, "mul8u_JQQ": 3, "mul8u_2P7": 6,
                "mul8u_7C1": 8, "mul8u_17KS": 19, "mul8u_1JFF": 0}


def _fraction_rank(rows):
    """Rank by plain Gaussian elimination over the rationals (slow, obviously right)."""
    a = [[Fraction(int(v)) for v in row] for row in rows]
    rank, n_cols = 0, len(a[0]) if a else 0
    for c in range(n_cols):
        pivot = next((i for i in range(rank, len(a)) if a[i][c] != 0), None)
        if pivot is None:
            continue
        a[rank], a[pivot] = a[pivot], a[rank]
        for i in range(rank + 1, len(a)):
            f = a[i][c] / a[rank][c]
            if f:
                a[i] = [x - f * y for x, y in zip(a[i], a[rank])]
        rank += 1
    return rank


# ---------------------------------------------------------------------------------- bundle --

def test_bundle_has_36_tables_and_licences():
    names = bundled_names()
    assert len(names) == 36
    assert names == sorted(names)
    assert "mul8u_1JFF" in names and "mul8u_2P7" in names
    for licence in ("LICENSE.evoapproxlib", "LICENSE.tf-approximate"):
        assert (TABLES / licence).is_file()


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared data folder not available")
def test_bundled_files_identical_to_shared_data():
    for src in sorted(SHARED.iterdir()):
        assert (TABLES / src.name).read_bytes() == src.read_bytes(), src.name


def test_spec_forms_resolve_to_the_same_cached_table():
    m = load_multiplier("mul8u_2P7")
    assert load_multiplier("2P7") is m
    assert load_multiplier("2p7") is m
    assert m.name == "mul8u_2P7" and m.source == "mul8u_2P7" and m.is_bundled
    assert m.table.dtype == np.int32 and m.table.shape == (256, 256)
    assert not m.table.flags.writeable
    with pytest.raises(ValueError):
        m.table[0, 0] = 1
    assert m.published["pwr"] == 0.386
    with pytest.raises(TypeError):
        m.published["pwr"] = 1.0


def test_exact_multiplier():
    exact = load_multiplier("exact")
    ref = load_multiplier("mul8u_1JFF")
    assert exact.name == "exact" and exact.is_exact and ref.is_exact
    np.testing.assert_array_equal(exact.table, ref.table)
    assert dict(exact.published) == dict(ref.published)
    assert exact.published["pwr"] == 0.391
    assert not load_multiplier("2P7").is_exact


def test_direct_construction_copies_and_freezes():
    table = exact_table()
    m = Multiplier(name="mine", table=table, source="test")
    assert table.flags.writeable  # the caller's array is untouched
    table[1, 1] = 7
    assert m.table[1, 1] == 1
    with pytest.raises(UserError, match="shape"):
        Multiplier(name="bad", table=np.zeros((255, 256), np.int32), source="test")


# --------------------------------------------------------------------------- file loading --

def test_bin_and_npy_round_trip(tmp_path):
    src = load_multiplier("2P7").table
    bin_path = tmp_path / "mine.bin"
    src.astype("<u2").tofile(bin_path)
    mine = load_multiplier(str(bin_path))
    assert mine.name == "mine" and mine.source == str(bin_path) and mine.published is None
    np.testing.assert_array_equal(mine.table, src)
    for dtype in (np.uint16, np.int64, np.int32):
        npy = tmp_path / f"t_{np.dtype(dtype).name}.npy"
        np.save(npy, src.astype(dtype))
        np.testing.assert_array_equal(load_multiplier(npy).table, src)


def test_big_endian_bin_is_read_as_little_endian(tmp_path):
    path = tmp_path / "be.bin"
    exact_table().astype(">u2").tofile(path)
    assert not load_multiplier(path).is_exact


@pytest.mark.parametrize("case, message", [
    ("missing", "not found"),
    ("short_bin", "131072 bytes"),
    ("float_npy", "integers"),
    ("bool_npy", "integers"),
    ("shape_npy", "shape"),
    ("negative_npy", "0..65535"),
    ("large_npy", "0..65535"),
    ("txt", "unsupported table format"),
    ("corrupt_npy", "not a valid .npy"),
    ("directory", "not a file"),
])
def test_bad_files_raise_user_error_naming_the_file(tmp_path, case, message):
    path = tmp_path / "t.npy"
    if case == "missing":
        path = tmp_path / "absent.bin"
    elif case == "short_bin":
        path = tmp_path / "short.bin"
        np.zeros(65535, "<u2").tofile(path)
    elif case == "float_npy":
        np.save(path, exact_table().astype(np.float32))
    elif case == "bool_npy":
        np.save(path, np.ones((256, 256), bool))
    elif case == "shape_npy":
        np.save(path, np.zeros((16, 16), np.int32))
    elif case == "negative_npy":
        table = exact_table()
        table[0, 0] = -1
        np.save(path, table)
    elif case == "large_npy":
        table = exact_table()
        table[0, 0] = 70000
        np.save(path, table)
    elif case == "txt":
        path = tmp_path / "t.txt"
        path.write_text("1 2 3")
    elif case == "corrupt_npy":
        path.write_bytes(b"not numpy")
    elif case == "directory":
        path = tmp_path / "dir.bin"
        path.mkdir()
    with pytest.raises(UserError, match=message) as info:
        load_multiplier(str(path))
    assert path.name in str(info.value)


def test_unknown_name_lists_valid_names():
    with pytest.raises(UserError, match="unknown multiplier 'XYZ123'") as info:
        load_multiplier("XYZ123")
    assert "2P7" in str(info.value) or "125K" in str(info.value)


# ---------------------------------------------------------------------- characterisation --

@pytest.mark.parametrize("name", bundled_names())
def test_characterisation_reproduces_published_figures(name):
    m = load_multiplier(name)
    measured = characterise(m.table)
    if name in NO_FIGURES:
        assert m.published is None
        return
    assert m.published is not None
    assert published_mismatches(measured, m.published) == []
    assert measured["rank"] == np.linalg.matrix_rank(mm.error_matrix(m.table).astype(np.float64))


def test_exactly_four_circuits_lack_figures():
    assert {n for n in bundled_names() if load_multiplier(n).published is None} == NO_FIGURES


@pytest.mark.parametrize("name, rank", sorted(DESIGN_RANKS.items()))
def test_ranks_quoted_in_design(name, rank):
    assert characterise(load_multiplier(name).table)["rank"] == rank


def test_relative_error_definition_is_the_one_that_matches():
    """Skipping a*b == 0 matches; dividing by max(a*b, 1) or by all 65,536 pairs does not."""
    m = load_multiplier("2AC")
    err = np.abs(mm.error_matrix(m.table)).astype(np.float64)
    exact = exact_table().astype(np.float64)
    with_floor = (err / np.maximum(exact, 1)).mean() * 100
    nz = exact != 0
    over_all_pairs = (err[nz] / exact[nz]).sum() / 65536 * 100
    assert matches_published(characterise(m.table)["mre%"], m.published["mre%"])
    assert not matches_published(with_floor, m.published["mre%"])
    assert not matches_published(over_all_pairs, m.published["mre%"])


def test_characterise_other_fields():
    c = characterise(load_multiplier("2P7").table)
    err = mm.error_matrix(load_multiplier("2P7").table)
    assert c["bias"] == pytest.approx(err.mean())
    assert c["max_abs_error"] == 3
    exact = characterise(exact_table())
    assert exact == {"mae%": 0.0, "wce%": 0.0, "ep%": 0.0, "mre%": 0.0, "wcre%": 0.0,
                     "bias": 0.0, "max_abs_error": 0, "rank": 0}


def test_matches_published_uses_printed_precision():
    assert matches_published(0.018310546875, 0.018)
    assert not matches_published(0.0186, 0.018)
    assert matches_published(9.375, 9.38)       # a tie counts
    assert matches_published(43.96, 44.0)
    assert not matches_published(43.94, 44.0)
    assert matches_published(103.125, 103.12)


@pytest.mark.parametrize("name", ["mul8u_1JFF", "mul8u_2P7", "mul8u_1446", "mul8u_17KS"])
def test_the_tester_corrupted_entry_is_caught(name):
    """Test the tester: one wrong table entry must break the published-figures check."""
    m = load_multiplier(name)
    table = m.table.copy()
    table[3, 5] = (int(table[3, 5]) + 2000) % 65536
    corrupted = Multiplier(name="corrupted", table=table, source="test", published=m.published)
    assert published_mismatches(characterise(corrupted.table), corrupted.published) != []
    if name == "mul8u_1JFF":
        assert not corrupted.is_exact
        assert characterise(corrupted.table)["rank"] == 1


def test_the_tester_small_corruption_of_exact_table():
    table = exact_table()
    table[200, 100] += 1
    corrupted = Multiplier(name="corrupted", table=table, source="test")
    assert not corrupted.is_exact
    assert characterise(table)["rank"] == 1


def test_summarise():
    s = summarise(load_multiplier("2P7"))
    assert set(s) == {"name", "source", "is_exact", "published", "measured", "mismatches"}
    assert s["mismatches"] == [] and s["measured"]["rank"] == 6 and not s["is_exact"]
    assert summarise(load_multiplier("PKY"))["published"] is None


# ---------------------------------------------------------------------------- exact rank --

@st.composite
def _low_rank_matrices(draw):
    n = draw(st.integers(1, 7))
    m = draw(st.integers(1, 7))
    r = draw(st.integers(0, min(n, m)))
    elements = st.integers(-50, 50)
    u = np.array(draw(st.lists(st.lists(elements, min_size=r, max_size=r), min_size=n, max_size=n)),
                 dtype=np.int64).reshape(n, r)
    v = np.array(draw(st.lists(st.lists(elements, min_size=m, max_size=m), min_size=r, max_size=r)),
                 dtype=np.int64).reshape(r, m)
    return u @ v


@given(_low_rank_matrices())
def test_exact_rank_matches_fraction_elimination(matrix):
    assert exact_rank(matrix) == _fraction_rank(matrix.tolist())


def test_exact_rank_when_first_primes_divide_the_minors():
    """The rank modulo the first primes is too low here; the result must still be exact."""
    p1, p2 = mm._primes_below_limit(2)
    assert exact_rank(np.array([[p1, 0], [0, 1]], dtype=np.int64)) == 2
    assert exact_rank(np.array([[p1 * p2, 0], [0, 1]], dtype=np.int64)) == 2
    assert exact_rank(np.array([[p1, p1], [p1, p1 + p1 * p2]], dtype=np.int64)) == 2
    # Test the tester: a single prime alone reports rank 1 for these.
    matrix = np.array([[p1, 0], [0, 1]], dtype=np.int64)
    assert mm._rank_mod_prime_kernel(matrix, p1) == 1
    np.testing.assert_array_equal(
        mm._rank_mod_primes_kernel(matrix, np.array([p1, p2], dtype=np.int64)), [1, 2])


def test_exact_rank_edge_cases():
    assert exact_rank(np.zeros((4, 5), np.int32)) == 0
    assert exact_rank(np.zeros((0, 3), np.int64)) == 0
    assert exact_rank(np.eye(5, dtype=np.uint8)) == 5
    assert exact_rank(-np.eye(3, dtype=np.int16)) == 3
    with pytest.raises(ValueError):
        exact_rank(np.eye(3))
    with pytest.raises(ValueError):
        exact_rank(np.arange(3))
