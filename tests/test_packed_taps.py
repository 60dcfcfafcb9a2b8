"""The packed-tap depthwise kernels (int64 words of three taps, int32 vectors of eight) against
a plain NumPy table gather, bit for bit.

Every bundled table on kernel shapes that take each word kind and each pass size (1x1 to 9x9,
rows of 1 to 9 taps, 1 to 9 kernel rows), paddings and dilations per axis; the one-pass entry
against quantising first; the lane bounds at their edges (a column one value too wide falls
back to the per-tap loop); thread counts; and wrong lane entries, which must be caught. The
tests force the portable kernels (``APPROXDARTS_NP_TABLE_KERNELS=scalar``), so they run the
same on every CPU.
"""
import zlib

import numba
import numpy as np
import pytest

from approxdarts_np.approx import quantize
from approxdarts_np.approx.lut_conv import make_lut_plan
from approxdarts_np.approx.multipliers import bundled_names, load_multiplier
from approxdarts_np.kernels import packed_taps
from approxdarts_np.kernels import lut_conv as klut
from test_byte_shuffle import _reference_dw
from test_lut_conv import reference_lut_conv

# (k_h, k_w, stride, padding, dilation, h, w): 3x3 and 5x5 as searched (strides 1 and 2),
# rows of every width up to two vector groups, one to nine kernel rows (passes of 5, 3 and 1
# chains), per-axis geometry, strides of 3
GEOMETRIES = [(3, 3, 1, 1, 1, 9, 9), (5, 5, 1, 2, 1, 8, 11), (3, 3, 1, 2, 2, 9, 7),
              (5, 5, 1, 4, 2, 10, 10), (3, 3, 2, 1, 1, 9, 9), (5, 5, 2, 2, 1, 8, 7),
              (3, 3, 2, 2, 2, 11, 9), (5, 5, 2, 4, 2, 10, 10), (1, 1, 1, 0, 1, 5, 6),
              (1, 2, 1, (0, 1), 1, 4, 7), (3, 5, 1, (1, 2), (2, 1), 9, 8),
              (5, 3, 1, (0, 1), (1, 3), 9, 12), (2, 9, 1, (1, 4), (1, 1), 6, 10),
              (7, 2, 1, (3, 0), (1, 2), 9, 9), (9, 9, 1, 4, 1, 9, 9), (4, 8, 1, 0, (2, 1), 11, 12),
              (3, 3, 1, 0, 1, 70, 5), (3, 3, (2, 1), (1, 0), (1, 2), 9, 8),
              (1, 1, 3, 0, 1, 7, 8), (5, 7, (1, 3), (2, 3), (1, 2), 8, 13),
              (4, 9, (3, 2), 1, (2, 1), 12, 11)]


def table_of(name):
    return np.asarray(load_multiplier(name).table, dtype=np.int32)


