"""The quantised convolution op: forward bit-exact against a plain NumPy table gather, STE backward.

The reference quantises with the library's quantiser (checked in
test_quantize.py) and then computes every output as an explicit int64 sum of
``M[q_x, q_w] − z_w·q_x − z_x·q_w + z_x·z_w`` over the receptive field, padding
with ``q = z_x``.
"""
from importlib import resources

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from hypothesis import assume, given
from hypothesis import strategies as st

from approxdarts_np import nn
from approxdarts_np.approx.arithmetic import arithmetic_from_spec
from approxdarts_np.approx.convolution import QuantizedArithmetic
from approxdarts_np.approx.lut_conv import approx_conv2d, choose_engine, make_lut_plan
from approxdarts_np.approx.multipliers import Multiplier, load_multiplier
from approxdarts_np.approx.quantize import dequantize, quantize_per_tensor
from approxdarts_np.autodiff import Tensor

torch.set_num_threads(2)


def gather_reference(qx, zx, qw, zw, table, stride, padding, dilation, groups):
    """int64 (N, Co, Ho, Wo) by explicit gathering, one output position at a time."""
    n, ci, h, w = qx.shape
    co, cig, kh, kw = qw.shape
    padded = np.full((n, ci, h + 2 * padding, w + 2 * padding), zx, dtype=np.int64)
    padded[:, :, padding:padding + h, padding:padding + w] = qx
    ho = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    wo = (w + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    out = np.zeros((n, co, ho, wo), dtype=np.int64)
    cog = co // groups
    t = table.astype(np.int64)
    for o in range(co):
        g = o // cog
        wq = qw[o].astype(np.int64)  # (cig, kh, kw)
        for i in range(ho):
            for j in range(wo):
                rows = i * stride + dilation * np.arange(kh)
                cols = j * stride + dilation * np.arange(kw)
                patch = padded[:, g * cig:(g + 1) * cig][:, :, rows][:, :, :, cols]  # (n, cig, kh, kw)
                terms = t[patch, wq[None]] - zw * patch - zx * wq[None] + zx * zw
                out[:, o, i, j] = terms.reshape(n, -1).sum(axis=1)
    return out


TABLES = ["exact", "mul8u_1446", "mul8u_17KS", "mul8u_L40", "mul8u_2P7"]


@given(st.sampled_from(TABLES), st.sampled_from(["dense", "depthwise", "pointwise"]),
       st.integers(1, 2), st.integers(1, 3), st.sampled_from([1, 3, 5]), st.sampled_from([1, 2]),
       st.sampled_from([1, 2]), st.integers(0, 2), st.integers(0, 10_000))
def test_forward_equals_gather_reference(name, kind, n, c, k, stride, dilation, padding, seed):
    size = 7
    if kind == "pointwise":
        k, padding, dilation = 1, 0, 1
    assume(size + 2 * padding - dilation * (k - 1) - 1 >= 0)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, size, size)).astype(np.float32)
    if seed % 3 == 0:
        x = np.maximum(x, 0)  # ReLU outputs: zero point 0
    groups = c if kind == "depthwise" else 1
    co = c if kind == "depthwise" else 2
    w = (0.3 * rng.standard_normal((co, c // groups, k, k))).astype(np.float32)
    arith = arithmetic_from_spec(name)
    y = arith.conv2d(Tensor(x), Tensor(w), stride, padding, dilation, groups)
    qx, sx, zx = quantize_per_tensor(x)
    qw, sw, zw = quantize_per_tensor(w)
    ref = gather_reference(qx, zx, qw, zw, arith.multiplier.table, stride, padding, dilation, groups)
    np.testing.assert_array_equal(y.data, (ref * (sx * sw)).astype(np.float32))


def test_exact_table_equals_integer_convolution():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    y = arithmetic_from_spec("exact").conv2d(Tensor(x), Tensor(w), 1, 1, 1, 1)
    qx, sx, zx = quantize_per_tensor(x)
    qw, sw, zw = quantize_per_tensor(w)
    ints = TF.conv2d(torch.tensor(qx.astype(np.float64) - zx), torch.tensor(qw.astype(np.float64) - zw),
                     padding=1).numpy()
    np.testing.assert_array_equal(y.data, (np.rint(ints).astype(np.int64) * (sx * sw)).astype(np.float32))
    # and it is close to the float convolution (quantisation error only)
    fl = TF.conv2d(torch.tensor(x), torch.tensor(w), padding=1).numpy()
    assert np.abs(y.data - fl).max() < 0.05 * np.abs(fl).max()


def test_straight_through_gradient_is_the_float_gradient_at_dequantised_operands():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    w = rng.standard_normal((3, 1, 3, 3)).astype(np.float32)
    tx, tw = Tensor(x, requires_grad=True), Tensor(w, requires_grad=True)
    y = arithmetic_from_spec("mul8u_2P7").conv2d(tx, tw, 2, 2, 2, 3)
    g = rng.standard_normal(y.shape).astype(np.float32)
    y.backward(g)
    xd = torch.tensor(dequantize(*quantize_per_tensor(x)), requires_grad=True)
    wd = torch.tensor(dequantize(*quantize_per_tensor(w)), requires_grad=True)
    TF.conv2d(xd, wd, None, 2, 2, 2, groups=3).backward(torch.tensor(g))
    np.testing.assert_allclose(tx.grad, xd.grad.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tw.grad, wd.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_a_corrupted_table_entry_is_caught():
    rng = np.random.default_rng(2)
    x = np.abs(rng.standard_normal((1, 2, 5, 5))).astype(np.float32)
    w = rng.standard_normal((2, 2, 3, 3)).astype(np.float32)
    good = load_multiplier("mul8u_1446")
    qx, sx, zx = quantize_per_tensor(x)
    qw, sw, zw = quantize_per_tensor(w)
    bad_table = good.table.copy()
    bad_table[qx[0, 0, 2, 2], qw[0, 0, 1, 1]] += 1  # an entry the centre output uses
    bad = QuantizedArithmetic(Multiplier("corrupt", bad_table, "test"))
    ref = gather_reference(qx, zx, qw, zw, good.table, 1, 1, 1, 1)
    y_bad = bad.conv2d(Tensor(x), Tensor(w), 1, 1, 1, 1)
    with pytest.raises(AssertionError):
        np.testing.assert_array_equal(y_bad.data, (ref * (sx * sw)).astype(np.float32))


def test_layers_switch_to_the_multiplier():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 2, 5, 5)).astype(np.float32)
    conv = nn.Conv2d(2, 2, 3, padding=1, rng=rng)
    float_out = conv(Tensor(x)).data
    conv.arithmetic = arithmetic_from_spec("mul8u_17KS")
    approx_out = conv(Tensor(x)).data
    assert not np.array_equal(float_out, approx_out)
    assert np.abs(float_out - approx_out).max() < 0.2 * np.abs(float_out).max()


BUNDLED = sorted(p.name.removesuffix(".bin") for p in
                 resources.files("approxdarts_np.approx").joinpath("tables").iterdir()
                 if p.name.startswith("mul8u_") and p.name.endswith(".bin"))


def engines_of(plan):
    return ["auto", "gather"] + (["lowrank"] if plan.factors is not None else [])


@pytest.mark.parametrize("name", ["exact"] + BUNDLED)
def test_every_bundled_table_and_engine_equals_the_plain_gather(name):
    """approx_conv2d (quantisation included) on float operands, depthwise and pointwise."""
    assert len(BUNDLED) == 36
    table = load_multiplier(name).table
    plan = make_lut_plan(table, max_rank=40)        # factors for every table that has them
    rng = np.random.default_rng(sum(name.encode()))
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    if name < "mul8u_5":
        x = np.maximum(x, 0)                         # half of the tables see zero point 0
    cases = [((3, 1, 3, 3), (1, 2, 2, 3)), ((4, 3, 1, 1), (1, 0, 1, 1)),
             ((3, 1, 5, 5), (2, 2, 1, 3))]           # weight shape, (stride, pad, dil, groups)
    qx, sx, zx = quantize_per_tensor(x)
    for w_shape, (stride, padding, dilation, groups) in cases:
        w = (0.2 * rng.standard_normal(w_shape)).astype(np.float32)
        qw, sw, zw = quantize_per_tensor(w)
        ref = gather_reference(qx, zx, qw, zw, table, stride, padding, dilation, groups)
        expected = (ref * (sx * sw)).astype(np.float32)
        for engine in engines_of(plan):
            y, x_codes, w_codes = approx_conv2d(x, w, plan, stride, padding, dilation, groups,
                                                engine=engine)
            assert y.dtype == np.float32
            np.testing.assert_array_equal(y, expected, err_msg=f"{name} {engine} {w_shape}")
            np.testing.assert_array_equal(x_codes[0], qx)
            assert x_codes[1:] == (sx, zx) and w_codes[1:] == (sw, zw)
            np.testing.assert_array_equal(w_codes[0], qw)


@pytest.mark.parametrize("engine", ["gather", "lowrank"])
def test_a_corrupted_table_entry_is_caught_by_every_engine(engine):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 2, 5, 5)).astype(np.float32)
    for w_shape, groups, padding in (((2, 1, 3, 3), 2, 1), ((3, 2, 1, 1), 1, 0)):
        w = rng.standard_normal(w_shape).astype(np.float32)
        qx, sx, zx = quantize_per_tensor(x)
        qw, sw, zw = quantize_per_tensor(w)
        good = load_multiplier("mul8u_2P7").table
        bad = good.copy()
        bad[qx[0, 0, 2, 2], qw[0, 0, 0, 0]] += 1     # an entry the output uses
        expected = (gather_reference(qx, zx, qw, zw, good, 1, padding, 1, groups)
                    * (sx * sw)).astype(np.float32)
        y_good = approx_conv2d(x, w, make_lut_plan(good), 1, padding, 1, groups,
                               engine=engine)[0]
        y_bad = approx_conv2d(x, w, make_lut_plan(bad, max_rank=20), 1, padding, 1, groups,
                              engine=engine)[0]
        np.testing.assert_array_equal(y_good, expected)
        assert not np.array_equal(y_bad, expected)


