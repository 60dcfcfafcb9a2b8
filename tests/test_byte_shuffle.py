"""The shuffle table kernels (AVX-512 VBMI byte shuffles, AVX2 nibble windows) against a plain
NumPy table gather, bit for bit.

Every bundled table, depthwise (strides, dilations, paddings, 1x1 to 5x5), pointwise and dense
(im2col) shapes, on each path; the one-pass entry that quantises x inside the kernel against
quantising first; which columns the nibble windows take, against a least-squares fit; the
fallbacks to the scalar kernels (a table column wider than 16 bits, a column that is no sum of
windows, more than MAX_TAPS taps, the switch in the environment). A CPU with VBMI runs both
paths; the tests of a path the CPU lacks are skipped (the scalar kernels then run everywhere
and test_lut_conv.py covers them).
"""
import zlib

import numba
import numpy as np
import pytest

from approxdarts_np.approx import quantize
from approxdarts_np.approx.lut_conv import approx_conv2d, make_lut_plan
from approxdarts_np.approx.multipliers import bundled_names, load_multiplier
from approxdarts_np.errors import UserError
from approxdarts_np.kernels import byte_shuffle
from approxdarts_np.kernels import lut_conv as klut
from test_lut_conv import reference_lut_conv

needs_vbmi = pytest.mark.skipif(not byte_shuffle._cpu_has_vbmi(),
                                reason="this CPU has no AVX-512 VBMI (byte-shuffle kernels)")
needs_avx2 = pytest.mark.skipif(not byte_shuffle._cpu_has_avx2(),
                                reason="this CPU has no AVX2 (nibble-window kernels)")
# every shuffle path, each skipped where the CPU lacks it
PATHS = [pytest.param("vbmi", marks=needs_vbmi), pytest.param("avx2", marks=needs_avx2)]

# (k, stride, padding, dilation, h, w): the searched depthwise geometries and odd ones
DW_GEOMETRIES = [(3, 1, 1, 1, 9, 9), (5, 1, 2, 1, 8, 11), (3, 1, 2, 2, 9, 7), (5, 1, 4, 2, 10, 10),
                 (3, 2, 1, 1, 9, 9), (5, 2, 2, 1, 8, 7), (3, 2, 2, 2, 11, 9), (1, 3, 0, 1, 7, 8),
                 (3, 1, 0, 1, 70, 5), (3, (2, 1), (1, 0), (1, 2), 9, 8)]


def table_of(name):
    return np.asarray(load_multiplier(name).table, dtype=np.int32)


def gather_table(name):
    return make_lut_plan(table_of(name)).gather_table


@pytest.fixture(params=PATHS)
def shuffle_on(request, monkeypatch):
    """The path the test runs on (every one the CPU has, in turn)."""
    monkeypatch.setenv("APPROXDARTS_NP_TABLE_KERNELS", request.param)
    return request.param


def window_design(n_windows):
    """One-hot columns of the nibble windows of the 256 codes (the least-squares reference)."""
    a = np.arange(256)
    return np.concatenate([np.eye(16)[(a >> shift) & 15]
                           for shift in byte_shuffle.WINDOW_SHIFTS[:n_windows]], axis=1)


def windows_needed(table):
    """Per weight code b, the fewest nibble windows whose sum is the column M[:, b] (2 or 3), or
    0, from a least-squares fit of each column (independent of the kernels' construction)."""
    need = np.zeros(256, np.int64)
    cols = np.asarray(table, np.float64)
    for n_windows in (3, 2):
        design = window_design(n_windows)
        fit, *_ = np.linalg.lstsq(design, cols, rcond=None)
        exact = np.abs(design @ fit - cols).max(axis=0) < 1e-6
        need[exact] = n_windows
    return need


def path_runs(path, table, qw_taps, n_out=None):
    """Whether the shuffle kernels of ``path`` take these weight codes (C, T) in a call (the
    scalar fallback otherwise): every column fits (VBMI: always, for the bundled tables; AVX2:
    each is a sum of the windows the call allows; that no window of a bundled table spreads
    over 16 bits is what the all-codes check of the test below finds for three zero points)."""
    if path == "vbmi":
        return True
    need = windows_needed(table)[qw_taps]
    cap = 3 if n_out is None else byte_shuffle.column_windows(n_out)
    return bool(need.min() > 0 and need.max() <= cap)


