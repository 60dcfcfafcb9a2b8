"""Multiplier tables: loading, validation, characterisation vs the published figures, exact rank.

References: the published figures in ``tables/multipliers.json`` (compared to the precision they
are printed with), the ranks quoted in docs/design.md §2, a Fraction-based Gaussian elimination for
``exact_rank`` and float SVD rank as a cross-check.
"""
from fractions import Fraction
from pathlib import Path

import hashlib

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
from approxdarts_np.kernels._util import force_variant
from approxdarts_np.kernels.rank import ranks_mod_primes

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

# SHA-256 of each bundled table *as loaded* (256x256, row-major, little-endian int32): a wrong
# entry in a file, or a loader that transposes, truncates or re-types a table, changes the digest.
# Recompute only when a table deliberately changes:
#   hashlib.sha256(np.ascontiguousarray(load_multiplier(n).table, "<i4").tobytes()).hexdigest()
LOADED_SHA256 = {
    "mul8u_125K": "91f239db2f37c29e42720f161dcb3b30c14d24e7bb1749004a5a17ca23a1764f",
    "mul8u_12N4": "be32a027329d8d1e9acf5c63baa17a358bad1e45f7256e8fd4b3e2ed6b60340f",
    "mul8u_13QR": "670ed5c43e266ce0133161a1995ac618f94e038efaacbc0c1f8d0f55f6f2c02a",
    "mul8u_1446": "5e50e558384413a2a35b475887924f5b7ab80a8adb7af68d67e37bf31069523b",
    "mul8u_14VP": "91e9e64bc2d3ffb4bfedde864ada741ec09cdf9ccb4566ba2d459605ee70a405",
    "mul8u_150Q": "c6ec6e95c07cf448814b07cb89bf8c242dd78d4fec0fa9a0c8a481f602ec8e47",
    "mul8u_17C8": "ce2c694e964fc4d2002becd55d93becf35b7e711273bda34617626a9916439f8",
    "mul8u_17KS": "a84ba0b0bebf25620ea160dcc82ea2dd98388293c4cf8612fe944e44173aaaf3",
    "mul8u_17QU": "e9fcbb4b15f3ffd2022c073e18b0dcde33cec210e7eebff237ee4435f3878155",
    "mul8u_185Q": "b97e5156ac8376a1d61fa2b6afe7578bc66e02c3ce31e67255755cf37cde2dc5",
    "mul8u_18DU": "f24456a22423dac6bf8cb01b13b6ad7d1bb7bc592996f6a0c0400a91ce17f71a",
    "mul8u_199Z": "8a39d2abd3999ab73c34db2476849cddf303ce389b35826850f9a700589b4a90",
    "mul8u_19DB": "8e7662d9546b64ab5adea6ca8ed991808e1ec14256125c9532c87ba54e0e2258",
    "mul8u_1AGV": "fa65bc46b9895120b56bbf8e42dd8c5b1785e7f16a435c755a37828da16244f8",
    "mul8u_1JFF": "f8085fc34b4305c0ded5ce102ee273302045b00677f0504933593571822db644",
    "mul8u_2AC": "a35038a327ce37df35abda2f2dcfaf2205a4162a40b071f0fbd0253f5a9a63aa",
    "mul8u_2HH": "fd634a50e82b8daabb78914e309ebb6073b93206430ec34be3e7c9e2c08f6db6",
    "mul8u_2P7": "71c1d1dfbb236746c9cea95e40e54d1d2b342384b928692e18cad7b583d4cc8b",
    "mul8u_7C1": "d675016b2945f2fe7cb254cb40ec6e035bcc2ca639649db953036941df6a4bdf",
    "mul8u_96D": "f786f7bab690220a2988df361b6a7797c3e690fe510398d4d503424911861945",
    "mul8u_CK5": "127b5ea7c52efea7042eb5395c2c023574244f4d9b369f73c7c77562aaaf05ba",
    "mul8u_DM1": "a43abad631548c3886123b5fe086d79dc2412f3873a58cbb173c910f9c6d3c9f",
    "mul8u_EXZ": "aed0b8ff7b08fed8d03b80eb159e289170551ac6b4695ec92ee4326f728d1e03",
    "mul8u_FTA": "7e110de8aac30c0409d0f472e9c1a2aa86c61632e1a294eb698c8bf304eb5cd3",
    "mul8u_GS2": "77ce23b59f27336213d1c46efadb62203b5830cebbb6048539be207654c8a655",
    "mul8u_JQQ": "a53f765e96f43a3c449dbcc2d865d38d6cf93b7c88b583e30e491f3ce08aab65",
    "mul8u_JV3": "19b066c62b519461ff1a37fb362b6bbff07830cf23fa13316660205abd7844a0",
    "mul8u_KEM": "35bde39037bdc4e3e3379443da4928ad9a5b70b2e5dfff2bde88f90a97a1ac73",
    "mul8u_L40": "ea776e4b19e45e34322a59a539ace8ccce631a852a40440cedbc7503580d522a",
    "mul8u_NGR": "c538b04b735a2beaac8eadc794e9e732a07e3318c762a562d2997a607c6d6e31",
    "mul8u_PKY": "e950595a7fcd3ae87e38d302c812627ad806ef166ac8bd823ff051bc0f27f5c5",
    "mul8u_QJD": "031977db1c351baa5c0d9aae9443303187e60f0e8dec2d6ab1875f6fde32aa9c",
    "mul8u_QKX": "cd11626ac57781e80db033b90b046eadda894bbdd5097a6572dfa47a6fd6c117",
    "mul8u_Y48": "a9ac99b1406d45bfad5e3f7745429e96d8f6ec9206eb53d6a1be82580d34c789",
    "mul8u_YX7": "385e109d468dbb2a1b9a7da7733a733ab0eb588735f718da1400499fe4a2a2d6",
    "mul8u_ZFB": "b4942f0cdfb84e012a2d912dfcb08ab4c4169c615c616e6f47755b35f1af9baa",
}