def test_engine_choice_depends_on_rank_and_shape():
    exact = make_lut_plan(load_multiplier("exact").table)
    l40 = make_lut_plan(load_multiplier("mul8u_L40").table)
    for x_shape, w_shape, groups in [((16, 4, 32, 32), (4, 1, 3, 3), 4),
                                     ((64, 16, 32, 32), (16, 16, 1, 1), 1)]:
        assert choose_engine(exact, x_shape, w_shape, 1, groups) == "lowrank"
        assert choose_engine(l40, x_shape, w_shape, 1, groups) == "gather"   # no factors
    # a high rank loses to the gather on a pointwise conv
    p17 = make_lut_plan(load_multiplier("mul8u_17KS").table, max_rank=20)
    assert choose_engine(p17, (64, 16, 32, 32), (16, 16, 1, 1), 1, 1) == "gather"


def _tie_laden(rng, shape, relu):
    """float32 values of which a third sit exactly on a half-way point k + 1/2 of x / s."""
    x = rng.standard_normal(shape).astype(np.float32)
    if relu:
        x = np.maximum(x, 0)
    s, _ = quantize_per_tensor(x)[1:]
    k = rng.integers(-100, 100, shape)
    ties = ((k + 0.5) * s).astype(np.float32)
    pick = rng.random(shape) < 1 / 3
    inside = (ties >= x.min()) & (ties <= x.max())
    return np.where(pick & inside, ties, x).astype(np.float32)