def _pairs(v):
    return v if isinstance(v, tuple) else (v, v)


def _reference_dw(qx, zx, qw, zw, table, stride, padding, dilation):
    """reference_lut_conv for (h, w)-pair geometries: pad, then one plain gather per tap."""
    (s_h, s_w), (p_h, p_w), (d_h, d_w) = _pairs(stride), _pairs(padding), _pairs(dilation)
    if (s_h, p_h, d_h) == (s_w, p_w, d_w):
        return reference_lut_conv(qx, zx, qw, zw, table, s_h, p_h, d_h, qx.shape[1])
    m = np.asarray(table, np.int64)
    n, c, h, w = qx.shape
    k_h, k_w = qw.shape[2:]
    xp = np.pad(qx.astype(np.int64), ((0, 0), (0, 0), (p_h, p_h), (p_w, p_w)),
                constant_values=zx)
    oh = (h + 2 * p_h - d_h * (k_h - 1) - 1) // s_h + 1
    ow = (w + 2 * p_w - d_w * (k_w - 1) - 1) // s_w + 1
    acc = np.zeros((n, c, oh, ow), np.int64)
    for i in range(k_h):
        for j in range(k_w):
            a = xp[:, :, i * d_h:i * d_h + s_h * (oh - 1) + 1:s_h,
                   j * d_w:j * d_w + s_w * (ow - 1) + 1:s_w]
            b = qw[:, 0, i, j].astype(np.int64)[None, :, None, None]
            acc += m[a, b] - zw * a - zx * b + zx * zw
    return acc


@pytest.fixture
def shuffle_calls(monkeypatch):
    """Counts of the byte-shuffle kernel runs, so a test knows the shuffles (not the scalar
    fallback) computed what it compared."""
    calls = {"depthwise": 0, "columns": 0}
    for key, attr in (("depthwise", "depthwise_lookup"), ("columns", "columns_lookup")):
        real = getattr(byte_shuffle, attr)

        def counted(*args, _real=real, _key=key, **kwargs):
            calls[_key] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(byte_shuffle, attr, counted)
    return calls


@pytest.mark.parametrize("name", bundled_names())
def test_every_bundled_table_depthwise_and_columns_equal_the_plain_gather(shuffle_on,
                                                                          shuffle_calls, name):
    table = table_of(name)
    gt = gather_table(name)
    all_codes = np.arange(256, dtype=np.uint8).reshape(16, 16)
    for zw in (0, 128, 255):
        # VBMI: every column fits two byte planes, or three (never none) for any zero point;
        # AVX2: exactly when every column is a sum of at most three windows
        got = byte_shuffle.tap_tables(np.ascontiguousarray(gt.T), all_codes, 255, zw)
        assert (got is not None) == path_runs(shuffle_on, table, all_codes), zw
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    runs = {"depthwise": 0, "columns": 0}
    for g, (k, stride, padding, dilation, h, w) in enumerate(DW_GEOMETRIES):
        zx, zw = (int(v) for v in rng.integers(0, 256, 2))
        zw = (0, 255)[g] if g < 2 else zw     # the extreme weight zero points too
        qx = rng.integers(0, 256, (2, 3, h, w), dtype=np.uint8)
        qw = rng.integers(0, 256, (3, 1, k, k), dtype=np.uint8)
        runs["depthwise"] += path_runs(shuffle_on, table, qw.reshape(3, k * k))
        got = klut.lut_depthwise_conv(qx, zx, qw, zw, gt, stride, padding, dilation)
        np.testing.assert_array_equal(
            got, _reference_dw(qx, zx, qw, zw, table, stride, padding, dilation),
            err_msg=f"{name} depthwise k={k} s={stride} p={padding} d={dilation}")
    for n_in, n_pix, n_out in ((5, 64, 4), (3, 77, 6), (16, 130, 2)):
        zx, zw = (int(v) for v in rng.integers(0, 256, 2))
        cols = rng.integers(0, 256, (3, n_in, n_pix), dtype=np.uint8)
        qw = rng.integers(0, 256, (n_out, n_in), dtype=np.uint8)
        runs["columns"] += path_runs(shuffle_on, table, qw, n_out)
        a = cols.astype(np.int64)[:, None]
        b = qw.astype(np.int64)[None, :, :, None]
        expected = (table.astype(np.int64)[a, b] - zw * a - zx * b + zx * zw).sum(axis=2)
        np.testing.assert_array_equal(klut.lut_bag_conv(cols, zx, qw, zw, gt), expected,
                                      err_msg=f"{name} columns {n_in}x{n_pix}->{n_out}")
    assert shuffle_calls == runs
    if shuffle_on == "avx2" and name in ("mul8u_2P7", "mul8u_17KS", "mul8u_1JFF"):
        # the tables the AVX2 path is for run on it (not only the fallback)
        assert runs == {"depthwise": len(DW_GEOMETRIES), "columns": 3}