def _loaded_digest(table: np.ndarray) -> str:
    assert table.shape == (256, 256)
    return hashlib.sha256(np.ascontiguousarray(table, dtype="<i4").tobytes()).hexdigest()


def test_every_bundled_table_is_pinned():
    assert sorted(LOADED_SHA256) == bundled_names()


@pytest.mark.parametrize("name", sorted(LOADED_SHA256))
def test_loaded_table_matches_its_pinned_digest(name):
    table = load_multiplier(name).table
    assert table.dtype == np.int32 and not table.flags.writeable
    assert _loaded_digest(table) == LOADED_SHA256[name]
    # The file read the obvious way gives the same table: the loader adds nothing of its own.
    raw = np.fromfile(TABLES / f"{name}.bin", dtype="<u2").reshape(256, 256)
    np.testing.assert_array_equal(table, raw)


def test_exact_is_the_pinned_exact_circuit():
    assert _loaded_digest(load_multiplier("exact").table) == LOADED_SHA256["mul8u_1JFF"]
    assert _loaded_digest(exact_table()) == LOADED_SHA256["mul8u_1JFF"]


@pytest.mark.parametrize("name", sorted(LOADED_SHA256))
def test_the_tester_one_wrong_entry_breaks_the_digest(name):
    """Test the tester: the smallest possible corruption (one entry off by one) is caught even
    where the published figures, printed to 2 or 3 decimals, cannot see it."""
    table = load_multiplier(name).table.copy()
    a, b = divmod(int(LOADED_SHA256[name][:4], 16), 256)
    table[a, b] = table[a, b] + 1 if table[a, b] < 65535 else table[a, b] - 1
    assert _loaded_digest(table) != LOADED_SHA256[name]


