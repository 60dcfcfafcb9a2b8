"""Approximate (table) convolution: every engine against a plain NumPy table gather, bit for bit.

References used here:
* ``reference_lut_conv`` - explicit loops over (output channel, input channel, tap), each a
  fancy-index gather ``M[patch, w]`` summed in int64, padding filled with the code zx;
* ``integer_conv`` - the integer convolution of (qx - zx) and (qw - zw) through
  ``sliding_window_view`` and ``einsum`` in int64 (no table at all), for the exact multiplier.
"""
import contextlib
import os
import zlib
from importlib import resources
from pathlib import Path

import numba
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from approxdarts_np.approx import lowrank
from approxdarts_np.approx.lowrank import LowRankBoundError
from approxdarts_np.approx.lut_conv import LOWRANK_MAX_TERMS, LutPlan, lut_conv2d, make_lut_plan
from approxdarts_np.kernels import byte_shuffle
from approxdarts_np.kernels import lut_conv as lut_kernels

# the shared data folder next to the repository; the package's bundled copy of the same files
# when the repository is checked out on its own
TABLE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "evoapprox-mul8u"
if not TABLE_DIR.is_dir():
    TABLE_DIR = Path(str(resources.files("approxdarts_np.approx").joinpath("tables")))
BUNDLED = sorted(p.stem.removeprefix("mul8u_") for p in TABLE_DIR.glob("mul8u_*.bin"))


def load_table(name):
    """The .bin table: 65,536 little-endian uint16, row-major [a*256 + b], as int32 (256, 256)."""
    raw = np.fromfile(TABLE_DIR / f"mul8u_{name}.bin", dtype="<u2")
    assert raw.size == 65536
    return raw.reshape(256, 256).astype(np.int32)


def synthetic_table(kind):
    """Tables that exercise paths the EvoApprox set does not: int32 range, float64 fallback."""
    codes = np.arange(256, dtype=np.int64)
    rng = np.random.default_rng(7)
    if kind == "random_int32":
        # full rank, negative entries, values far beyond uint16
        return rng.integers(-(2 ** 20), 2 ** 20, (256, 256)).astype(np.int32)
    if kind == "big_lowrank":
        # rank-2 error with entries up to ~1.8e7: one tap already exceeds 2**24
        u = rng.integers(-3000, 3000, (256, 2))
        v = rng.integers(-3000, 3000, (256, 2))
        return (np.outer(codes, codes) + u @ v.T).astype(np.int32)
    raise ValueError(kind)


def get_table(name):
    return synthetic_table(name) if name in ("random_int32", "big_lowrank") else load_table(name)


def output_size(h, k, s, p, d):
    return (h + 2 * p - d * (k - 1) - 1) // s + 1


def reference_lut_conv(qx, zx, qw, zw, table, stride, padding, dilation, groups):
    """Plain gather: acc = sum over taps of M[x, w] - zw*x - zx*w + zx*zw, in int64."""
    m = np.asarray(table, dtype=np.int64)
    n_img, n_in, h, wd = qx.shape
    n_out, n_in_g, k_h, k_w = qw.shape
    out_h = output_size(h, k_h, stride, padding, dilation)
    out_w = output_size(wd, k_w, stride, padding, dilation)
    xp = np.pad(qx.astype(np.int64), ((0, 0), (0, 0), (padding, padding), (padding, padding)),
                constant_values=zx)
    acc = np.zeros((n_img, n_out, out_h, out_w), np.int64)
    out_per_group = n_out // groups
    for co in range(n_out):
        grp = co // out_per_group
        for cl in range(n_in_g):
            for i in range(k_h):
                for j in range(k_w):
                    r0, c0 = i * dilation, j * dilation
                    patch = xp[:, grp * n_in_g + cl,
                               r0:r0 + stride * (out_h - 1) + 1:stride,
                               c0:c0 + stride * (out_w - 1) + 1:stride]
                    w = int(qw[co, cl, i, j])
                    acc[:, co] += m[patch, w] - zw * patch - zx * w + zx * zw
    return acc


