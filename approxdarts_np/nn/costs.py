"""Recording which layers a forward pass runs, on what input shapes, to count their MACs."""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

# While a recording is active, convolutions and linear layers append (layer, input shape).
_RECORDING: contextvars.ContextVar[list | None] = contextvars.ContextVar("approxdarts_np_cost_recording",
                                                                         default=None)


def note_call(layer, x_shape) -> None:
    """Called by layers in forward: remember the call when a recording is active."""
    calls = _RECORDING.get()
    if calls is not None:
        calls.append((layer, tuple(x_shape)))


@contextlib.contextmanager
def recording_calls() -> Iterator[list]:
    """Collect ``(layer, input_shape)`` for every convolution and linear layer run inside the block."""
    calls: list = []
    token = _RECORDING.set(calls)
    try:
        yield calls
    finally:
        _RECORDING.reset(token)
