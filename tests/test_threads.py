"""The thread policy: thread counts checked against the machine, BLAS at one thread, restored on exit,
idle threads that sleep by default, and bit-identical steps for a fixed thread count."""
import os
import subprocess
import sys

import numba
import numpy as np
import pytest

from approxdarts_np.autodiff import Tensor
from approxdarts_np.autodiff import functional as F
from approxdarts_np.errors import UserError
from approxdarts_np.kernels.threads import (available_cores, blas_is_single_threaded, configure_threads,
                                            resolve_threads, thread_policy)
from approxdarts_np.nas.model_search import Network


def test_more_threads_than_cores_is_one_clear_user_error():
    cores = available_cores()
    with pytest.raises(UserError) as err:
        configure_threads(cores + 1)
    message = str(err.value)
    assert "--threads" in message and str(cores) in message and "\n" not in message
    with pytest.raises(UserError, match="--threads"):
        configure_threads(0)


def test_none_means_every_core_numba_may_use():
    assert resolve_threads(None) == min(numba.config.NUMBA_NUM_THREADS, available_cores())
    assert resolve_threads(1) == 1


def test_thread_policy_sets_and_restores():
    before = numba.get_num_threads()
    with thread_policy(1) as n:
        assert n == 1 and numba.get_num_threads() == 1
        assert blas_is_single_threaded()
    assert numba.get_num_threads() == before


@pytest.mark.parametrize("env, expected", [({}, "passive"), ({"OMP_WAIT_POLICY": "active"}, "active")])
def test_idle_threads_sleep_unless_the_environment_says_otherwise(env, expected):
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = "import os, approxdarts_np; print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == expected


def _gradients(threads: int) -> list[np.ndarray]:
    net = Network(channels=2, num_classes=10, layers=3, seed=0)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((3, 3, 8, 8)).astype(np.float32)
    labels = rng.integers(0, 10, 3)
    with thread_policy(threads):
        F.cross_entropy(net(Tensor(images)), labels).backward()
    return [p.grad for p in net.parameters()]