def integer_conv(qx, zx, qw, zw, stride, padding, dilation, groups):
    """Integer conv of (qx - zx) with (qw - zw), zero padded, via windows + einsum (no table)."""
    x = qx.astype(np.int64) - zx
    w = qw.astype(np.int64) - zw
    n_img, n_in = x.shape[:2]
    n_out, n_in_g, k_h, k_w = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    span_h, span_w = dilation * (k_h - 1) + 1, dilation * (k_w - 1) + 1
    win = np.lib.stride_tricks.sliding_window_view(xp, (span_h, span_w), axis=(2, 3))
    win = win[:, :, ::stride, ::stride, ::dilation, ::dilation]   # (N, Ci, OH, OW, kh, kw)
    out_h, out_w = win.shape[2], win.shape[3]
    win = win.reshape(n_img, groups, n_in_g, out_h, out_w, k_h, k_w)
    wg = w.reshape(groups, n_out // groups, n_in_g, k_h, k_w)
    y = np.einsum("ngchwij,goci j->ngohw".replace(" ", ""), win, wg)
    return y.reshape(n_img, n_out, out_h, out_w)


def engines_for(plan):
    return ["auto", "gather"] + (["lowrank"] if plan.factors is not None else [])


# ----------------------------------------------------------------------------- strategies

zero_points = st.one_of(st.sampled_from([0, 255]), st.integers(0, 255))


@st.composite
def conv_cases(draw):
    """A small conv: kind, shapes, geometry, zero points and a seed for the codes."""
    kind = draw(st.sampled_from(["depthwise", "pointwise", "dense"]))
    n_img = draw(st.integers(1, 3))
    stride = draw(st.sampled_from([1, 2]))
    dilation = draw(st.sampled_from([1, 2]))
    if kind == "pointwise":
        k = 1
        n_in, n_out, groups = draw(st.integers(1, 6)), draw(st.integers(1, 6)), 1
        padding = draw(st.sampled_from([0, 0, 1]))
    else:
        k = draw(st.sampled_from([1, 3, 5]))
        padding = draw(st.integers(0, (k // 2) * dilation + 1))
        if kind == "depthwise":
            n_in = n_out = groups = draw(st.integers(1, 6))
        else:
            n_in, n_out, groups = draw(st.integers(1, 4)), draw(st.integers(1, 4)), 1
    need = max(1, dilation * (k - 1) + 1 - 2 * padding)
    h = draw(st.integers(need, max(need, 9)))
    wd = draw(st.integers(need, max(need, 9)))
    zx, zw = draw(zero_points), draw(zero_points)
    seed = draw(st.integers(0, 2 ** 32 - 1))
    return dict(kind=kind, n_img=n_img, n_in=n_in, n_out=n_out, groups=groups, k=k, h=h, wd=wd,
                stride=stride, padding=padding, dilation=dilation, zx=zx, zw=zw, seed=seed)


def make_codes(case):
    rng = np.random.default_rng(case["seed"])
    qx = rng.integers(0, 256, (case["n_img"], case["n_in"], case["h"], case["wd"]),
                      dtype=np.uint8)
    qw = rng.integers(0, 256, (case["n_out"], case["n_in"] // case["groups"], case["k"],
                               case["k"]), dtype=np.uint8)
    return qx, qw


def run(case, plan, engine, qx=None, qw=None):
    if qx is None:
        qx, qw = make_codes(case)
    return lut_conv2d(qx, case["zx"], qw, case["zw"], plan, stride=case["stride"],
                      padding=case["padding"], dilation=case["dilation"], groups=case["groups"],
                      engine=engine)


def reference(case, table, qx=None, qw=None):
    if qx is None:
        qx, qw = make_codes(case)
    return reference_lut_conv(qx, case["zx"], qw, case["zw"], table, case["stride"],
                              case["padding"], case["dilation"], case["groups"])


EDGE_CASES = [
    dict(kind="depthwise", n_img=2, n_in=3, n_out=3, groups=3, k=3, h=7, wd=6, stride=2,
         padding=2, dilation=2, zx=255, zw=0, seed=1),
    dict(kind="pointwise", n_img=1, n_in=5, n_out=6, groups=1, k=1, h=5, wd=9, stride=2,
         padding=0, dilation=1, zx=0, zw=255, seed=2),
    dict(kind="dense", n_img=2, n_in=3, n_out=4, groups=1, k=5, h=9, wd=8, stride=1,
         padding=3, dilation=1, zx=255, zw=255, seed=3),
]


# ----------------------------------------------------------------------------- plans

@pytest.fixture(scope="module")
def plans():
    """Plans (max_rank 20, so 17KS has factors) for the tables the property tests use."""
    names = ["1JFF", "1446", "2P7", "17KS", "L40", "random_int32", "big_lowrank"]
    return {name: make_lut_plan(get_table(name), max_rank=20) for name in names}


# ----------------------------------------------------------------------------- properties

# the best table kernels the CPU has ("auto"), the AVX2 ones too where "auto" is another path
# (a CPU with VBMI), and the scalar ones
SHUFFLE_SWITCHES = ["auto"] + (["avx2"] if byte_shuffle._cpu_has_vbmi() else []) + ["scalar"]


@contextlib.contextmanager
def byte_shuffle_kernels(switch):
    """Run the gather on the table kernels ``switch`` names (kernels/byte_shuffle.py)."""
    before = os.environ.get("APPROXDARTS_NP_TABLE_KERNELS")
    os.environ["APPROXDARTS_NP_TABLE_KERNELS"] = switch
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("APPROXDARTS_NP_TABLE_KERNELS")
        else:
            os.environ["APPROXDARTS_NP_TABLE_KERNELS"] = before


@pytest.mark.parametrize("shuffle", SHUFFLE_SWITCHES)
@pytest.mark.parametrize("name", ["1446", "2P7", "17KS", "L40", "random_int32", "big_lowrank"])
@given(case=conv_cases())
@example(case=EDGE_CASES[0])
@example(case=EDGE_CASES[1])
@example(case=EDGE_CASES[2])
def test_every_engine_equals_reference_gather(plans, name, shuffle, case):
    plan = plans[name]
    expected = reference(case, plan.table)
    for engine in engines_for(plan):
        try:
            with byte_shuffle_kernels(shuffle):
                got = run(case, plan, engine)
        except LowRankBoundError:
            # only the float32 depthwise path (groups == Ci == Co, which includes Ci = Co = 1)
            # may refuse; the dispatcher falls back to the gather in "auto"
            depthwise_path = case["groups"] == case["n_in"] == case["n_out"]
            assert engine == "lowrank" and depthwise_path and name == "big_lowrank"
            continue
        assert got.dtype == np.int64 and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected, err_msg=f"{name} engine={engine}")


@pytest.mark.parametrize("shuffle", SHUFFLE_SWITCHES)
@given(case=conv_cases())
@example(case=EDGE_CASES[0])
@example(case=EDGE_CASES[1])
@example(case=EDGE_CASES[2])
def test_exact_table_gives_integer_convolution(plans, shuffle, case):
    plan = plans["1JFF"]
    qx, qw = make_codes(case)
    expected = integer_conv(qx, case["zx"], qw, case["zw"], case["stride"], case["padding"],
                            case["dilation"], case["groups"])
    np.testing.assert_array_equal(reference(case, plan.table, qx, qw), expected)
    for engine in engines_for(plan):
        with byte_shuffle_kernels(shuffle):
            got = run(case, plan, engine, qx, qw)
        np.testing.assert_array_equal(got, expected, err_msg=f"engine={engine}")


def test_exact_table_plan_is_rank_zero_lowrank(plans):
    plan = plans["1JFF"]
    assert plan.rank == 0 and plan.engine == "lowrank"


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_tables_lowrank_equals_gather(name):
    """For every bundled table with an exact decomposition (rank <= 16): lowrank == gather."""
    plan = make_lut_plan(load_table(name))
    if plan.factors is None:
        assert plan.engine == "gather"
        return
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    qx = rng.integers(0, 256, (2, 8, 7, 7), dtype=np.uint8)
    for qw, kw in [(rng.integers(0, 256, (8, 8, 1, 1), dtype=np.uint8), {}),
                   (rng.integers(0, 256, (8, 1, 3, 3), dtype=np.uint8),
                    dict(padding=2, dilation=2, groups=8)),
                   (rng.integers(0, 256, (5, 8, 3, 3), dtype=np.uint8),
                    dict(padding=1, stride=2))]:
        zx, zw = (int(v) for v in rng.integers(0, 256, 2))
        gather = lut_conv2d(qx, zx, qw, zw, plan, engine="gather", **kw)
        low = lut_conv2d(qx, zx, qw, zw, plan, engine="lowrank", **kw)
        np.testing.assert_array_equal(low, gather, err_msg=name)
        if plan.engine == "lowrank":
            np.testing.assert_array_equal(lut_conv2d(qx, zx, qw, zw, plan, **kw), gather)


@pytest.mark.parametrize("engine", ["gather", "lowrank"])
def test_kernel_blocks_and_tails(monkeypatch, plans, engine):
    """Several pixel blocks per image, a short last block and K not a multiple of four."""
    monkeypatch.setattr(lut_kernels, "_BAG_ACC_BYTES", 4 * 7 * 16)
    monkeypatch.setattr(lut_kernels, "_LOWRANK_X_BYTES", 4 * 2 * 7 * 16)
    plan = plans["1446"]
    case = dict(kind="dense", n_img=2, n_in=3, n_out=7, groups=1, k=3, h=9, wd=7, stride=1,
                padding=1, dilation=1, zx=9, zw=200, seed=11)
    np.testing.assert_array_equal(run(case, plan, engine), reference(case, plan.table))


def test_float32_chunks_and_float64_path(plans):
    """The low-rank bound forces K-chunks (float32) and float64 on the synthetic table."""
    plan = plans["big_lowrank"]
    f, g, _ = lowrank._features(plan.factors, 0, 255)
    bound = int((np.abs(f) @ np.abs(g).T).max())
    assert bound > lowrank.FLOAT32_EXACT_LIMIT            # one tap is beyond float32
    assert lowrank._gemm_plan(10, bound)[0] == np.float64
    exact = plans["1JFF"]
    f, g, _ = lowrank._features(exact.factors, 0, 0)
    dtype, chunk = lowrank._gemm_plan(600, int((np.abs(f) @ np.abs(g).T).max()))
    assert dtype == np.float32 and chunk == 2 ** 24 // 255 ** 2 < 600
    case = dict(kind="dense", n_img=1, n_in=40, n_out=3, groups=1, k=5, h=6, wd=6, stride=1,
                padding=2, dilation=1, zx=0, zw=0, seed=5)            # K = 1000 taps
    qx, qw = make_codes(case)
    qx[:] = 255
    qw[:] = 255                                                    # every product 255*255
    np.testing.assert_array_equal(run(case, exact, "lowrank", qx, qw),
                                  integer_conv(qx, 0, qw, 0, 1, 2, 1, 1))
    case.update(n_in=2, zx=0, zw=255)
    qx, qw = make_codes(case)
    np.testing.assert_array_equal(run(case, plan, "lowrank", qx, qw),
                                  reference(case, plan.table, qx, qw))


def test_depthwise_bound_falls_back_to_gather(plans):
    plan = plans["big_lowrank"]
    assert plan.engine == "lowrank"
    case = dict(kind="depthwise", n_img=1, n_in=2, n_out=2, groups=2, k=3, h=5, wd=5, stride=1,
                padding=1, dilation=1, zx=3, zw=250, seed=4)
    with pytest.raises(LowRankBoundError):
        run(case, plan, "lowrank")
    np.testing.assert_array_equal(run(case, plan, "auto"), reference(case, plan.table))


def test_int32_overflow_is_avoided_by_tap_chunks():
    """Table values near 2**30: the gather splits the taps so int32 sums cannot overflow."""
    rng = np.random.default_rng(3)
    table = rng.integers(2 ** 30 - 1000, 2 ** 30, (256, 256)).astype(np.int32)
    plan = make_lut_plan(table, max_rank=0)
    case = dict(kind="dense", n_img=1, n_in=3, n_out=2, groups=1, k=3, h=4, wd=4, stride=1,
                padding=1, dilation=1, zx=17, zw=3, seed=8)
    got = run(case, plan, "gather")
    assert got.max() > 2 ** 31
    np.testing.assert_array_equal(got, reference(case, table))


def test_results_do_not_depend_on_thread_count(plans):
    case = dict(kind="dense", n_img=3, n_in=4, n_out=5, groups=1, k=3, h=8, wd=8, stride=1,
                padding=1, dilation=1, zx=100, zw=30, seed=9)
    dw = dict(case, kind="depthwise", n_out=4, groups=4)
    plan = plans["1446"]
    before = numba.get_num_threads()
    try:
        results = []
        for n in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(n)
            results.append([run(c, plan, e) for c in (case, dw) for e in ("gather", "lowrank")])
    finally:
        numba.set_num_threads(before)
    for a, b in zip(results[0], results[-1]):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- test the tester

@pytest.mark.parametrize("kind", ["pointwise", "depthwise"])
def test_corrupted_table_entry_is_detected(plans, kind):
    """Changing one table entry that the input uses must break equality with the reference."""
    plan = plans["2P7"]
    case = dict(kind=kind, n_img=1, n_in=3, n_out=3, groups=3 if kind == "depthwise" else 1,
                k=3 if kind == "depthwise" else 1, h=5, wd=5, stride=1, padding=1,
                dilation=1, zx=7, zw=11, seed=21)
    qx, qw = make_codes(case)
    a, b = int(qx[0, 0, 2, 2]), int(qw[0, 0, 0, 0])   # an interior pixel meets this weight
    bad = plan.table.copy()
    bad[a, b] += 1
    bad_plan = make_lut_plan(bad, max_rank=20)
    expected = reference(case, plan.table, qx, qw)
    assert not np.array_equal(reference(case, bad, qx, qw), expected)
    for shuffle in SHUFFLE_SWITCHES:
        with byte_shuffle_kernels(shuffle):
            for engine in engines_for(bad_plan):
                assert not np.array_equal(run(case, bad_plan, engine, qx, qw), expected), engine
            for engine in engines_for(plan):
                assert not np.array_equal(run(case, plan, engine, qx, qw),
                                          reference(case, bad, qx, qw)), engine


# ----------------------------------------------------------------------------- plan and API

def test_plan_is_cached_by_content_and_read_only():
    table = load_table("JQQ")
    p1 = make_lut_plan(table)
    p2 = make_lut_plan(table.copy().astype(np.int64))
    assert p1 is p2 and isinstance(p1, LutPlan)
    assert p1.rank == 3
    assert p1.engine == ("lowrank" if 1 + p1.rank <= LOWRANK_MAX_TERMS else "gather")
    assert not p1.table.flags.writeable and p1.gather_table.dtype == np.uint16
    with pytest.raises(ValueError):
        p1.table[0, 0] = 1


def test_plan_engine_choice_follows_rank():
    assert make_lut_plan(load_table("1446")).engine == "lowrank"
    p = make_lut_plan(load_table("17KS"))                # rank 19 > max_rank 16
    assert p.factors is None and p.engine == "gather"
    p = make_lut_plan(load_table("17KS"), max_rank=19)
    assert p.rank == 19 and p.engine == "gather"         # factors kept, gather cheaper
    assert make_lut_plan(load_table("L40")).engine == "gather"


def test_argument_validation(plans):
    plan = plans["1446"]
    qx = np.zeros((1, 2, 4, 4), np.uint8)
    qw = np.zeros((3, 2, 1, 1), np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        lut_conv2d(qx.astype(np.int32), 0, qw, 0, plan)
    with pytest.raises(ValueError, match="0..255"):
        lut_conv2d(qx, 256, qw, 0, plan)
    with pytest.raises(ValueError, match="integer code"):
        lut_conv2d(qx, 1.0, qw, 0, plan)
    with pytest.raises(ValueError, match="integer code"):
        lut_conv2d(qx, 0, qw, True, plan)
    same = lut_conv2d(qx, np.int64(3), qw, np.array(4, np.uint8), plan)
    np.testing.assert_array_equal(same, lut_conv2d(qx, 3, qw, 4, plan))
    with pytest.raises(ValueError, match="engine"):
        lut_conv2d(qx, 0, qw, 0, plan, engine="fast")
    with pytest.raises(ValueError, match="groups"):
        lut_conv2d(qx, 0, qw, 0, plan, groups=3)
    with pytest.raises(ValueError, match="empty output"):
        lut_conv2d(qx, 0, np.zeros((3, 2, 7, 7), np.uint8), 0, plan)
    with pytest.raises(ValueError, match="LutPlan"):
        lut_conv2d(qx, 0, qw, 0, plan.table)
    with pytest.raises(ValueError, match="decomposition"):
        lut_conv2d(qx, 0, qw, 0, plans["L40"], engine="lowrank")
    with pytest.raises(ValueError, match="256, 256"):
        make_lut_plan(np.zeros((255, 256), np.int32))
    with pytest.raises(ValueError, match="integers"):
        make_lut_plan(np.zeros((256, 256), np.float32))


@settings(max_examples=10)
@given(case=conv_cases())
def test_empty_batch(plans, case):
    case = dict(case, n_img=1)
    qx, qw = make_codes(case)
    got = run(case, plans["1446"], "auto", qx[:0], qw)
    assert got.shape[0] == 0 and got.dtype == np.int64


def test_kernel_entry_points_check_their_operands():
    cols = np.zeros((1, 3, 4), np.uint8)
    with pytest.raises(ValueError, match="overflow"):
        lut_kernels.lut_bag_conv(cols, 0, np.zeros((2, 3), np.uint8), 0,
                                 np.full((256, 256), 2 ** 30, np.int32))
    with pytest.raises(ValueError, match="qw_cols"):
        lut_kernels.lut_bag_conv(cols, 0, np.zeros((2, 4), np.uint8), 0,
                                 np.zeros((256, 256), np.uint16))
    with pytest.raises(ValueError, match="table"):
        lut_kernels.lut_bag_conv(cols, 0, np.zeros((2, 3), np.uint8), 0,
                                 np.zeros((256, 256), np.int64))
    with pytest.raises(ValueError, match="inconsistent"):
        lut_kernels.lowrank_bag_conv(cols, 0, np.zeros((1, 256), np.float32),
                                     np.zeros((1, 2, 3), np.float64), np.zeros(2, np.int64), 3)


def test_kernel_entry_points_check_their_geometry():
    qx = np.zeros((1, 2, 5, 5), np.uint8)
    qw = np.zeros((2, 1, 3, 3), np.uint8)
    table = np.zeros((256, 256), np.uint16)
    with pytest.raises(ValueError, match="stride"):
        lut_kernels.lut_depthwise_conv(qx, 0, qw, 0, table, stride=0)
    with pytest.raises(ValueError, match="empty output"):
        lut_kernels.lut_depthwise_conv(qx, 0, qw, 0, table, dilation=3)
    with pytest.raises(ValueError, match="qw"):
        lut_kernels.lut_depthwise_conv(qx, 0, qw[:1], 0, table, padding=1)
    with pytest.raises(ValueError, match="padding"):
        lut_kernels.im2col_codes(qx, 0, 3, padding=-1)
    with pytest.raises(ValueError, match="0..255"):
        lut_kernels.im2col_codes(qx, 256, 3)
    cols = lut_kernels.im2col_codes(qx + 7, 9, (3, 1), stride=(2, 1), padding=(1, 0))
    assert cols.shape == (1, 2 * 3, 3 * 5)
    assert (cols[:, 0, :5] == 9).all() and (cols[:, 1] == 7).all()   # top padding row, centre


@pytest.mark.parametrize("name", ["17KS", "random_int32"])
def test_bag_kernel_at_every_channel_and_tap_remainder(name):
    """The scalar bag kernel adds 8 output channels and 4 taps at a time (rows padded with
    zeros): channel counts around multiples of 8 and tap counts around multiples of 4 (uint16
    and int32 rows) against the plain gather."""
    table = get_table(name)
    gt = table.astype(np.uint16) if table.min() >= 0 and table.max() < 65536 else table
    rng = np.random.default_rng(21)
    with byte_shuffle_kernels("scalar"):
        for n_out in (1, 7, 8, 9, 17):
            for n_taps in (1, 3, 4, 5, 9):
                cols = rng.integers(0, 256, (2, n_taps, 19), dtype=np.uint8)
                qw = rng.integers(0, 256, (n_out, n_taps), dtype=np.uint8)
                a = cols.astype(np.int64)[:, None]
                b = qw.astype(np.int64)[None, :, :, None]
                expected = (table.astype(np.int64)[a, b] - 3 * a - 250 * b + 750).sum(axis=2)
                np.testing.assert_array_equal(
                    lut_kernels.lut_bag_conv(cols, 250, qw, 3, gt), expected,
                    err_msg=f"Co={n_out} K={n_taps}")
