"""Small helpers shared by the kernel modules: argument validation, output sizes, work blocks.

The ``@njit`` helpers at the end are compiled into the kernels that call them. Numba's
on-disk cache (``cache=True``) only notices changes to a kernel's own file: after editing one
of them, delete the ``__pycache__`` folders of the kernel modules.
"""
import numbers
import operator
import os
import types

import numpy as np
from numba import get_num_threads, njit

from .codes import codes_plane
from .crowding import crowded


def as_pair(v, name):
    """Return ``v`` as a pair of Python ints ``(h, w)``; ``v`` is an int or a length-2 sequence.

    Raises ValueError naming ``name`` when ``v`` is neither (bools are rejected too).
    """
    # the common cases first: every kernel call parses its geometry (thousands per step)
    if type(v) is int:
        return v, v
    if type(v) is tuple and len(v) == 2 and type(v[0]) is int and type(v[1]) is int:
        return v
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


def pair_at_least(v, name, low):
    """:func:`as_pair`, and ValueError naming ``name`` unless both values are at least ``low``."""
    a, b = as_pair(v, name)
    if a < low or b < low:
        raise ValueError(f"{name} must be >= {low}, got {(a, b)}")
    return a, b


def conv_geometry(stride, padding, dilation):
    """``(s_h, s_w, p_h, p_w, d_h, d_w)`` from int-or-pair arguments; ValueError when out of range."""
    return (*pair_at_least(stride, "stride", 1), *pair_at_least(padding, "padding", 0),
            *pair_at_least(dilation, "dilation", 1))


def check_float32_4d(a, name):
    """``a`` as a C-contiguous float32 4-D array; ValueError naming ``name`` otherwise."""
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype != np.float32:
        raise ValueError(f"{name} must be float32, got {a.dtype}")
    if a.ndim != 4:
        raise ValueError(f"{name} must be 4-D, got shape {a.shape}")
    return np.ascontiguousarray(a)


def check_shape4(shape, name, minimum=1):
    """``shape`` as a tuple of 4 ints each >= ``minimum``; ValueError naming ``name`` otherwise."""
    try:
        dims = tuple(int(d) for d in shape)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of 4 ints, got {shape!r}") from None
    if len(dims) != 4 or any(d < minimum for d in dims):
        what = "positive" if minimum == 1 else f">= {minimum}"
        raise ValueError(f"{name} must be 4 ints {what}, got {shape!r}")
    return dims


def conv_output_hw(h, wd, k_h, k_w, geom):
    """Output height and width for ``geom`` from :func:`conv_geometry`; ValueError when empty."""
    s_h, s_w, p_h, p_w, d_h, d_w = geom
    out_h = conv_output_size(h, k_h, s_h, p_h, d_h)
    out_w = conv_output_size(wd, k_w, s_w, p_w, d_w)
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"empty output: input {h}x{wd}, kernel {k_h}x{k_w}, stride {(s_h, s_w)}, "
            f"padding {(p_h, p_w)}, dilation {(d_h, d_w)} give {out_h}x{out_w}")
    return out_h, out_w


