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
