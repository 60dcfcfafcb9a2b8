"""Shared test settings: hypothesis profile and the PyTorch reference set-up."""
import os

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
