"""Element-wise passes of the autodiff ops on large float32 arrays, on all kernel threads.

NumPy runs an element-wise operation on one thread, and a DARTS mixed op adds up eight
candidate outputs: at the paper setting these passes are a sizeable part of a step. These
kernels do the same arithmetic on every Numba thread, each fused into one pass:

* :func:`scaled_add` - ``out = x * w`` or ``out += x * w`` (the weighted sum of a mixed op,
  one term per call, without NumPy's temporary for the product);
* :func:`scale_and_dot` - ``gx = g * w`` and ``sum(g * x)`` in one read of ``g`` and ``x``
  (the weighted sum's backward, one term per call);
* :func:`add_into` - ``out += g`` (gradient accumulation into an array the engine owns);
* :func:`relu_forward` - ``max(a, 0)`` and the bit mask of ``a > 0`` in one pass, and
  :func:`relu_backward` - ``g * mask`` read straight from the bits (NumPy needs three passes
  forward, ``maximum``, ``> 0`` and ``packbits``, and two back).

Results: every element is the same IEEE float32 operation NumPy does (product rounded, then
sum rounded: no fused multiply-add), so outputs are bit-identical to the NumPy expressions.
The dot product is summed in float64 over fixed blocks of ``_BLOCK`` elements (in vector lanes
within a block), the block sums added in a fixed order: it depends on the array size only,
never on the thread count. Arrays shorter
than :data:`PARALLEL_MIN` run on the calling thread (a thread team costs more than it saves).
"""
import numpy as np
from numba import njit, prange

from ._util import SERIAL_BELOW, parallel_pays

# Elements per work block: the split depends on the size only (deterministic sums).
_BLOCK = 1 << 14
# Fewer elements than this run on one thread: a parallel call has a fixed cost (the workers'
# wake-up, benchmarks/results/bench_search.json, breakdown), comparable to one thread's pass
# over this many elements; the same size as the other kernels'.
PARALLEL_MIN = SERIAL_BELOW


# The block functions loop over slices from index 0: with ``range(lo, hi)`` indices Numba keeps
# a negative-index check that stops LLVM from vectorising (then slower than NumPy's single
# thread).

@njit(cache=True)
def _scaled_add_block(out, x, w, lo, hi, assign):
    o = out[lo:hi]
    src = x[lo:hi]
    if assign:
        for i in range(o.shape[0]):
            o[i] = src[i] * w
    else:
        for i in range(o.shape[0]):
            o[i] += src[i] * w