def test_a_step_is_bit_identical_for_a_fixed_thread_count():
    n = resolve_threads(None)
    first, second = _gradients(n), _gradients(n)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def _kernel_results():
    """Every kernel that has a serial twin, on small shapes (forward and gradients)."""
    from approxdarts_np.approx.lowrank import activation_features, filter_constants, weight_features
    from approxdarts_np.approx.lut_conv import make_lut_plan
    from approxdarts_np.approx.multipliers import load_multiplier
    from approxdarts_np.approx.quantize import codes_and_features, quant_params
    from approxdarts_np.kernels import batchnorm as kbn
    from approxdarts_np.kernels import conv as kconv
    from approxdarts_np.kernels import depthwise as kdw
    from approxdarts_np.kernels import pool as kpool

    rng = np.random.default_rng(11)
    x = rng.standard_normal((3, 4, 9, 9)).astype(np.float32)
    out = []
    for stride, dil in ((1, 1), (2, 1), (1, 2)):
        w = rng.standard_normal((4, 1, 3, 3)).astype(np.float32)
        y = kdw.depthwise_conv2d(x, w, stride, dil, dil)
        out += [y, kdw.depthwise_conv2d_grad_input(y, w, x.shape, stride, dil, dil),
                kdw.depthwise_conv2d_grad_weight(y, x, w.shape, stride, dil, dil)]
        wd = rng.standard_normal((6, 2, 3, 3)).astype(np.float32)
        y = kconv.conv2d(x, wd, stride, 1, dil, 2)
        out += [y, kconv.conv2d_grad_input(y, wd, x.shape, stride, 1, dil, 2),
                kconv.conv2d_grad_weight(y, x, wd.shape, stride, 1, dil, 2)]
        for k in (3, 2):
            y, arg = kpool.max_pool2d(x, k, stride, 1)
            out += [y, arg, kpool.max_pool2d_grad(y, arg, x.shape)]
            y = kpool.avg_pool2d(x, k, stride, 1)
            out += [y, kpool.avg_pool2d_grad(y, x.shape, k, stride, 1)]
    g, b = rng.standard_normal(4).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    y, mean, var, invstd = kbn.batch_norm_train(x, g, b, 1e-5)
    out += [y, mean, var, invstd, *kbn.batch_norm_grad(y, x, mean, invstd, g)]
    plan = make_lut_plan(load_multiplier("mul8u_1446").table)
    sx, zx = quant_params(x)
    act = activation_features(plan.factors, zx)
    wq = rng.standard_normal((4, 1, 3, 3)).astype(np.float32)
    sw, zw = quant_params(wq)
    qw, wf = codes_and_features(wq, sw, zw, weight_features(plan.factors, zw).table_t)
    n_feat = act.table.shape[1]
    out += list(kdw.depthwise_conv2d_codes(x, sx, zx, act.table_t, wf.reshape(4 * n_feat, 1, 3, 3),
                                           filter_constants(act, qw), sx * sw, 1, 1, 1))
    wp = rng.standard_normal((3, 4, 1, 1)).astype(np.float32)
    sp, zp = quant_params(wp)
    qp, pf = codes_and_features(wp, sp, zp, weight_features(plan.factors, zp).table_t)
    out += list(kconv.pointwise_conv2d_codes(x, sx, zx, act.table_t, pf,
                                             filter_constants(act, qp), sx * sp))
    from approxdarts_np.approx.quantize import quantize_per_tensor
    from approxdarts_np.kernels import lut_conv as klut
    table = make_lut_plan(load_multiplier("mul8u_2P7").table).gather_table
    qx, _, _ = quantize_per_tensor(x)
    before = os.environ.get("APPROXDARTS_NP_TABLE_KERNELS")
    try:
        # the shuffle kernels where the CPU has them (VBMI and AVX2 on a CPU with VBMI), and the
        # scalar ones
        from approxdarts_np.kernels import byte_shuffle
        for shuffle in ("auto", "avx2", "scalar") if byte_shuffle._cpu_has_vbmi() else ("auto", "scalar"):
            os.environ["APPROXDARTS_NP_TABLE_KERNELS"] = shuffle
            for stride in (1, 2):
                out.append(klut.lut_depthwise_conv(qx, zx, qw, zw, table, stride, 1, 1))
                cols = klut.im2col_codes(qx, zx, 3, stride, 1, 1)
                out += [cols, klut.lut_bag_conv(cols, zx, qw.reshape(4, 9).repeat(4, axis=1)[:3],
                                                zw, table)]
            one_pass = klut.lut_conv_codes(x, sx, zx, qw, zw, table, 1, 1, 1, sx * sw)
            out += list(one_pass) if one_pass is not None else []
            one_pass = klut.lut_conv_codes(x, sx, zx, qp, zp, table, out_scale=sx * sp)
            out += list(one_pass) if one_pass is not None else []
    finally:
        if before is None:
            os.environ.pop("APPROXDARTS_NP_TABLE_KERNELS", None)
        else:
            os.environ["APPROXDARTS_NP_TABLE_KERNELS"] = before
    return out


def test_serial_twins_give_the_parallel_kernels_bits():
    """Small calls run each kernel's serial twin; forcing every call onto the thread team
    must not change a single bit."""
    from approxdarts_np.kernels import _util

    before = _util.force_variant("serial")
    try:
        serial = _kernel_results()
        _util.force_variant("parallel")
        parallel = _kernel_results()
    finally:
        _util.force_variant(before)
    assert len(serial) == len(parallel) > 40
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(a, b)


def test_small_calls_take_the_serial_twin_and_large_ones_the_thread_team(uncrowded):
    from approxdarts_np.kernels import _util
    from approxdarts_np.kernels import depthwise as kdw

    kernel, n = _util.pick_kernel(kdw._depthwise_forward_kernel,
                                  kdw._depthwise_forward_kernel_serial, _util.SERIAL_BELOW - 1)
    assert kernel is kdw._depthwise_forward_kernel_serial and n == 1
    if available_cores() >= 2:
        with thread_policy(2):
            kernel, n = _util.pick_kernel(kdw._depthwise_forward_kernel,
                                          kdw._depthwise_forward_kernel_serial, _util.SERIAL_BELOW)
            assert kernel is kdw._depthwise_forward_kernel and n == 2
    with thread_policy(1):     # no team to wake
        kernel, n = _util.pick_kernel(kdw._depthwise_forward_kernel,
                                      kdw._depthwise_forward_kernel_serial, _util.SERIAL_BELOW)
        assert kernel is kdw._depthwise_forward_kernel_serial and n == 1
    assert not kdw._depthwise_forward_kernel_serial.targetoptions.get("parallel")
