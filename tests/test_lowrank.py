"""Exact integer decomposition M - a*b = u @ v.T and the low-rank engine's exactness rules."""
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from approxdarts_np.approx import lowrank
from approxdarts_np.approx.lowrank import (FLOAT32_EXACT_LIMIT, FLOAT64_EXACT_LIMIT,
                                           LowRankBoundError, exact_error_factors)

# the shared data folder next to the repository; the package's bundled copy of the same files
# when the repository is checked out on its own
TABLE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "evoapprox-mul8u"
if not TABLE_DIR.is_dir():
    TABLE_DIR = Path(str(resources.files("approxdarts_np.approx").joinpath("tables")))
BUNDLED = sorted(p.stem.removeprefix("mul8u_") for p in TABLE_DIR.glob("mul8u_*.bin"))
CODES = np.arange(256, dtype=np.int64)
# ranks of M - a*b stated in docs/design.md §2
DESIGN_RANKS = {"1446": 1, "Y48": 1, "JQQ": 3, "2P7": 6, "7C1": 8, "17KS": 19, "1JFF": 0}


def load_table(name):
    raw = np.fromfile(TABLE_DIR / f"mul8u_{name}.bin", dtype="<u2")
    return raw.reshape(256, 256).astype(np.int64)


def error_of(table):
    return np.asarray(table, np.int64) - np.outer(CODES, CODES)


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_factors_are_exact(name):
    table = load_table(name)
    err = error_of(table)
    factors = exact_error_factors(table, max_rank=20)
    numeric_rank = np.linalg.matrix_rank(err.astype(np.float64))
    if numeric_rank > 20:
        assert factors is None
        return
    assert factors is not None and factors.rank == numeric_rank
    assert factors.u.dtype == np.int64 and factors.v.dtype == np.int64
    assert factors.u.shape == factors.v.shape == (256, numeric_rank)
    assert not factors.u.flags.writeable and not factors.v.flags.writeable
    np.testing.assert_array_equal(factors.u @ factors.v.T, err)


@pytest.mark.parametrize("name,rank", sorted(DESIGN_RANKS.items()))
def test_design_ranks_and_small_factors(name, rank):
    table = load_table(name)
    factors = exact_error_factors(table, max_rank=32)
    assert factors.rank == rank
    # reduced factors: the per-entry sum of |u_r||v_r| stays within a few times max |E|
    assert factors.peak_term() <= 4 * np.abs(error_of(table)).max()
    assert exact_error_factors(table, max_rank=rank - 1) is None if rank else True


@st.composite
def integer_low_rank(draw):
    """E = U0 @ V0.T with random small integer factors (rank <= r), sometimes scaled."""
    r = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    scale = draw(st.sampled_from([1, 1, 6, 35]))
    mag = draw(st.sampled_from([1, 3, 60]))
    rng = np.random.default_rng(seed)
    u0 = rng.integers(-mag, mag + 1, (256, r))
    v0 = rng.integers(-mag, mag + 1, (256, r))
    # sparse rows make rows of E rational (not integer) combinations of a few others
    u0[rng.random((256, r)) < 0.5] = 0
    return scale * (u0 @ v0.T)


@given(err=integer_low_rank())
def test_random_integer_low_rank_is_reproduced(err):
    table = np.outer(CODES, CODES) + err
    rank = np.linalg.matrix_rank(err.astype(np.float64))
    factors = exact_error_factors(table, max_rank=8)
    assert factors is not None and factors.rank == rank
    np.testing.assert_array_equal(factors.u @ factors.v.T, err)


@pytest.mark.parametrize("name", ["1446", "2P7", "JQQ", "17KS"])
def test_feature_identity_over_all_code_pairs(name):
    """F[a].G[b] + u[zx].v[b] == M[a, b] - zw*a - zx*b + zx*zw for every (a, b), F[zx] == 0."""
    table = load_table(name)
    factors = exact_error_factors(table, max_rank=20)
    for zx, zw in [(0, 0), (255, 255), (3, 140)]:
        f, g, g0 = lowrank._features(factors, zx, zw)
        lhs = f @ g.T + g0[None, :]
        rhs = table - zw * CODES[:, None] - zx * CODES[None, :] + zx * zw
        np.testing.assert_array_equal(lhs, rhs)
        assert not f[zx].any()