@pytest.fixture
def packed_calls(monkeypatch):
    """The portable kernels forced, and a count of the packed-tap kernel's runs (so a test
    knows the packed kernel, not the per-tap loop, computed what it compared)."""
    monkeypatch.setenv("APPROXDARTS_NP_TABLE_KERNELS", "scalar")
    calls = {"packed": 0}
    real = packed_taps.depthwise_packed

    def counted(*args, **kwargs):
        calls["packed"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(packed_taps, "depthwise_packed", counted)
    return calls


@pytest.mark.parametrize("name", bundled_names())
def test_every_bundled_table_equals_the_plain_gather(packed_calls, name):
    table = table_of(name)
    gt = make_lut_plan(table).gather_table
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    for g, (k_h, k_w, stride, padding, dilation, h, w) in enumerate(GEOMETRIES):
        zx, zw = (int(v) for v in rng.integers(0, 256, 2))
        zx, zw = ((0, 255), (255, 0))[g] if g < 2 else (zx, zw)   # the extreme zero points too
        qx = rng.integers(0, 256, (3, 2, h, w), dtype=np.uint8)
        qw = rng.integers(0, 256, (2, 1, k_h, k_w), dtype=np.uint8)
        got = klut.lut_depthwise_conv(qx, zx, qw, zw, gt, stride, padding, dilation)
        np.testing.assert_array_equal(
            got, _reference_dw(qx, zx, qw, zw, table, stride, padding, dilation),
            err_msg=f"{name} {k_h}x{k_w} s={stride} p={padding} d={dilation}")
    assert packed_calls["packed"] == len(GEOMETRIES)


def _geom(stride, dilation):
    return (stride, stride, 0, 0, dilation, dilation)


def test_group_plan_chains_the_taps_of_each_column_phase():
    """A chain is one kernel row's taps on one column phase, at a fixed step in that phase;
    chains of up to 3 taps are word groups, longer ones vector groups of 8 slots."""
    plan = packed_taps.group_plan
    taps, step = plan((3, 3), _geom(1, 1))
    assert taps.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]] and step == 1
    assert plan((3, 3), _geom(1, 2))[1] == 2                 # dilation 2: every other column
    taps, step = plan((1, 3), _geom(2, 1))                    # stride 2: taps 0, 2 and tap 1
    assert taps.tolist() == [[0, 2, -1], [1, -1, -1]] and step == 1
    taps, step = plan((2, 5), _geom(2, 1))
    assert taps.tolist() == [[0, 2, 4], [1, 3, -1], [5, 7, 9], [6, 8, -1]] and step == 1
    taps, step = plan((1, 3), _geom(2, 2))                    # one phase, adjacent columns
    assert taps.tolist() == [[0, 1, 2]] and step == 1
    taps, step = plan((1, 7), _geom(3, 2))                    # columns 0, 2/3, 4/3 ... apart
    assert taps.tolist() == [[0, 3, 6], [1, 4, -1], [2, 5, -1]] and step == 2
    taps, step = plan((1, 5), _geom(1, 1))
    assert taps.tolist() == [[0, 1, 2, 3, 4, -1, -1, -1]] and step == 1
    taps, _ = plan((1, 10), _geom(1, 1))
    assert taps.tolist() == [list(range(8)), [8, 9] + [-1] * 6]


def test_word_kinds_and_group_layout():
    """Groups of 3 slots pack into int64 words, of 8 into int32 lanes; slot s of a group sits
    in lane slots-1-s, in a word offset so that its smallest value is 0."""
    table_t = np.ascontiguousarray(table_of("mul8u_L40").T)
    qw = np.arange(1, 26, dtype=np.uint8).reshape(1, 25)
    zw = 9
    taps, _ = packed_taps.group_plan((3, 3), _geom(2, 1))
    rows, cst = packed_taps.tap_rows(table_t, qw[:, :9], 3, zw, taps)
    assert rows.dtype == np.int64 and rows.shape == (1, 6, 256)
    a = np.arange(256)
    cols = table_t[qw[0, :9]].astype(np.int64) - zw * a           # (taps, 256)
    lo = cols.min(axis=1)
    mask = (1 << packed_taps.LANE_BITS) - 1
    for g, slots in enumerate(taps):
        for s, t in enumerate(slots):
            lane = (rows[0, g] >> (packed_taps.LANE_BITS * (2 - s))) & mask
            np.testing.assert_array_equal(lane, cols[t] - lo[t] if t >= 0 else 0)
    assert cst[0] == (lo - 3 * qw[0, :9].astype(np.int64) + 3 * zw).sum()
    taps, _ = packed_taps.group_plan((5, 5), _geom(1, 1))
    rows, cst = packed_taps.tap_rows(table_t, qw, 3, zw, taps)
    assert rows.dtype == np.int32 and rows.shape == (1, 5, 256, 8)
    cols = table_t[qw[0]].astype(np.int64) - zw * a      # vector lanes: no offset
    assert (cols < 0).any()
    for i in range(5):
        for s in range(5):
            np.testing.assert_array_equal(rows[0, i, :, 7 - s], cols[5 * i + s])
        assert not rows[0, i, :, :3].any()        # slots 5..7: zero columns
    assert cst[0] == (-3 * qw[0].astype(np.int64) + 3 * zw).sum()


