"""Small helpers shared by the kernel modules: argument normalisation and output sizes."""
import numbers


def as_pair(v, name):
    """Return ``v`` as a pair of Python ints ``(h, w)``; ``v`` is an int or a length-2 sequence.

    Raises ValueError naming ``name`` when ``v`` is neither (bools are rejected too).
    """
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        return int(v), int(v)
    try:
        items = tuple(v)
    except TypeError:
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}") from None
    if len(items) != 2 or not all(
        isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in items
    ):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return int(items[0]), int(items[1])


def conv_output_size(size, k, stride, padding, dilation):
    """Return the output length of a convolution along one axis (<= 0: the window never fits).

    ``size`` input length, ``k`` kernel length, symmetric zero ``padding`` on both ends.
    """
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1