@njit(cache=True, parallel=True)
def _scaled_add_parallel(out, x, w, assign):
    n = out.shape[0]
    for b in prange((n + _BLOCK - 1) // _BLOCK):
        _scaled_add_block(out, x, w, b * _BLOCK, min(n, (b + 1) * _BLOCK), assign)


@njit(cache=True, fastmath={"reassoc"})
def _scale_dot_block(g, x, w, gx, lo, hi):
    """gx = g * w on [lo, hi) and the float64 sum of g * x there (``reassoc`` lets the sum run
    in vector lanes: its order is fixed by the compiled loop, not by the thread count)."""
    gs = g[lo:hi]
    xs = x[lo:hi]
    out = gx[lo:hi]
    total = 0.0
    for i in range(gs.shape[0]):
        gi = gs[i]
        out[i] = gi * w
        total += np.float64(gi) * np.float64(xs[i])
    return total


@njit(cache=True, parallel=True)
def _scale_dot_parallel(g, x, w, gx, partial):
    n = g.shape[0]
    for b in prange(partial.shape[0]):
        partial[b] = _scale_dot_block(g, x, w, gx, b * _BLOCK, min(n, (b + 1) * _BLOCK))


@njit(cache=True)
def _scale_dot_serial(g, x, w, gx, partial):
    n = g.shape[0]
    for b in range(partial.shape[0]):
        partial[b] = _scale_dot_block(g, x, w, gx, b * _BLOCK, min(n, (b + 1) * _BLOCK))


@njit(cache=True)
def _add_block(out, g, lo, hi):
    o = out[lo:hi]
    src = g[lo:hi]
    for i in range(o.shape[0]):
        o[i] += src[i]


@njit(cache=True, parallel=True)
def _add_parallel(out, g):
    n = out.shape[0]
    for b in prange((n + _BLOCK - 1) // _BLOCK):
        _add_block(out, g, b * _BLOCK, min(n, (b + 1) * _BLOCK))


@njit(cache=True)
def _relu_block(a, out, bits, lo, hi):
    """out = max(a, 0) on [lo, hi) (NaN stays NaN, -0 becomes +0, as np.maximum) and bit j of
    word w of ``bits`` = a[64*w + j] > 0 for the words of [lo, hi); lo is a multiple of 64."""
    x = a[lo:hi]
    o = out[lo:hi]
    words = bits[lo // 64:(hi + 63) // 64]
    full = x.shape[0] // 64
    for w in range(full):
        acc = np.uint64(0)
        for j in range(64):
            v = x[w * 64 + j]
            pos = v > np.float32(0.0)
            o[w * 64 + j] = v if pos or v != v else np.float32(0.0)
            acc |= np.uint64(pos) << np.uint64(j)
        words[w] = acc
    if full * 64 < x.shape[0]:
        acc = np.uint64(0)
        for i in range(full * 64, x.shape[0]):
            v = x[i]
            pos = v > np.float32(0.0)
            o[i] = v if pos or v != v else np.float32(0.0)
            acc |= np.uint64(pos) << np.uint64(i - full * 64)
        words[full] = acc


@njit(cache=True)
def _relu_grad_block(g, bits, out, lo, hi):
    """out = g * (bit of g's element in ``bits``) on [lo, hi), a float32 product as NumPy's."""
    x = g[lo:hi]
    o = out[lo:hi]
    words = bits[lo // 64:(hi + 63) // 64]
    full = x.shape[0] // 64
    for w in range(full):
        word = words[w]
        for j in range(64):
            o[w * 64 + j] = x[w * 64 + j] * np.float32((word >> np.uint64(j)) & np.uint64(1))
    for i in range(full * 64, x.shape[0]):
        o[i] = x[i] * np.float32((words[full] >> np.uint64(i - full * 64)) & np.uint64(1))


@njit(cache=True, parallel=True)
def _relu_parallel(a, out, bits, backward):
    n = a.shape[0]
    for b in prange((n + _BLOCK - 1) // _BLOCK):
        if backward:
            _relu_grad_block(a, bits, out, b * _BLOCK, min(n, (b + 1) * _BLOCK))
        else:
            _relu_block(a, out, bits, b * _BLOCK, min(n, (b + 1) * _BLOCK))


@njit(cache=True)
def _relu_serial(a, out, bits, backward):
    n = a.shape[0]
    if backward:
        _relu_grad_block(a, bits, out, 0, n)
    else:
        _relu_block(a, out, bits, 0, n)


def _flat(a):
    """The flat view of a C-contiguous float32 array (no copy)."""
    return a.reshape(-1)


def scaled_add(out, x, w, assign):
    """``out[...] = x * w`` (``assign``) or ``out[...] += x * w``; out, x C-contiguous float32 of
    the same shape, w a float32 scalar. Returns ``out``."""
    w = np.float32(w)
    if not parallel_pays(out.size, PARALLEL_MIN):
        if assign:
            np.multiply(x, w, out=out)
        else:
            out += x * w
        return out
    _scaled_add_parallel(_flat(out), _flat(x), w, assign)
    return out


def scale_and_dot(g, x, w):
    """``(g * w, sum(g * x))``: float32 array and a float (summed in float64, fixed blocks).

    g and x C-contiguous float32 of the same shape, w a float32 scalar.
    """
    w = np.float32(w)
    gx = np.empty_like(g)
    partial = np.empty((g.size + _BLOCK - 1) // _BLOCK, np.float64)
    if not parallel_pays(g.size, PARALLEL_MIN):
        _scale_dot_serial(_flat(g), _flat(x), w, _flat(gx), partial)
    else:
        _scale_dot_parallel(_flat(g), _flat(x), w, _flat(gx), partial)
    return gx, float(partial.sum())


def add_into(out, g):
    """``out += g`` for C-contiguous float32 arrays of one shape; returns ``out``."""
    if not parallel_pays(out.size, PARALLEL_MIN):
        out += g
    else:
        _add_parallel(_flat(out), _flat(g))
    return out


def relu_forward(a):
    """``(max(a, 0), bits)`` for a C-contiguous float32 array: ``bits`` (uint64, one word per 64
    elements of the flat array) holds a > 0, element 64*w + j in bit j of word w."""
    out = np.empty_like(a)
    bits = np.empty((a.size + 63) // 64, np.uint64)
    kernel = _relu_parallel if parallel_pays(a.size, PARALLEL_MIN) else _relu_serial
    kernel(_flat(a), _flat(out), bits, False)
    return out, bits


def relu_backward(g, bits):
    """``g * mask`` (float32 products, as NumPy's) for the ``bits`` :func:`relu_forward` made
    from an array of g's size; g C-contiguous float32."""
    if bits.shape != ((g.size + 63) // 64,):
        raise ValueError(f"bits must hold {(g.size + 63) // 64} words for {g.size} elements, "
                         f"got {bits.shape}")
    out = np.empty_like(g)
    kernel = _relu_parallel if parallel_pays(g.size, PARALLEL_MIN) else _relu_serial
    kernel(_flat(g), _flat(out), bits, True)
    return out