@pytest.mark.parametrize("name", ["mul8u_L40", "mul8u_2P7"])
def test_one_pass_equals_quantise_then_gather(packed_calls, thread_team, monkeypatch, name):
    """lut_conv_codes on the portable kernels: depthwise convolutions (packed taps) and
    pointwise ones (the bag kernel) run in one pass, codes and outputs identical to
    quantising first and gathering; a pointwise one whose int32 sums could overflow refuses
    (the caller splits its taps)."""
    bags = []
    real_bag = klut._bag_run
    monkeypatch.setattr(klut, "_bag_run", lambda *a, **k: bags.append(k.get("x") is not None)
                        or real_bag(*a, **k))
    table = table_of(name)
    gt = make_lut_plan(table).gather_table
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 5, 9, 10)).astype(np.float32)
    ties = np.array([1, -1, 3, -3, 5, 77, -101], np.float32) / 128   # x / s on rounding ties
    x[0, 0, 0, :7] = ties
    x[1, 2, 3, :7] = np.nextafter(ties, np.float32(10))
    sx, zx = 1.0 / 64, 131
    cases = (((5, 1, 3, 3), 1, 1, 1), ((5, 1, 5, 5), 1, 4, 2), ((5, 1, 3, 5), 1, (2, 0), (2, 1)),
             ((5, 1, 3, 3), 2, 1, 1), ((5, 1, 5, 5), 2, 4, 2), ((7, 5, 1, 1), 1, 0, 1))
    for w_shape, stride, padding, dilation in cases:
        w = rng.standard_normal(w_shape).astype(np.float32)
        sw, zw = quantize.quant_params(w)
        qw, _, _ = quantize.quantize_per_tensor(w)
        y, qx = klut.lut_conv_codes(x, sx, zx, qw, zw, gt, stride, padding, dilation,
                                    out_scale=sx * sw)
        expected_qx = quantize.quantize_with(x, sx, zx)
        np.testing.assert_array_equal(qx, expected_qx)
        if w_shape[1] == 1:
            acc = _reference_dw(expected_qx, zx, qw, zw, table, stride, padding, dilation)
        else:
            acc = reference_lut_conv(expected_qx, zx, qw, zw, table, 1, 0, 1, 1)
        np.testing.assert_array_equal(y, (acc * (sx * sw)).astype(np.float32), err_msg=w_shape)
    assert packed_calls["packed"] == len(cases) - 1 and bags == [True]
    huge = np.full((256, 256), 2 ** 29, np.int32)       # 5 taps * 2**29 >= 2**31
    assert klut.lut_conv_codes(x, sx, zx, np.zeros((4, 5, 1, 1), np.uint8), 0, huge) is None
    assert bags == [True]


@pytest.mark.parametrize("k_size, limit", [((3, 3), packed_taps.WORD_RANGE),
                                           ((2, 8), packed_taps.VECTOR_RANGE)])
