"""Shared test settings: hypothesis profile and the PyTorch reference set-up."""
import os

import pytest
from hypothesis import HealthCheck, settings

# Numba compiles on first call; a per-example deadline would measure the compiler.
settings.register_profile(
    "default",
    deadline=None,
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "25")),
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", deadline=None, max_examples=300,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def uncrowded(monkeypatch):
    """Size alone decides between a kernel's variants: the check for other processes on the
    cores (kernels/crowding.py) answers "not crowded", whatever else the machine runs."""
    from approxdarts_np.kernels import _util
    monkeypatch.setattr(_util, "crowded", lambda team: False)


@pytest.fixture
def thread_team():
    """Every size-based kernel choice takes the parallel variant (the thread team) for the test."""
    from approxdarts_np.kernels import _util
    before = _util.force_variant("parallel")
    yield
    _util.force_variant(before)
