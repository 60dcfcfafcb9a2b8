"""The check for other processes on the cores (kernels/crowding.py), the short spin the package
sets for idle workers, and the kernels going serial while the machine is crowded."""
import os
import subprocess
import sys
import time

import numba
import numpy as np
import pytest

from approxdarts_np.kernels import _util, crowding
from approxdarts_np.kernels.crowding import CLEAR_BELOW, CROWDED_ABOVE, INTERVAL, Crowding
from approxdarts_np.kernels.threads import available_cores


class Clocks:
    """A machine whose busy seconds, this process's CPU seconds and wall clock the test moves."""

    def __init__(self):
        self.busy, self.own, self.now = 1000.0, 10.0, 50.0

    def advance(self, seconds, own_cores, other_cores):
        self.now += seconds
        self.own += own_cores * seconds
        self.busy += (own_cores + other_cores) * seconds

    def crowding(self, cores=2):
        return Crowding(busy=lambda: self.busy, own=lambda: self.own, wall=lambda: self.now,
                        cores=cores)


def test_others_use_beyond_the_spare_cores_makes_it_crowded_with_hysteresis():
    c = Clocks()
    state = c.crowding(cores=2)
    assert state.look(team=2) is False            # the first look only starts the count
    c.advance(1.0, own_cores=2.0, other_cores=0.1)
    assert state.look(team=2) is False and state.others == pytest.approx(0.1)
    # others' use is machine busy minus ours, not the machine's busy time itself
    c.advance(1.0, own_cores=1.0, other_cores=CROWDED_ABOVE + 0.05)
    assert state.look(team=2) is True and state.others == pytest.approx(CROWDED_ABOVE + 0.05)
    # between the two bounds it stays as it was (no flapping)
    c.advance(1.0, own_cores=1.0, other_cores=(CROWDED_ABOVE + CLEAR_BELOW) / 2)
    assert state.look(team=2) is True
    c.advance(1.0, own_cores=2.0, other_cores=CLEAR_BELOW - 0.05)
    assert state.look(team=2) is False
    c.advance(1.0, own_cores=2.0, other_cores=(CROWDED_ABOVE + CLEAR_BELOW) / 2)
    assert state.look(team=2) is False


def test_cores_the_team_leaves_free_are_not_crowding():
    c = Clocks()
    state = c.crowding(cores=4)
    state.look(team=2)
    c.advance(1.0, own_cores=2.0, other_cores=2.0)    # the other two cores: no conflict
    assert state.look(team=2) is False
    c.advance(1.0, own_cores=2.0, other_cores=2.0 + CROWDED_ABOVE + 0.05)
    assert state.look(team=2) is True


def test_it_looks_at_most_every_interval_and_counts_the_calls_it_sends_serial():
    c = Clocks()
    state = c.crowding(cores=2)
    assert state(2) is False                           # first look
    c.advance(INTERVAL / 2, own_cores=1.0, other_cores=2.0)
    assert state(2) is False                           # too soon to look again
    c.advance(INTERVAL / 2, own_cores=1.0, other_cores=2.0)
    assert state(2) is True                            # over the whole interval: 1.0 others
    assert state(2) is True and state.serial_calls == 2


def test_without_the_machines_busy_time_it_is_never_crowded():
    state = Crowding(busy=lambda: None, cores=2)
    assert state(2) is False and state(2) is False and state.serial_calls == 0


def test_proc_stat_counts_user_nice_system_irq_softirq_and_steal(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  100 5 50 1000 20 1 2 3 0 0\ncpu0 50 2 25 500 10 0 1 1 0 0\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(
        stat if path == "/proc/stat" else path, *a, **k))
    assert crowding.machine_busy_seconds() == pytest.approx((100 + 5 + 50 + 1 + 2 + 3) / crowding._TICKS)


@pytest.mark.skipif(crowding.machine_busy_seconds() is None, reason="the OS does not tell the busy time")
def test_a_busy_neighbour_is_seen():
    """A real CPU-bound process next to this one: seen as about one core of others' use, and a
    team as large as the machine is then crowded."""
    state = Crowding()
    team = available_cores()
    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        state.look(team)
        time.sleep(1.0)
        assert state.look(team) is True
        assert 0.7 < state.others < team + 0.3
    finally:
        neighbour.kill()
        neighbour.wait()


def test_a_crowded_machine_sends_large_calls_to_the_serial_twin(monkeypatch):
    kernel, twin = object(), object()
    asked = []
    monkeypatch.setattr(_util, "crowded", lambda team: asked.append(team) or True)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        assert _util.pick_kernel(kernel, twin, 10 ** 9) == (twin, 1)
        assert _util.pick_kernel(kernel, twin, 10) == (twin, 1)
        assert len(asked) == (1 if numba.get_num_threads() > 1 else 0)    # small calls never ask
        assert not _util.parallel_pays(10 ** 9)
        # a forced variant is not second-guessed (the first run's compile split relies on it)
        _util.force_variant("parallel")
        assert _util.pick_kernel(kernel, twin, 10)[0] is kernel
    finally:
        _util.force_variant(None)
        numba.set_num_threads(before)


def _package_env(env: dict) -> dict:
    code = ("import os, approxdarts_np\nfrom approxdarts_np.kernels import _util\n"
            "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'), _util.SERIAL_BELOW)")
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True,
                         text=True, check=True)
    policy, spins, serial_below = out.stdout.split()
    return {"policy": policy, "spins": spins, "serial_below": int(serial_below)}


def test_idle_workers_spin_briefly_then_sleep_unless_the_environment_says_otherwise():
    import approxdarts_np
    assert _package_env({}) == {"policy": "passive", "spins": str(approxdarts_np.WAKE_SPINS),
                                "serial_below": 1 << 15}
    # the user's own choice wins; sleeping workers then take only the larger calls
    assert _package_env({"OMP_WAIT_POLICY": "passive"}) == {"policy": "passive", "spins": "None",
                                                            "serial_below": 1 << 17}
    assert _package_env({"GOMP_SPINCOUNT": "0"}) == {"policy": "passive", "spins": "0",
                                                     "serial_below": 1 << 17}
    assert _package_env({"OMP_WAIT_POLICY": "active"})["serial_below"] == 1 << 15


@pytest.mark.parametrize("env, spin", [({}, False), ({"GOMP_SPINCOUNT": "0"}, False),
                                       ({"GOMP_SPINCOUNT": "3000"}, True),
                                       ({"GOMP_SPINCOUNT": "INFINITE"}, True),
                                       ({"GOMP_SPINCOUNT": "lots"}, False),
                                       ({"OMP_WAIT_POLICY": "ACTIVE"}, True),
                                       ({"OMP_WAIT_POLICY": "active", "GOMP_SPINCOUNT": "0"}, False)])
def test_workers_spin_reads_the_openmp_variables(env, spin):
    assert _util.workers_spin(env) is spin


def test_the_variants_give_the_same_bits_whatever_the_crowding_decides(monkeypatch):
    """What makes the check safe: a parallel kernel and its serial twin agree bit for bit."""
    from approxdarts_np.kernels import conv, depthwise
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 8, 40, 40)).astype(np.float32)
    w = rng.standard_normal((8, 1, 3, 3)).astype(np.float32)
    wp = rng.standard_normal((16, 8, 1, 1)).astype(np.float32)
    outs = []
    for crowded in (False, True):
        monkeypatch.setattr(_util, "crowded", lambda team, c=crowded: c)
        outs.append((depthwise.depthwise_conv2d(x, w, 1, 1, 1), conv.conv2d(x, wp, 1, 0)))
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)