def test_lanes_hold_the_widest_columns_they_take(packed_calls, k_size, limit):
    """Words: a column spanning limit - 1 values packs, and with every code at its largest
    value the sum of three words' lanes (nine values) reaches 2**21 - 17; one value
    wider falls back to the per-tap loop. Vectors (rows of 8 taps: every lane used): the same
    with values of magnitude limit - 1 and limit, both signs, so that a lane's sum of eight
    reaches 8 - 2**31. Every case gives the gather's integers."""
    rng = np.random.default_rng(16)
    k_h, k_w = k_size
    padding = (k_h // 2, k_w // 2)
    for span, packed in ((limit - 1, True), (limit, False)):
        table = rng.integers(-50, 50, (256, 256)).astype(np.int32)
        table[:, 7] = 0
        if k_w == 3:
            table[0, 7] = -(span // 2)
            table[255, 7] = span - span // 2
        else:
            table[0, 7] = span
            table[255, 7] = -span
        taps, _ = packed_taps.group_plan(k_size, _geom(1, 1))
        assert (packed_taps.tap_rows(np.ascontiguousarray(table.T), np.full((1, k_h * k_w), 7,
                                     np.uint8), 0, 0, taps) is not None) == packed
        qw = np.full((2, 1, k_h, k_w), 7, np.uint8)
        qw[1, 0, 0, 0] = 200
        qx = np.full((2, 2, 7, 12), 255, np.uint8)
        qx[1, :, 3, 2] = 0
        before = packed_calls["packed"]
        got = klut.lut_depthwise_conv(qx, 255, qw, 0, table, 1, padding, 1)
        assert packed_calls["packed"] - before == packed
        np.testing.assert_array_equal(got, _reference_dw(qx, 255, qw, 0, table, 1, padding, 1),
                                      err_msg=f"span {span}")


def test_results_do_not_depend_on_thread_count(packed_calls, thread_team):
    gt = make_lut_plan(table_of("mul8u_L40")).gather_table
    rng = np.random.default_rng(12)
    qx = rng.integers(0, 256, (5, 6, 12, 12), dtype=np.uint8)
    before = numba.get_num_threads()
    for k in (3, 5):
        qw = rng.integers(0, 256, (6, 1, k, k), dtype=np.uint8)
        results = []
        try:
            for n in sorted({1, numba.config.NUMBA_NUM_THREADS}):
                numba.set_num_threads(n)
                results.append(klut.lut_depthwise_conv(qx, 7, qw, 8, gt, 1, k // 2, 1))
        finally:
            numba.set_num_threads(before)
        np.testing.assert_array_equal(results[0], results[-1])
        np.testing.assert_array_equal(results[0], _reference_dw(qx, 7, qw, 8, table_of(
            "mul8u_L40"), 1, k // 2, 1))


# ----------------------------------------------------------------------------- test the tester

@pytest.mark.parametrize("k, stride", [(3, 1), (5, 1), (3, 2), (5, 2)])
def test_a_wrong_lane_entry_is_caught(packed_calls, monkeypatch, k, stride):
    """One value changed by 1 in any used lane of the packed rows (each slot of every group,
    words and vectors, at strides 1 and 2) changes the output."""
    gt = make_lut_plan(table_of("mul8u_L40")).gather_table
    code = 77
    qx = np.full((1, 2, 9, 9), code, np.uint8)    # every tap reads this code at every output
    qw = np.random.default_rng(13).integers(0, 256, (2, 1, k, k), dtype=np.uint8)
    good = klut.lut_depthwise_conv(qx, 3, qw, 4, gt, stride, 0, 1)
    real = packed_taps.tap_rows
    taps, _ = packed_taps.group_plan((k, k), _geom(stride, 1))
    used = [(g, s) for g in range(taps.shape[0]) for s in range(taps.shape[1]) if taps[g, s] >= 0]
    assert len(used) == k * k
    for g, s in used:
        def corrupted(*args, g=g, s=s, **kwargs):
            rows, cst = real(*args, **kwargs)
            if rows.ndim == 3:           # words: slot s in lane 2 - s
                rows[0, g, code] += 1 << (packed_taps.LANE_BITS * (2 - s))
            else:
                rows[0, g, code, 7 - s] += 1
            return rows, cst
        monkeypatch.setattr(packed_taps, "tap_rows", corrupted)
        assert not np.array_equal(klut.lut_depthwise_conv(qx, 3, qw, 4, gt, stride, 0, 1),
                                  good), (g, s)
    monkeypatch.setattr(packed_taps, "tap_rows", real)
    np.testing.assert_array_equal(klut.lut_depthwise_conv(qx, 3, qw, 4, gt, stride, 0, 1), good)
    np.testing.assert_array_equal(good, _reference_dw(qx, 3, qw, 4, table_of("mul8u_L40"),
                                                      stride, 0, 1))