def check_codes(a, name, ndim=4):
    """``a`` as a C-contiguous uint8 array of ``ndim`` dimensions; ValueError naming ``name``."""
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 codes, got {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    return np.ascontiguousarray(a)


def check_code_value(z, name):
    """``z`` as a Python int in 0..255 (an integer code, e.g. a zero point); ValueError otherwise.

    Python and NumPy integers and 0-d integer arrays pass; bools and floats do not.
    """
    try:
        value = operator.index(z)
    except TypeError:
        value = None
    if value is None or isinstance(z, (bool, np.bool_)):
        raise ValueError(f"{name} must be an integer code, got {z!r}")
    if not 0 <= value <= 255:
        raise ValueError(f"{name} must be in 0..255, got {value}")
    return value


# ----------------------------------------------------------------------------- serial twins

def workers_spin(env=os.environ) -> bool:
    """Whether idle OpenMP workers spin before they sleep (``GOMP_SPINCOUNT`` above 0, as the
    package sets it unless told otherwise, or ``OMP_WAIT_POLICY=active``), so that a parallel
    call finds them awake."""
    spins = env.get("GOMP_SPINCOUNT", "").strip().lower()
    if spins:
        return spins.startswith("inf") or (spins.isdigit() and int(spins) > 0)
    return env.get("OMP_WAIT_POLICY", "").strip().lower() == "active"


# Calls over fewer elements than this run a kernel's serial twin on the calling thread. A parallel
# call has a fixed cost, the workers' wake-up and the wait for the slowest of them
# (bench_search.py's breakdown measures it), and a small step makes thousands of calls; below
# this size the work a second thread would take is worth less than that. Workers that are still
# spinning take a call in about a microsecond, sleeping ones in tens.
SERIAL_BELOW = 1 << 15 if workers_spin() else 1 << 17


def serial_twin(kernel):
    """``kernel`` (a ``parallel=True`` Numba function) compiled without ``parallel``.

    ``prange`` then runs as ``range``. The twin is a copy of the Python function under its own
    name, so the two never share an entry of Numba's on-disk cache (the cache key does not
    include the ``parallel`` flag).
    """
    f = kernel.py_func
    name = f.__name__ + "_serial"
    # its own code object name too, so that profiles tell the two apart
    code = f.__code__.replace(co_name=name, co_qualname=f.__code__.co_qualname + "_serial")
    twin = types.FunctionType(code, f.__globals__, name, f.__defaults__, f.__closure__)
    twin.__qualname__ = f.__qualname__ + "_serial"
    twin.__module__ = f.__module__
    twin.__doc__ = f"Serial twin of {f.__name__}."
    options = {k: v for k, v in kernel.targetoptions.items() if k not in ("parallel", "nopython")}
    # ``cache`` is not a target option: without it the twin was compiled again in every process
    return njit(cache=kernel._cache.__class__.__name__ != "NullCache", **options)(twin)


# The kernel variant every size-based choice takes while it is set: "serial" or "parallel";
# None chooses by size. A first run on a machine compiles the serial variants in one process and
# the parallel ones in another (approxdarts_np.runs.first_run), and a one-thread run needs the
# serial ones only.
_FORCED: list = [None]


def force_variant(variant):
    """Make every size-based kernel choice take ``variant`` ("serial", "parallel" or None: by size)
    until the next call; returns the variant that was forced before."""
    if variant not in (None, "serial", "parallel"):
        raise ValueError(f"variant must be None, 'serial' or 'parallel', got {variant!r}")
    before, _FORCED[0] = _FORCED[0], variant
    return before


def parallel_team(size, threshold=None):
    """The threads a call over ``size`` elements runs on in a kernel's parallel variant, or 0
    when it takes the serial twin: parallel at ``threshold`` elements or more (None:
    :data:`SERIAL_BELOW`) with a team of two or more threads that other processes leave the
    cores to (:func:`approxdarts_np.kernels.crowding.crowded`), unless :func:`force_variant`
    decided. The results are the same bits either way (every kernel splits its work by the
    thread count it is given only)."""
    forced = _FORCED[0]
    if forced is not None:
        return get_num_threads() if forced == "parallel" else 0
    if size < (SERIAL_BELOW if threshold is None else threshold):
        return 0
    team = get_num_threads()
    return team if team > 1 and not crowded(team) else 0


def parallel_pays(size, threshold=None):
    """Whether a call over ``size`` elements takes a kernel's parallel variant
    (:func:`parallel_team`)."""
    return parallel_team(size, threshold) > 0


def pick_kernel(kernel, twin, size):
    """``(kernel or its serial twin, thread count)`` for a call over ``size`` elements
    (:func:`parallel_team`)."""
    team = parallel_team(size)
    return (kernel, team) if team else (twin, 1)


# ----------------------------------------------------------------------------- Numba helpers

# Stand-ins for "no float input" of the kernels that can quantise as they read (they then read
# codes that are already there).
NO_INPUT = np.zeros((0, 0, 0, 0), np.float32)
NO_INPUT_3D = np.zeros((0, 0, 0), np.float32)
# Codes per table pass the depthwise and column kernels aim for (images are grouped to reach
# it): fewer, longer passes over the same per-tap tables. And the fixed cost of a depthwise
# plane (border copy, output rows) in element-equivalents of SERIAL_BELOW, a rough rate that
# only decides whether the thread team is woken, never the result.
GROUP_CODES = 1024
PLANE_ELEMENTS = 64


def image_group(n_img, codes):
    """Images per job for planes of ``codes`` codes each: enough for about GROUP_CODES codes
    per pass, at least 1, at most ``n_img``."""
    return max(1, min(n_img, GROUP_CODES // max(codes, 1)))


def depthwise_group(x_shape, geom):
    """:func:`image_group` for a depthwise kernel's jobs: x (N, C, H, W) split into the phase
    planes of ``geom`` = (s_h, s_w, p_h, p_w, d_h, d_w) (bordered, as :func:`split_plane`)."""
    n_img, _, h, wd = x_shape
    s_h, s_w, p_h, p_w = geom[:4]
    return image_group(n_img, -(-(h + 2 * p_h) // s_h) * -(-(wd + 2 * p_w) // s_w))


@njit(cache=True)
def block_bounds(block, n_blocks, n_items):
    """[lo, hi) of the ``block``-th of ``n_blocks`` near-equal contiguous ranges of items."""
    return block * n_items // n_blocks, (block + 1) * n_items // n_blocks


@njit(cache=True)
def tap_offsets(k_h, k_w, s_h, s_w, d_h, d_w, wq, phase_stride):
    """Offset of tap (i, j) in a buffer of s_h*s_w phase planes, ``phase_stride`` apart, rows of
    ``wq``: its phase's start plus (i*d_h//s_h, j*d_w//s_w). Tap (i, j) of output (oh, ow)
    reads bordered row oh*s_h + i*d_h and column ow*s_w + j*d_w, which sits in phase
    ((i*d_h) % s_h, (j*d_w) % s_w) at (oh + i*d_h//s_h, ow + j*d_w//s_w)."""
    offs = np.empty(k_h * k_w, np.int64)
    for i in range(k_h):
        for j in range(k_w):
            phase = ((i * d_h) % s_h) * s_w + (j * d_w) % s_w
            offs[i * k_w + j] = (phase * phase_stride
                                 + ((i * d_h) // s_h) * wq + (j * d_w) // s_w)
    return offs


@njit(cache=True)
def split_plane(src, buf, p_h, p_w, s_h, s_w, plane, wq, row0):
    """Write plane src (H, W) into its phase planes (``plane`` codes each, rows of wq) at the
    border offsets (p_h, p_w), from phase row ``row0`` on.

    Bordered row r goes to row row0 + r // s_h of the phase planes (r % s_h, *), bordered
    column c to column c // s_w of phase plane (*, c % s_w): one contiguous run per row and
    column phase.
    """
    h, wd = src.shape
    if s_w == 1:
        for r in range(h):
            pr = r + p_h
            base = unsigned((pr % s_h) * plane + (row0 + pr // s_h) * wq + p_w)
            row = src[r]
            dst = buf[base:base + unsigned(wd)]
            for c in range(wd):
                dst[unsigned(c)] = row[unsigned(c)]
        return
    for r in range(h):
        pr = r + p_h
        row_base = (pr % s_h) * s_w * plane + (row0 + pr // s_h) * wq
        row = src[r]
        for pw in range(s_w):
            c0 = (pw - p_w) % s_w           # first source column of this column phase
            if c0 >= wd:
                continue
            n_c = (wd - c0 + s_w - 1) // s_w
            base = unsigned(row_base + pw * plane + (c0 + p_w) // s_w)
            dst = buf[base:base + unsigned(n_c)]
            for m in range(n_c):
                dst[unsigned(m)] = row[unsigned(c0 + m * s_w)]


@njit(cache=True, inline="always")
def channel_job(job, n_groups, group, n_img):
    """``(channel, first image, end image)`` of job ``job`` of a depthwise kernel whose jobs are
    (channel, group of ``group`` images), channel-major, ``n_groups`` groups per channel."""
    n0 = (job % n_groups) * group
    return job // n_groups, n0, min(n_img, n0 + group)


@njit(cache=True)
def load_planes(qx, x, x_scale, x_inv, zx, near, buf, ci, n0, n1, p_h, p_w, s_h, s_w, plane, wq,
                hq):
    """Channel ci of images n0..n1-1 into the phase planes of ``buf`` (:func:`split_plane`,
    image n from phase row (n - n0)*hq on). With ``x`` (float32, qx's shape; empty otherwise)
    each plane is quantised first, into ``qx`` (scale ``x_scale``, float32 inverse ``x_inv``,
    zero point ``zx``; ``near`` a uint8 scratch of a plane's size)."""
    h, wd = qx.shape[2], qx.shape[3]
    for ni in range(n0, n1):
        if x.size:
            codes_plane(x[ni, ci].reshape(h * wd), x_scale, x_inv, zx, qx[ni, ci].reshape(h * wd),
                        near)
        split_plane(qx[ni, ci], buf, p_h, p_w, s_h, s_w, plane, wq, (ni - n0) * hq)


@njit(cache=True)
def store_planes(acc, k, scale, out, ci, n0, n1, hq, wq):
    """out[n, ci, oh, ow] = (acc[((n - n0)*hq + oh)*wq + ow] + k) * scale for the images
    n0..n1-1 (the product in float64, stored in out's dtype): the outputs of a pass over
    stacked phase planes, the columns past out_w and the rows between images dropped."""
    out_h, out_w = out.shape[2], out.shape[3]
    for ni in range(n0, n1):
        for oh in range(out_h):
            dst = out[ni, ci, oh]
            q0 = ((ni - n0) * hq + oh) * wq
            row = acc[unsigned(q0):unsigned(q0 + out_w)]
            for ow in range(out_w):
                dst[unsigned(ow)] = np.float64(row[unsigned(ow)] + k) * scale


@njit(cache=True, inline="always")
def unsigned(i):
    """Cast a (known non-negative) index to unsigned.

    Numba wraps negative signed indices around, a check that keeps LLVM from vectorising
    copy and row loops; unsigned indices skip it.
    """
    return np.uint64(i)