def test_gemm_plan_limits():
    assert lowrank._gemm_plan(258, 65025) == (np.float32, 258)        # 258*65025 <= 2**24
    assert lowrank._gemm_plan(259, 65025) == (np.float32, 258)        # split into chunks
    assert lowrank._gemm_plan(4, 0) == (np.float32, 4)
    dtype, chunk = lowrank._gemm_plan(100, FLOAT32_EXACT_LIMIT // 8)   # chunk 8 < 16: float64
    assert dtype == np.float64 and chunk == 100
    assert lowrank._gemm_plan(10, FLOAT32_EXACT_LIMIT + 1)[0] == np.float64
    with pytest.raises(LowRankBoundError):
        lowrank._gemm_plan(1, FLOAT64_EXACT_LIMIT + 1)


def test_float32_sum_at_the_limit_is_exact_and_past_it_is_not():
    """The bound the engine relies on: integer partial sums <= 2**24 are exact in float32."""
    a = np.full((1, 258), 255, np.float32)
    b = np.full((258, 1), 255, np.float32)
    assert int(np.dot(a, b)[0, 0]) == 258 * 65025                      # <= 2**24: exact
    # test the tester: one more odd term past 2**24 is no longer representable
    assert int(np.float32(2 ** 24) + np.float32(1)) != 2 ** 24 + 1


@pytest.mark.parametrize("name", ["exact", "mul8u_1446", "mul8u_199Z", "mul8u_JQQ"])   # ranks 0, 1, 1, 3
@pytest.mark.parametrize("shape", [(8, 1, 3, 3), (6, 4, 1, 1), (3, 2, 5, 5)])
@pytest.mark.parametrize("kind", ["normal", "zeros", "constant", "negative", "subnormal_scale"])
def test_weight_codes_is_the_three_step_weight_path(name, shape, kind):
    """One compiled call gives the scale, zero point, codes, features and filter constants of
    quant_params + codes_and_features + filter_constants, bit for bit, including the all-zero
    and constant tensors and a scale whose inverse is no float32 (the exact-rule path)."""
    from approxdarts_np.approx.multipliers import load_multiplier
    from approxdarts_np.approx.quantize import codes_and_features, quant_params, weight_codes
    factors = lowrank.exact_error_factors(load_multiplier(name).table, 4)
    rng = np.random.default_rng(len(name) + sum(shape))
    w = rng.standard_normal(shape).astype(np.float32)
    w = {"normal": w, "zeros": 0 * w, "constant": np.full_like(w, 0.75), "negative": -np.abs(w),
         "subnormal_scale": (w * 1e-39).astype(np.float32)}[kind]
    for zx in (0, 37, 255):
        act = lowrank.activation_features(factors, zx)
        sw, zw = quant_params(w)
        wgt = lowrank.weight_features(factors, zw)
        qw, wf = codes_and_features(w, sw, zw, wgt.table_t, wgt.affine)
        cst = lowrank.filter_constants(act, qw)
        got = weight_codes(w, lowrank.weight_error_rows(factors), act.const)
        assert got[:2] == (sw, zw)
        np.testing.assert_array_equal(got[2], qw)
        np.testing.assert_array_equal(got[3], wf)
        np.testing.assert_array_equal(got[4], cst)
        assert got[3].shape == wf.shape and got[4].dtype == np.int64


def test_weight_codes_refuses_nan_and_infinity():
    from approxdarts_np.approx.quantize import weight_codes
    factors = lowrank.exact_error_factors(np.outer(np.arange(256), np.arange(256)), 0)
    act = lowrank.activation_features(factors, 0)
    for bad in (np.nan, np.inf, -np.inf):
        w = np.ones((2, 1, 3, 3), np.float32)
        w[1, 0, 2, 2] = bad
        with pytest.raises(ValueError, match="NaN or infinity"):
            weight_codes(w, lowrank.weight_error_rows(factors), act.const)