@pytest.mark.parametrize("name", ["exact", "mul8u_1446", "mul8u_Y48", "mul8u_1JFF"])
@pytest.mark.parametrize("n, c, size, k, stride, dilation", [
    (5, 6, 8, 3, 1, 1), (3, 4, 16, 5, 1, 1), (4, 3, 9, 3, 2, 1), (2, 5, 12, 3, 1, 2),
    (7, 2, 5, 5, 2, 2),
])
def test_one_pass_quantised_convolutions_equal_the_separate_passes(name, n, c, size, k, stride,
                                                                   dilation):
    """depthwise_conv2d_codes / pointwise_conv2d_codes against quantise + float conv + sum.

    Several images per work item, several work items per thread, strides and dilations, every
    feature count (exact: 1, 1446: 3, ...), inputs full of exact ties: outputs and codes equal.
    """
    from approxdarts_np.approx.lowrank import (activation_features, feature_conv,
                                               filter_constants, weight_features)
    from approxdarts_np.approx.quantize import quantize_to_features
    from approxdarts_np.kernels import conv as kconv
    from approxdarts_np.kernels import depthwise as kdw

    plan = make_lut_plan(load_multiplier(name).table)
    assert plan.factors is not None
    rng = np.random.default_rng([n, c, size, k, stride, dilation])
    for relu in (True, False):
        x = _tie_laden(rng, (n, c, size, size), relu)
        qx_ref, sx, zx = quantize_per_tensor(x)
        act = activation_features(plan.factors, zx)
        n_feat = act.table.shape[1]
        for kind in ("depthwise", "pointwise"):
            w_shape = (c, 1, k, k) if kind == "depthwise" else (3, c, 1, 1)
            w = (0.3 * rng.standard_normal(w_shape)).astype(np.float32)
            qw, sw, zw = quantize_per_tensor(w)
            _, wf = quantize_to_features(w, sw, zw, weight_features(plan.factors, zw).table)
            cst = filter_constants(act, qw)
            _, xf = quantize_to_features(x, sx, zx, act.table)
            if kind == "depthwise":
                wf = wf.reshape(c * n_feat, 1, k, k)
                pad = dilation * (k - 1) // 2
                geom = (stride, pad, dilation)
                y, codes = kdw.depthwise_conv2d_codes(x, sx, zx, act.table_t, wf, cst, sx * sw,
                                                      *geom)
                ref = feature_conv(xf, wf, cst, n_feat, True, *geom, c, sx * sw)
            else:
                y, codes = kconv.pointwise_conv2d_codes(x, sx, zx, act.table_t, wf, cst, sx * sw)
                ref = feature_conv(xf, wf, cst, n_feat, False, 1, 0, 1, 1, sx * sw)
            np.testing.assert_array_equal(codes, qx_ref)
            np.testing.assert_array_equal(y, ref, err_msg=f"{name} {kind} relu={relu}")


