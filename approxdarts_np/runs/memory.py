"""A lower estimate of a run's peak memory, checked before anything large is allocated.

The activations saved for backward dominate: they grow with channels ×
batch × cells (resolution halves where channels double, so every cell holds
about the same amount). The coefficients are measured peaks of one forward
and backward pass (peak RSS minus the RSS before it, 2 threads) taken *low*
on purpose — search: 1.10–1.14 MB per channel·image·cell at C8/L5/B32,
C16/L5/B32 and C8/L8/B64; training with auxiliary head: 0.18–0.24 MB at
C8/L6/B32, C16/L6/B32 and C16/L12/B32 — so that a run is refused only when
it certainly cannot fit, never when it merely might not.
"""
from __future__ import annotations

import os

from approxdarts_np.errors import UserError

_SEARCH_BYTES_PER_CBL = 0.7e6
_TRAIN_BYTES_PER_CBL = 0.15e6
_BYTES_PER_PARAMETER = 12  # weight, gradient, momentum (float32)


def search_memory_bytes(config) -> float:
    params = 1000 * config.channels ** 2 * config.layers  # the supernet: about 1.0–1.2 k per C²·L
    return _SEARCH_BYTES_PER_CBL * config.channels * config.batch_size * config.layers + \
        _BYTES_PER_PARAMETER * params


def train_memory_bytes(config) -> float:
    params = 120 * config.channels ** 2 * config.layers  # DARTS_V2 at C36/L20: 3.35 M = 129 per C²·L
    return _TRAIN_BYTES_PER_CBL * config.channels * config.batch_size * config.layers + \
        _BYTES_PER_PARAMETER * params


def physical_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(needed: float, what: str) -> None:
    """UserError when a run needs more memory than the machine has (physical memory, not free memory)."""
    total = physical_memory_bytes()
    if total is not None and needed > total:
        raise UserError(f"this {what} needs at least about {needed / 2 ** 30:,.0f} GiB of memory and the machine "
                        f"has {total / 2 ** 30:,.0f} GiB; lower --channels, --batch-size or --layers")