@pytest.mark.parametrize("name", ["mul8u_17KS", "mul8u_2P7", "mul8u_1446"])
def test_published_figures_alone_miss_a_small_corruption(name):
    """Why the digests exist: an entry already in error, moved by one, keeps every published
    figure (printed to 2-3 decimals) matching; only the digest sees it."""
    m = load_multiplier(name)
    table = m.table.copy()
    assert mm.error_matrix(table)[250, 251] != 0
    table[250, 251] += 1
    assert published_mismatches(characterise(table), m.published) == []
    assert _loaded_digest(table) != LOADED_SHA256[name]

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
    ("npz_as_npy", "npz archive"),
    ("pickle_npy", "no NumPy header"),
    ("object_npy", "object and structured"),
    ("structured_npy", "object and structured"),
    ("shape_3d_npy", "shape"),
    ("huge_header_npy", "shape"),
    ("truncated_npy", "truncated"),
    ("trailing_npy", "trailing data"),
    ("long_bin", "131072 bytes"),
    ("empty_bin", "found 0 bytes"),
    ("empty_npy", "no NumPy header"),
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
    elif case == "npz_as_npy":
        with open(path, "wb") as f:
            np.savez(f, table=exact_table())
    elif case == "pickle_npy":
        import pickle
        path.write_bytes(pickle.dumps(exact_table()))
    elif case == "object_npy":
        np.save(path, np.empty((256, 256), dtype=object), allow_pickle=True)
    elif case == "structured_npy":
        np.save(path, np.zeros((256, 256), dtype=[("a", "<u2"), ("b", "<u2")]))
    elif case == "shape_3d_npy":
        np.save(path, np.zeros((1, 256, 256), np.uint16))
    elif case == "huge_header_npy":
        # A header that claims 10^12 entries over a file of a few bytes: nothing is allocated.
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": "<u2", "fortran_order": False, "shape": (10 ** 6, 10 ** 6)})
    elif case == "truncated_npy":
        np.save(path, exact_table().astype(np.uint16))
        path.write_bytes(path.read_bytes()[:-1])
    elif case == "trailing_npy":
        np.save(path, exact_table().astype(np.uint16))
        path.write_bytes(path.read_bytes() + b"\0\0")
    elif case == "long_bin":
        path = tmp_path / "long.bin"
        np.zeros(65537, "<u2").tofile(path)
    elif case == "empty_bin":
        path = tmp_path / "empty.bin"
        path.write_bytes(b"")
    elif case == "empty_npy":
        path.write_bytes(b"")
    with pytest.raises(UserError, match=message) as info:
        load_multiplier(str(path))
    assert path.name in str(info.value) and "\n" not in str(info.value)


def test_huge_bin_is_refused_from_its_size(tmp_path, monkeypatch):
    """A 3 GB .bin (sparse here) is refused from its size; no byte of it is read."""
    path = tmp_path / "huge.bin"
    with open(path, "wb") as f:
        f.truncate(3 * 1024 ** 3)

    def no_read(*args, **kwargs):
        raise AssertionError("the file was read")

    monkeypatch.setattr(Path, "read_bytes", no_read)
    with pytest.raises(UserError, match="found 3221225472 bytes") as info:
        load_multiplier(path)
    assert str(path) in str(info.value)


def test_fortran_order_npy_reads_the_same_table(tmp_path):
    src = load_multiplier("JQQ").table
    path = tmp_path / "f.npy"
    np.save(path, np.asfortranarray(src.astype(np.uint16)))
    np.testing.assert_array_equal(load_multiplier(path).table, src)


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
    for variant in ("serial", "parallel"):
        before = force_variant(variant)
        try:
            np.testing.assert_array_equal(ranks_mod_primes(matrix, np.array([p1, p2], dtype=np.int64)), [1, 2])
        finally:
            force_variant(before)
    with pytest.raises(ValueError, match="int64"):
        ranks_mod_primes(matrix.astype(np.int32), np.array([p1], dtype=np.int64))
    with pytest.raises(ValueError, match="primes"):
        ranks_mod_primes(matrix, np.array([1 << 26], dtype=np.int64))


def test_exact_rank_edge_cases():
    assert exact_rank(np.zeros((4, 5), np.int32)) == 0
    assert exact_rank(np.zeros((0, 3), np.int64)) == 0
    assert exact_rank(np.eye(5, dtype=np.uint8)) == 5
    assert exact_rank(-np.eye(3, dtype=np.int16)) == 3
    with pytest.raises(ValueError):
        exact_rank(np.eye(3))
    with pytest.raises(ValueError):
        exact_rank(np.arange(3))