@needs_avx2
@pytest.mark.parametrize("name", ["mul8u_2P7", "mul8u_17KS", "mul8u_L40", "mul8u_JV3", "exact"])
def test_the_windows_of_each_column_against_a_least_squares_fit(name):
    """column_windows_of: the windows a column needs agree with a least-squares fit, and their
    sum gives the column back at every code."""
    table = table_of(name)
    f, need = byte_shuffle.column_windows_of(np.ascontiguousarray(gather_table(name).T))
    np.testing.assert_array_equal(need, windows_needed(table))
    a = np.arange(256)
    for b in np.flatnonzero(need):
        got = f[b, 0, a & 15] + f[b, 1, a >> 4] + f[b, 2, (a >> 2) & 15]
        np.testing.assert_array_equal(got, table[:, b], err_msg=f"{name} column {b}")
    counts = {n: int((need == n).sum()) for n in (0, 2, 3)}
    # the structure of the tables this path is for (every column of 2P7 splits into the two
    # nibbles of a; a quarter of 17KS's needs the middle window; L40 is almost never a sum)
    expected = {"mul8u_2P7": {0: 0, 2: 256, 3: 0}, "mul8u_17KS": {0: 0, 2: 192, 3: 64},
                "exact": {0: 0, 2: 256, 3: 0}}
    if name in expected:
        assert counts == expected[name]
    if name == "mul8u_L40":
        assert counts[0] > 200


@pytest.mark.parametrize("name", ["2P7", "17KS", "L40", "exact"])
def test_scaled_outputs_equal_the_scaled_integer_sums(shuffle_on, name):
    """float32(acc * scale) with the product in float64, as the scalar kernels give it."""
    gt = gather_table(name)
    rng = np.random.default_rng(3)
    qx = rng.integers(0, 256, (2, 4, 9, 9), dtype=np.uint8)
    qw = rng.integers(0, 256, (4, 1, 5, 5), dtype=np.uint8)
    scale = 0.0123456789
    acc = klut.lut_depthwise_conv(qx, 9, qw, 201, gt, 1, 2, 1)
    y = klut.lut_depthwise_conv(qx, 9, qw, 201, gt, 1, 2, 1, scale=scale)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, (acc * scale).astype(np.float32))
    cols = qx.reshape(2, 4, 81)
    qp = rng.integers(0, 256, (6, 4), dtype=np.uint8)
    acc = klut.lut_bag_conv(cols, 9, qp, 201, gt)
    np.testing.assert_array_equal(klut.lut_bag_conv(cols, 9, qp, 201, gt, scale=scale),
                                  (acc * scale).astype(np.float32))


def _one_pass_cases():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 5, 9, 10)).astype(np.float32)
    # values on and one ulp around rounding ties of x / s (s = 1/64: ties at odd multiples
    # of 1/128), where a sloppy code pass rounds wrong
    ties = np.array([1, -1, 3, -3, 5, 77, -101], np.float32) / 128
    x[0, 0, 0, :7] = ties
    x[1, 2, 3, :7] = np.nextafter(ties, np.float32(10))
    x[2, 4, 5, :7] = np.nextafter(ties, np.float32(-10))
    return x, [("depthwise", (5, 1, 3, 3), 1, 1, 1), ("depthwise", (5, 1, 5, 5), 2, 4, 2),
               ("depthwise", (5, 1, 3, 3), 2, 1, 1), ("pointwise", (7, 5, 1, 1), 1, 0, 1)]