def test_the_tester_one_pass_convolution_sees_a_wrong_feature_entry():
    """A feature table with one wrong entry (for a code the input uses) changes the output."""
    from approxdarts_np.kernels import depthwise as kdw

    rng = np.random.default_rng(3)
    x = np.maximum(rng.standard_normal((2, 3, 6, 6)), 0).astype(np.float32)
    qx, sx, zx = quantize_per_tensor(x)
    table = (np.arange(256) - zx).astype(np.float32)[None, :]
    w = rng.integers(-5, 5, (3, 1, 3, 3)).astype(np.float32)
    good = kdw.depthwise_conv2d_codes(x, sx, zx, table, w, np.zeros(3), 1.0, 1, 1, 1)[0]
    bad_table = table.copy()
    bad_table[0, qx[1, 2, 3, 3]] += 1                 # no longer code - zx: looked up, wrong
    bad = kdw.depthwise_conv2d_codes(x, sx, zx, bad_table, w, np.zeros(3), 1.0, 1, 1, 1)[0]
    assert not np.array_equal(good, bad)


@pytest.mark.parametrize("kind", ["depthwise", "pointwise"])
def test_one_pass_convolutions_look_up_a_feature_0_that_is_not_code_minus_z(kind):
    """With a feature table whose first row is not code - z (so it is looked up, not computed
    in the codes pass), the one-pass kernels equal NumPy gathers of the features followed by
    the float convolution and the constant; test the tester: the affine first row gives
    other outputs."""
    from approxdarts_np.approx.lowrank import feature_conv
    from approxdarts_np.kernels import conv as kconv
    from approxdarts_np.kernels import depthwise as kdw

    rng = np.random.default_rng(17)
    c, n_feat = 4, 2
    x = np.maximum(rng.standard_normal((3, c, 9, 9)), 0).astype(np.float32)
    qx, sx, zx = quantize_per_tensor(x)
    table_t = rng.integers(-20, 20, (n_feat, 256)).astype(np.float32)
    table_t[:, zx] = 0.0                              # zero padding stays the right padding
    xf = np.ascontiguousarray(                        # (N, C*J, H, W), channel c*J + j
        np.moveaxis(table_t[:, qx], 0, 2).reshape(3, c * n_feat, 9, 9))
    if kind == "depthwise":
        wf = rng.integers(-9, 9, (c * n_feat, 1, 3, 3)).astype(np.float32)
        cst = rng.integers(-50, 50, c)
        y, codes = kdw.depthwise_conv2d_codes(x, sx, zx, table_t, wf, cst, 0.5, 1, 1, 1)
        ref = feature_conv(xf, wf, cst, n_feat, True, 1, 1, 1, c, 0.5)
    else:
        wf = rng.integers(-9, 9, (5, c * n_feat, 1, 1)).astype(np.float32)
        cst = rng.integers(-50, 50, 5)
        y, codes = kconv.pointwise_conv2d_codes(x, sx, zx, table_t, wf, cst, 0.5)
        ref = feature_conv(xf, wf, cst, n_feat, False, 1, 0, 1, 1, 0.5)
    np.testing.assert_array_equal(codes, qx)
    np.testing.assert_array_equal(y, ref)
    affine = table_t.copy()
    affine[0] = np.arange(256) - zx
    if kind == "depthwise":
        other = kdw.depthwise_conv2d_codes(x, sx, zx, affine, wf, cst, 0.5, 1, 1, 1)[0]
    else:
        other = kconv.pointwise_conv2d_codes(x, sx, zx, affine, wf, cst, 0.5)[0]
    assert not np.array_equal(other, ref)


def test_a_layer_shows_its_arithmetic_and_engine():
    rng = np.random.default_rng(0)
    conv = nn.Conv2d(2, 2, 3, padding=1, rng=rng)
    assert repr(conv).endswith("float32)")
    conv.arithmetic = arithmetic_from_spec("mul8u_17KS")
    assert "QuantizedArithmetic(mul8u_17KS, engine=gather)" in repr(conv)
    conv.arithmetic = arithmetic_from_spec("exact")
    assert "QuantizedArithmetic(exact, engine=lowrank)" in repr(conv)