@pytest.mark.parametrize("name", ["2P7", "17KS", "exact"])
def test_one_pass_equals_quantise_then_gather(shuffle_on, shuffle_calls, thread_team, monkeypatch, name):
    """lut_conv_codes: codes and outputs identical to quantising first and gathering, with the
    thread team forced on (the column kernel's jobs of one image split between threads)."""
    gt = gather_table(name)
    x, cases = _one_pass_cases()
    for kind, w_shape, stride, padding, dilation in cases:
        sx, zx = 1.0 / 64, 131
        w = np.random.default_rng(len(w_shape)).standard_normal(w_shape).astype(np.float32)
        sw, zw = quantize.quant_params(w)
        qw, _, _ = quantize.quantize_per_tensor(w)
        res = klut.lut_conv_codes(x, sx, zx, qw, zw, gt, stride, padding, dilation,
                                  out_scale=sx * sw)
        assert res is not None
        y, qx = res
        expected_qx = quantize.quantize_with(x, sx, zx)
        np.testing.assert_array_equal(qx, expected_qx, err_msg=f"{name} {kind} codes")
        if kind == "depthwise":
            acc = klut.lut_depthwise_conv(expected_qx, zx, qw, zw, gt, stride, padding, dilation)
        else:
            acc = klut.lut_bag_conv(expected_qx.reshape(3, 5, 90), zx,
                                    qw.reshape(w_shape[:2]), zw, gt).reshape(y.shape)
        np.testing.assert_array_equal(y, (acc * (sx * sw)).astype(np.float32),
                                      err_msg=f"{name} {kind}")
    # each case ran the shuffles twice: the one pass, then the gather of the codes
    assert shuffle_calls == {"depthwise": 6, "columns": 2}


@pytest.mark.parametrize("path", PATHS)
def test_approx_conv_takes_the_one_pass_path_and_agrees_with_the_scalar_one(monkeypatch, path):
    plan = make_lut_plan(table_of("2P7"))
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    calls = []
    real = klut.lut_conv_codes

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(result is not None)
        return result

    from approxdarts_np.approx import lut_conv as alut
    monkeypatch.setattr(alut, "lut_conv_codes", spy)
    for w_shape, kw in (((4, 1, 3, 3), dict(padding=1, groups=4)), ((6, 4, 1, 1), {}),
                        ((4, 1, 5, 5), dict(stride=2, padding=4, dilation=2, groups=4))):
        w = rng.standard_normal(w_shape).astype(np.float32)
        monkeypatch.setenv("APPROXDARTS_NP_TABLE_KERNELS", path)
        y1, (qx1, _, _), _ = approx_conv2d(x, w, plan, **kw)
        monkeypatch.setenv("APPROXDARTS_NP_TABLE_KERNELS", "scalar")
        y0, (qx0, _, _), _ = approx_conv2d(x, w, plan, **kw)
        np.testing.assert_array_equal(y1, y0)
        np.testing.assert_array_equal(qx1, qx0)
    # every call runs in one pass: the first of each pair on the shuffles, the second on the
    # portable kernels (packed taps, the bag kernel)
    assert calls == [True] * 6


@needs_vbmi
def test_columns_wider_than_16_bits_take_a_third_byte_plane(monkeypatch):
    """JV3 with zw = 255: M[a, w] - 255 a spans more than 16 bits for some weight codes."""
    monkeypatch.setenv("APPROXDARTS_NP_TABLE_KERNELS", "vbmi")
    gt = gather_table("JV3")
    table_t = np.ascontiguousarray(gt.T)
    spread = gt.astype(np.int64) - 255 * np.arange(256)[:, None]
    wide = np.flatnonzero(spread.max(axis=0) - spread.min(axis=0) > 65535)
    assert wide.size
    qw = np.zeros((2, 1, 3, 3), np.uint8)
    qw[0, 0, 1, 1] = wide[0]
    tabs, _ = byte_shuffle.tap_tables(table_t, qw.reshape(2, 9), 4, 255)
    assert tabs.shape == (2, 9 * 3 * 256)
    assert byte_shuffle.tap_tables(table_t, qw.reshape(2, 9), 4, 128)[0].shape == (2, 9 * 512)
    rng = np.random.default_rng(10)
    qx = rng.integers(0, 256, (2, 2, 7, 7), dtype=np.uint8)
    np.testing.assert_array_equal(
        klut.lut_depthwise_conv(qx, 4, qw, 255, gt, 1, 1, 1),
        reference_lut_conv(qx, 4, qw, 255, table_of("JV3"), 1, 1, 1, 2))
    cols = qx.reshape(2, 2, 49)
    qc = np.array([[wide[0], 3], [7, wide[-1]]], np.uint8)
    a = cols.astype(np.int64)[:, None]
    b = qc.astype(np.int64)[None, :, :, None]
    expected = (table_of("JV3").astype(np.int64)[a, b] - 255 * a - 4 * b + 4 * 255).sum(axis=2)
    np.testing.assert_array_equal(klut.lut_bag_conv(cols, 4, qc, 255, gt), expected)


def test_wide_columns_and_many_taps_fall_back_to_the_scalar_kernels(shuffle_on):
    """A column spread of 24 bits or more, or more taps than the byte sums take: no tables,
    same results."""
    rng = np.random.default_rng(9)
    wide = rng.integers(0, 2 ** 25, (256, 256)).astype(np.int32)
    assert byte_shuffle.tap_tables(np.ascontiguousarray(wide.T),
                                   np.zeros((1, 1), np.uint8), 0, 0) is None
    qx = rng.integers(0, 256, (1, 2, 6, 6), dtype=np.uint8)
    qw = rng.integers(0, 256, (2, 1, 3, 3), dtype=np.uint8)
    np.testing.assert_array_equal(klut.lut_depthwise_conv(qx, 3, qw, 4, wide, 1, 1, 1),
                                  reference_lut_conv(qx, 3, qw, 4, wide, 1, 1, 1, 2))
    assert klut.lut_conv_codes(np.zeros((1, 2, 6, 6), np.float32), 0.1, 3, qw, 4, wide) is None
    gt = gather_table("2P7")
    # the AVX2 path's two windows add 2 bytes per tap into the same 16-bit sums
    n_taps = byte_shuffle.MAX_TAPS // (2 if shuffle_on == "avx2" else 1) + 1
    assert byte_shuffle.tap_tables(np.ascontiguousarray(gt.T),
                                   np.zeros((1, n_taps - 1), np.uint8), 0, 0) is not None
    assert byte_shuffle.tap_tables(np.ascontiguousarray(gt.T),
                                   np.zeros((1, n_taps), np.uint8), 0, 0) is None
    cols = rng.integers(0, 256, (1, n_taps, 5), dtype=np.uint8)
    qc = rng.integers(0, 256, (2, n_taps), dtype=np.uint8)
    a = cols.astype(np.int64)[:, None]
    b = qc.astype(np.int64)[None, :, :, None]
    expected = (table_of("2P7").astype(np.int64)[a, b] - 5 * a - 6 * b + 30).sum(axis=2)
    np.testing.assert_array_equal(klut.lut_bag_conv(cols, 6, qc, 5, gt), expected)


def test_switch_in_the_environment(monkeypatch):
    monkeypatch.setenv("APPROXDARTS_NP_TABLE_KERNELS", "scalar")
    assert byte_shuffle.path() == "scalar" and not byte_shuffle.available()
    monkeypatch.setenv("APPROXDARTS_NP_TABLE_KERNELS", "auto")
    assert byte_shuffle.available() == (byte_shuffle._cpu_has_vbmi()
                                        or byte_shuffle._cpu_has_avx2())
    monkeypatch.setenv("APPROXDARTS_NP_TABLE_KERNELS", "avx9")
    with pytest.raises(UserError, match="expected auto, vbmi, avx2 or scalar"):
        byte_shuffle.path()
    # auto takes the best path the CPU has
    for vbmi, avx2, best in ((True, True, "vbmi"), (False, True, "avx2"), (False, False, "scalar")):
        monkeypatch.setitem(byte_shuffle._CAN_RUN, "vbmi", lambda v=vbmi: v)
        monkeypatch.setitem(byte_shuffle._CAN_RUN, "avx2", lambda v=avx2: v)
        monkeypatch.setenv("APPROXDARTS_NP_TABLE_KERNELS", "auto")
        assert byte_shuffle.path() == best
    monkeypatch.setenv("APPROXDARTS_NP_TABLE_KERNELS", "vbmi")
    with pytest.raises(UserError, match="has no AVX-512 VBMI"):
        byte_shuffle.path()
    monkeypatch.setenv("APPROXDARTS_NP_TABLE_KERNELS", "avx2")
    with pytest.raises(UserError, match="has no AVX2"):
        byte_shuffle.path()


def test_numba_target_features_decide(monkeypatch):
    """Numba compiles for NUMBA_CPU_FEATURES when it is set (the CPU name alone changes only
    the tuning): the shuffles may only run when those features grant AVX-512 BW and VBMI."""
    from numba.core import config

    monkeypatch.setattr(config, "CPU_NAME", "generic")
    monkeypatch.setattr(config, "CPU_FEATURES", "")
    assert not byte_shuffle._cpu_has_vbmi.__wrapped__()
    monkeypatch.setattr(config, "CPU_FEATURES", "+avx2,+avx512f,+avx512bw")
    assert not byte_shuffle._cpu_has_vbmi.__wrapped__()
    assert byte_shuffle._cpu_has_avx2.__wrapped__()
    monkeypatch.setattr(config, "CPU_FEATURES", "+sse4.2,-avx2")
    assert not byte_shuffle._cpu_has_avx2.__wrapped__()
    monkeypatch.setattr(config, "CPU_FEATURES", "+avx512f,+avx512bw,+avx512vbmi")
    assert byte_shuffle._cpu_has_vbmi.__wrapped__()
    # no feature list: the host's features, whatever the name
    monkeypatch.setattr(config, "CPU_FEATURES", None)
    from llvmlite import binding
    host = binding.get_host_cpu_features()
    assert byte_shuffle._cpu_has_vbmi.__wrapped__() == bool(host.get("avx512bw")
                                                             and host.get("avx512vbmi"))
    assert byte_shuffle._cpu_has_avx2.__wrapped__() == bool(host.get("avx2"))


def test_results_do_not_depend_on_thread_count(shuffle_on):
    gt = gather_table("17KS")
    rng = np.random.default_rng(12)
    qx = rng.integers(0, 256, (4, 6, 12, 12), dtype=np.uint8)
    qw = rng.integers(0, 256, (6, 1, 3, 3), dtype=np.uint8)
    qp = rng.integers(0, 256, (5, 6), dtype=np.uint8)
    before = numba.get_num_threads()
    results = []
    try:
        for n in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(n)
            results.append((klut.lut_depthwise_conv(qx, 7, qw, 8, gt, 2, 1, 1),
                            klut.lut_bag_conv(qx.reshape(4, 6, 144), 7, qp, 8, gt)))
    finally:
        numba.set_num_threads(before)
    for a, b in zip(results[0], results[-1]):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- test the tester

@needs_avx2
def test_the_third_window_is_looked_up_where_a_column_needs_it(monkeypatch):
    """17KS: with three windows the tables carry one byte per tap, 1 exactly where the column
    needs the third window. Clearing such a byte drops a non-zero window (the output changes);
    setting it where the column needs two adds an all-zero window (the output stays)."""
    monkeypatch.setenv("APPROXDARTS_NP_TABLE_KERNELS", "avx2")
    gt = gather_table("17KS")
    table_t = np.ascontiguousarray(gt.T)
    need = windows_needed(table_of("17KS"))
    qw = np.array([[3, 170, 40], [230, 5, 90]], np.uint8).reshape(2, 1, 1, 3)  # 170, 230 need 3
    taps = qw.reshape(2, 3)
    assert (need[taps] == 3).tolist() == [[False, True, False], [True, False, False]]
    tabs, _ = byte_shuffle.tap_tables(table_t, taps, 4, 17)
    assert tabs.shape == (2, 3 * 97)
    np.testing.assert_array_equal(tabs[:, 3 * 96:], (need[taps] == 3).astype(np.uint8))
    rng = np.random.default_rng(14)
    qx = rng.integers(0, 256, (2, 2, 5, 9), dtype=np.uint8)
    good = klut.lut_depthwise_conv(qx, 4, qw, 17, gt, 1, (0, 1), 1)
    np.testing.assert_array_equal(good, _reference_dw(qx, 4, qw, 17, table_of("17KS"), 1, (0, 1), 1))
    real = byte_shuffle.tap_tables
    for channel, tap, changes in ((0, 1, True), (1, 0, True), (0, 0, False), (1, 2, False)):
        def flipped(*args, channel=channel, tap=tap, **kwargs):
            tabs, cst = real(*args, **kwargs)
            tabs[channel, 3 * 96 + tap] ^= 1
            return tabs, cst
        monkeypatch.setattr(byte_shuffle, "tap_tables", flipped)
        got = klut.lut_depthwise_conv(qx, 4, qw, 17, gt, 1, (0, 1), 1)
        assert (not np.array_equal(got, good)) == changes, (channel, tap)


@needs_avx2
def test_windows_of_a_table_changed_in_place_are_not_reused(monkeypatch):
    """A writable transposed table filled with another table's columns, in place, gives that
    table's products on the next call (only read-only tables keep their windows)."""
    monkeypatch.setenv("APPROXDARTS_NP_TABLE_KERNELS", "avx2")
    rng = np.random.default_rng(15)
    qx = rng.integers(0, 256, (1, 2, 6, 6), dtype=np.uint8)
    qw = rng.integers(0, 256, (2, 1, 3, 3), dtype=np.uint8)
    table_t = np.ascontiguousarray(gather_table("2P7").T).astype(np.int32)
    for name in ("2P7", "1JFF"):
        table_t[:] = table_of(name).T
        got = klut.lut_depthwise_conv(qx, 3, qw, 4, np.ascontiguousarray(table_t.T), 1, 1, 1,
                                      table_t=table_t)
        np.testing.assert_array_equal(got, reference_lut_conv(qx, 3, qw, 4, table_of(name),
                                                              1, 1, 1, 2), err_msg=name)


def test_a_wrong_tap_table_byte_is_caught(shuffle_on, monkeypatch):
    """One flipped byte in the shuffled tables (low or high plane; for AVX2 of each window)
    changes the output: the comparison above would see a wrong lookup."""
    gt = gather_table("2P7")
    rng = np.random.default_rng(13)
    qx = rng.integers(0, 256, (1, 2, 6, 6), dtype=np.uint8)
    qw = rng.integers(0, 256, (2, 1, 3, 3), dtype=np.uint8)
    good = klut.lut_depthwise_conv(qx, 3, qw, 4, gt, 1, 1, 1)
    code = int(qx[0, 0, 3, 3])          # an interior code that tap 0 of channel 0 reads
    real = byte_shuffle.tap_tables
    if shuffle_on == "vbmi":
        entries = [0 + code, 256 + code]
    else:   # window w of tap 0: bytes 32 w .. 32 w + 31, low bytes first
        entries = [32 * w + plane + ((code >> shift) & 15)
                   for w, shift in enumerate(byte_shuffle.WINDOW_SHIFTS[:2]) for plane in (0, 16)]
    for entry in entries:
        def corrupted(*args, entry=entry, **kwargs):
            tabs, cst = real(*args, **kwargs)
            tabs[0, entry] ^= 1
            return tabs, cst
        monkeypatch.setattr(byte_shuffle, "tap_tables", corrupted)
        assert not np.array_equal(klut.lut_depthwise_conv(qx, 3, qw, 4, gt, 1, 1, 1), good)
    monkeypatch.setattr(byte_shuffle, "tap_tables", real)
    np.testing.assert_array_equal(klut.lut_depthwise_conv(qx, 3, qw, 4, gt, 1, 1, 1), good)
