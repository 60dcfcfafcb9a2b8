"""Depthwise 2-D convolution (groups == channels): forward, input gradient and weight gradient.

Layout: x (N, C, H, W), w (C, 1, kh, kw), y (N, C, OH, OW), all float32 C-contiguous.
Padding is symmetric zero padding; stride, padding and dilation are an int or an (h, w) pair.
The convolution is a cross-correlation, as in torch.

How the kernels are laid out (the reason their inner loops vectorise):

* Work item = one channel and a group of ``stack`` images (more images for smaller planes, so
  8x8 planes still give long loops). The item's planes are copied into a zero-bordered scratch
  buffer, one plane after another. With stride 1 the planes share their zero borders (one
  plane's bottom/right padding is the next plane's top / the next row's left padding, see
  :func:`_layout`). With stride s each padded plane is split into s_h * s_w *phase planes*
  (phase (a, b) holds padded rows a, a+s_h, ... and columns b, b+s_w, ...).
* In that layout every tap (i, j) reads the buffer at one constant offset, so the outputs of
  all the item's planes, taken on a grid with the buffer's row stride, are one contiguous loop
  per group of taps (:func:`_gather_taps`, up to 9 taps per pass). Grid positions outside a
  plane's OH x OW outputs are computed and dropped when the planes are copied out.
* A group of m taps is one loop with the m source slices and weights set up before it, so the
  loop body is straight-line code that vectorises. The group functions for m = 9, 5, 3, 2, 1
  and the loop that picks them are written out from one template for the gather and one for
  the weight gradient's dot products (``_GATHER_TEMPLATE``, ``_DOT_TEMPLATE``) and compiled
  when the module is imported. ``benchmarks/bench_depthwise_taps.py`` times them against a
  plain loop over the taps and checks they compile to the instructions the hand-written
  functions they replaced compiled to.
* Input gradient, stride 1: the forward kernel run on the output gradient with the kernel
  flipped and padding d*(k-1) - p. Other strides: the same gather per phase plane of the padded
  input, over the taps that land in that phase, reading a zero-bordered copy of the output
  gradient.
* Weight gradient: per item and tap, one dot product of the output gradient on the grid (zero
  off the outputs) with the scratch buffer at the tap's offset (:func:`_dot_taps`), then the
  items' partial sums are added per channel over the image groups, in float64, in order.

Parallelism and determinism: ``prange`` over contiguous blocks of work items, items ordered
image group by image group and channel by channel within a group, so the memory is read in
order. Every output element is computed by exactly one thread, and how the work is cut into
items depends on the shapes only, never on the thread count: results are bit-reproducible and
the same for any number of threads. The forward and input-gradient sums are plain IEEE float32
in the tap order; the weight-gradient dot products use ``reassoc`` (see :func:`_dot_taps`).
"""
import numpy as np
from numba import njit, prange

from ._util import (block_bounds, check_float32_4d, check_shape4, conv_geometry, conv_output_hw,
                    pick_kernel, serial_twin, tap_offsets)
from .codes import check_code_args, codes_and_feature0, feature_plane, scale_row

# Target size, in float32 elements, of one work item's padded input: sets how many images of a
# channel share an item: 32x32 planes run best alone (stacking them was slower), 16x16 planes
# 3-4 to an item, 8x8 planes 6 or more.
_STACK_BUDGET = 1200
# A zero Numba types as int64, not as the literal 0: a helper called with a literal 0 at one
# site and an int64 at another is compiled twice (a first run's compile time).
_ZERO = np.int64(0)

__all__ = [
    "depthwise_conv2d",
    "depthwise_conv2d_codes",
    "depthwise_conv2d_grad_input",
    "depthwise_conv2d_grad_weight",
]

# ----------------------------------------------------------------------------- helpers (Numba)

# Tap groups (see the module docstring). The gather and the dot products below are templates:
# a line naming ``$i`` stands once per tap of a group (i = 0 .. m-1), ``$m`` is the group's
# tap count, ``$last`` = m - 1, ``$products`` is ``w0 * s0[q] + w1 * s1[q] + ...`` (summed left
# to right), and a line ``$groups NAME(ARGS)`` becomes the branches on ``left`` (taps left)
# that call NAME9(ARGS) for 9 or more, NAME5(ARGS) for 5 to 8, and so on (_GROUP_SIZES), each
# advancing t. Each template is written out and compiled by :func:`_define_tap_functions` when
# the module is imported.

_GROUP_SIZES = (9, 5, 3, 2, 1)

_GATHER_TEMPLATE = '''
@njit(cache=True)
def _gather_taps(out, o0, length, src, offs, ws, t0, t1, assign):
    """out[o0+q] (= if ``assign`` else +=) sum over taps t in [t0, t1) of ws[t] * src[offs[t]+q].

    For q < length. Taps are taken in groups of up to 9 (a 3x3 kernel in one pass over
    ``out``, 25 taps as 9 + 9 + 5 + 2) so each pass does several multiply-adds per element.
    A group's products are summed left to right and then added to the running value: the
    summation order is fixed by the tap order alone.
    """
    ov = out[o0:o0 + length]
    t = t0
    first = assign
    while t < t1:
        left = t1 - t
        $groups _taps(ov, src, offs, ws, t, first)
        first = False


@njit(cache=True)
def _taps$m(ov, src, offs, ws, t, first):
    """ov[q] (= if ``first`` else +=) taps t .. t+$last of :func:`_gather_taps`."""
    n = ov.shape[0]
    s$i = src[offs[t + $i]:offs[t + $i] + n]
    w$i = ws[t + $i]
    if first:
        for q in range(n):
            ov[q] = $products
    else:
        for q in range(n):
            ov[q] += $products
'''

_DOT_TEMPLATE = '''
@njit(cache=True)
def _dot_taps(g, src, offs, out_row):
    """out_row[t] = sum_q g[q] * src[offs[t]+q] in float32, for every tap t.

    Taps are taken in groups of up to 9 that share each load of ``g``. The group functions are
    compiled with ``reassoc``: it lets the compiler keep each sum as several partial sums in
    vector registers (a float reduction cannot vectorise otherwise). That order is fixed by
    the compiled code, not by the data or the threads, so results are reproducible.
    """
    n_taps = offs.shape[0]
    t = _ZERO
    while t < n_taps:
        left = n_taps - t
        $groups _dots(g, src, offs, t, out_row)


@njit(cache=True, fastmath={"reassoc"})
def _dots$m(g, src, offs, t, out_row):
    """out_row[t .. t+$last]: the dot products of :func:`_dot_taps` for $m taps."""
    n = g.shape[0]
    s$i = src[offs[t + $i]:offs[t + $i] + n]
    a$i = np.float32(0.0)
    for q in range(n):
        gq = g[q]
        a$i += gq * s$i[q]
    out_row[t + $i] = a$i
'''


def _tap_source(template):
    """The source ``template`` stands for: its driver (the part before the group function,
    which starts at its second ``@njit``), then the group function once per group size."""
    split = template.index("@njit", template.index("@njit") + 1)
    driver, group = template[:split], template[split:]
    lines = []
    for line in driver.splitlines():
        if "$groups " not in line:
            lines.append(line)
            continue
        indent, call = line.split("$groups ")
        name, args = call.split("(", 1)
        for k, m in enumerate(_GROUP_SIZES):
            test = "else:" if m == 1 else f"{'elif' if k else 'if'} left >= {m}:"
            lines += [indent + test, f"{indent}    {name}{m}({args}", f"{indent}    t += {m}"]
    for m in _GROUP_SIZES:
        products = " + ".join(f"w{i} * s{i}[q]" for i in range(m))
        lines.append("")
        for line in group.replace("$products", products).replace("$last", str(m - 1)).replace(
                "$m", str(m)).splitlines():
            lines += [line.replace("$i", str(i)) for i in range(m)] if "$i" in line else [line]
    return "\n".join(lines) + "\n"


def _define_tap_functions():
    """Compile the written-out templates into this module.

    The source is compiled under this file's name: Numba's disk cache needs the file a function
    comes from, stamps its entries with that file's time and size (so an edit of a template
    invalidates them) and keys them by the function's bytecode. Line numbers in tracebacks and
    Numba's messages from these functions count in the written-out source
    (``print(_tap_source(_GATHER_TEMPLATE))`` shows it), not in this file.
    """
    for template in (_GATHER_TEMPLATE, _DOT_TEMPLATE):
        exec(compile(_tap_source(template), __file__, "exec"), globals())


_define_tap_functions()


# Copies between the planes of one work item (images n0 .. n0+count-1 of channel ci of a 4-D
# array) and the stacked scratch layout: plane g at offset g*plane of every phase, each phase
# ``phase_stride`` long. Every stride case is its own small function that walks the whole
# stack, so its row loops vectorise on their own and no per-plane call overhead remains.

@njit(cache=True)
def _stack_rows(a, n0, count, ci, buf, base, wq, plane, to_buf):
    """Stride 1: buf[base + g*plane + r*wq + c] = a[n0+g, ci, r, c] (``to_buf``), or the reverse."""
    h, w = a.shape[2], a.shape[3]
    for g in range(count):
        img = a[n0 + g, ci]
        b0 = base + g * plane
        for r in range(h):
            row = img[r]
            seg = buf[b0 + r * wq:b0 + r * wq + w]
            if to_buf:
                for k in range(w):
                    seg[k] = row[k]
            else:
                for k in range(w):
                    row[k] = seg[k]


@njit(cache=True)
def _s2_row_bases(r, pad_h, pad_w, wq, phase_stride):
    """Offsets (within a plane) of row r's even and odd columns in the stride-(2, 2) layout."""
    rp = r + pad_h
    row_base = (rp % 2) * 2 * phase_stride + (rp // 2) * wq
    b_even = pad_w % 2  # phase column of column 0
    base_e = row_base + b_even * phase_stride + pad_w // 2
    base_o = row_base + (1 - b_even) * phase_stride + (pad_w + 1) // 2
    return base_e, base_o


@njit(cache=True)
def _stack_phases_s2(a, n0, count, ci, buf, pad_h, pad_w, wq, plane, phase_stride, to_buf):
    """Stride (2, 2): even and odd columns of a row split into their phases (or read back) in one
    loop."""
    h, w = a.shape[2], a.shape[3]
    n_pairs = w // 2
    for g in range(count):
        img = a[n0 + g, ci]
        for r in range(h):
            base_e, base_o = _s2_row_bases(r, pad_h, pad_w, wq, phase_stride)
            base_e += g * plane
            base_o += g * plane
            row = img[r]
            seg_e = buf[base_e:base_e + n_pairs]
            seg_o = buf[base_o:base_o + n_pairs]
            if to_buf:
                for k in range(n_pairs):
                    seg_e[k] = row[2 * k]
                    seg_o[k] = row[2 * k + 1]
                if w % 2 == 1:
                    buf[base_e + n_pairs] = row[w - 1]
            else:
                for k in range(n_pairs):
                    row[2 * k] = seg_e[k]
                    row[2 * k + 1] = seg_o[k]
                if w % 2 == 1:
                    row[w - 1] = buf[base_e + n_pairs]


@njit(cache=True)
def _stack_phases_generic(a, n0, count, ci, buf, pad_h, pad_w, s_h, s_w, wq, plane,
                          phase_stride, to_buf):
    """Any stride, both directions (``to_buf``: a -> buf, else buf -> a)."""
    h, w = a.shape[2], a.shape[3]
    for g in range(count):
        img = a[n0 + g, ci]
        for r in range(h):
            rp = r + pad_h
            row_base = g * plane + (rp % s_h) * s_w * phase_stride + (rp // s_h) * wq
            row = img[r]
            for b in range(s_w):
                c0 = (b - pad_w) % s_w  # first column that lands in phase column b
                if c0 >= w:
                    continue
                n_cols = (w - c0 + s_w - 1) // s_w
                base = row_base + b * phase_stride + (c0 + pad_w) // s_w
                seg = buf[base:base + n_cols]
                if to_buf:
                    for k in range(n_cols):
                        seg[k] = row[c0 + k * s_w]
                else:
                    for k in range(n_cols):
                        row[c0 + k * s_w] = seg[k]


@njit(cache=True)
def _stack_phases(a, n0, count, ci, buf, pad_h, pad_w, s_h, s_w, wq, plane, phase_stride, to_buf):
    """Write an item's planes into the phase layout of their zero-padded versions (``to_buf``), or
    read them back out of it.

    Padded pixel (r, c) of plane g lives in phase (r % s_h, c % s_w), at
    (r % s_h * s_w + c % s_w) * phase_stride + g*plane + (r // s_h)*wq + c // s_w. Only pixels
    are written: the borders keep the zeros the buffer was created with.
    """
    if s_h == 1 and s_w == 1:
        _stack_rows(a, n0, count, ci, buf, pad_h * wq + pad_w, wq, plane, to_buf)
    elif s_h == 2 and s_w == 2:
        _stack_phases_s2(a, n0, count, ci, buf, pad_h, pad_w, wq, plane, phase_stride, to_buf)
    else:
        _stack_phases_generic(a, n0, count, ci, buf, pad_h, pad_w, s_h, s_w, wq, plane,
                              phase_stride, to_buf)


@njit(cache=True)
def _layout(h, wd, out_h, out_w, s_h, s_w, p_h, p_w, shared):
    """Scratch geometry (hq, wq, lead): plane slot hq x wq per phase, ``lead`` zeros before slot 0.

    Phase layout (any stride): each plane is zero-padded on all sides, hq = ceil((h+2p_h)/s_h),
    wq = ceil((wd+2p_w)/s_w), lead = 0. Shared layout (stride 1 only, ``shared``): a plane's
    bottom and right padding double as the next plane's top and the next row's left padding,
    so the slot is only max(h+p_h, out_h) x max(wd+p_w, out_w), the pixels start at lead =
    p_h*wq + p_w, and a slot's padding rows/columns are the zeros after its pixels. The shared
    layout computes fewer discarded outputs (144 instead of 256 for an 8x8 plane, padding 4).
    """
    if shared:
        wq = max(wd + p_w, out_w)
        return max(h + p_h, out_h), wq, p_h * wq + p_w
    return (h + 2 * p_h + s_h - 1) // s_h, (wd + 2 * p_w + s_w - 1) // s_w, 0


# ----------------------------------------------------------------------------- kernels
#
# Work items are (channel, group of ``stack`` consecutive images). An item's planes share the
# channel's weights, so they are laid out one after another in the scratch buffers (plane g of
# a phase at g * hq*wq) and every tap is one loop over the whole stack: short planes (16x16,
# 8x8) still give long vectorised loops. Rows beyond a plane's output are computed and dropped.

@njit(cache=True, inline="always")
def _item_blocks(n_img, n_ch, stack, n_threads):
    """(work items, blocks): one item per (channel, group of ``stack`` images), at most one
    block of consecutive items per thread."""
    n_items = n_ch * ((n_img + stack - 1) // stack)
    return n_items, min(n_items, n_threads)


@njit(cache=True, inline="always")
def _item_images(item, n_ch, stack, n_img):
    """(channel, first image, image count) of work item ``item`` (items are group-major)."""
    n0 = (item // n_ch) * stack
    return item % n_ch, n0, min(stack, n_img - n0)


@njit(cache=True)
def _stack_geometry(h, wd, out_h, out_w, s_h, s_w, p_h, p_w, d_h, d_w, k_h, k_w, stack):
    """(wq, lead, plane, phase_stride, tap offsets) of a work item's stacked scratch buffer
    (:func:`_layout`, stride-1 planes sharing their borders), as the item kernels use it."""
    hq, wq, lead = _layout(h, wd, out_h, out_w, s_h, s_w, p_h, p_w, s_h == 1 and s_w == 1)
    plane = hq * wq
    phase_stride = stack * plane
    return wq, lead, plane, phase_stride, tap_offsets(k_h, k_w, s_h, s_w, d_h, d_w, wq,
                                                        phase_stride)


@njit(cache=True)
def _stack_buffers(in_size, out_size):
    """A block's scratch: the stacked input (its borders must be zero) and a stacked output."""
    return np.zeros(in_size, np.float32), np.zeros(out_size, np.float32)


@njit(cache=True, parallel=True)
def _depthwise_forward_kernel(x, w_taps, s_h, s_w, p_h, p_w, d_h, d_w, k_h, k_w, out_h, out_w,
                              stack, n_threads):
    n_img, n_ch, h, wd = x.shape
    n_taps = k_h * k_w
    wq, lead, plane, phase_stride, offs = _stack_geometry(h, wd, out_h, out_w, s_h, s_w, p_h, p_w,
                                                          d_h, d_w, k_h, k_w, stack)

    y = np.empty((n_img, n_ch, out_h, out_w), np.float32)
    n_items, n_blocks = _item_blocks(n_img, n_ch, stack, n_threads)
    for blk in prange(n_blocks):
        xbuf, acc = _stack_buffers(lead + s_h * s_w * phase_stride, phase_stride)
        for item in range(*block_bounds(blk, n_blocks, n_items)):
            ci, n0, count = _item_images(item, n_ch, stack, n_img)
            _stack_phases(x, n0, count, ci, xbuf, p_h, p_w, s_h, s_w, wq, plane,
                          phase_stride, True)
            length = (count - 1) * plane + (out_h - 1) * wq + out_w
            _gather_taps(acc, _ZERO, length, xbuf, offs, w_taps[ci], _ZERO, n_taps, True)
            _stack_rows(y, n0, count, ci, acc, _ZERO, wq, plane, False)
    return y


@njit(cache=True, parallel=True)
def _depthwise_codes_kernel(x, scale, inv, zero_point, table_t, affine, w_taps, cst, out_scale,
                            s_h, s_w, p_h, p_w, d_h, d_w, k_h, k_w, out_h, out_w, stack,
                            n_threads):
    """:func:`depthwise_conv2d_codes`: the forward kernel's items, each quantising its planes
    first (codes kept) and running the taps once per feature, then adding cst and scaling."""
    n_img, n_ch, h, wd = x.shape
    n_feat = table_t.shape[0]
    n_taps = k_h * k_w
    n_pix = h * wd
    wq, lead, plane, phase_stride, offs = _stack_geometry(h, wd, out_h, out_w, s_h, s_w, p_h, p_w,
                                                          d_h, d_w, k_h, k_w, stack)

    y = np.empty((n_img, n_ch, out_h, out_w), np.float32)
    codes = np.empty((n_img, n_ch, h, wd), np.uint8)
    x3 = x.reshape(n_img, n_ch, n_pix)
    c3 = codes.reshape(n_img, n_ch, n_pix)
    y3 = y.reshape(n_img, n_ch, out_h * out_w)
    n_items, n_blocks = _item_blocks(n_img, n_ch, stack, n_threads)
    for blk in prange(n_blocks):
        xbuf = np.zeros(lead + s_h * s_w * phase_stride, np.float32)
        acc = np.empty(phase_stride, np.float32)
        stage = np.empty((stack, 1, h, wd), np.float32)
        s3 = stage.reshape(stack, 1, n_pix)
        near = np.empty(n_pix, np.uint8)
        for item in range(*block_bounds(blk, n_blocks, n_items)):
            ci, n0, count = _item_images(item, n_ch, stack, n_img)
            for g in range(count):
                codes_and_feature0(x3[n0 + g, ci], scale, inv, zero_point, c3[n0 + g, ci],
                                   near, table_t, affine, s3[g, 0])
            length = (count - 1) * plane + (out_h - 1) * wq + out_w
            for j in range(n_feat):
                if j > 0:   # feature 0 came with the codes
                    for g in range(count):
                        feature_plane(c3[n0 + g, ci], table_t, affine, j, s3[g, 0])
                _stack_phases(stage, 0, count, 0, xbuf, p_h, p_w, s_h, s_w, wq, plane,
                              phase_stride, True)
                _gather_taps(acc, _ZERO, length, xbuf, offs, w_taps[ci * n_feat + j], _ZERO, n_taps,
                             j == 0)
            _stack_rows(y, n0, count, ci, acc, _ZERO, wq, plane, False)
            for g in range(count):
                scale_row(y3[n0 + g, ci], cst[ci], out_scale)
    return y, codes


@njit(cache=True, parallel=True)
def _depthwise_grad_input_kernel(gy, w_taps, h, wd, s_h, s_w, p_h, p_w, d_h, d_w, k_h, k_w,
                                 stack, n_threads):
    n_img, n_ch, out_h, out_w = gy.shape
    n_taps = k_h * k_w
    hq, wq, _ = _layout(h, wd, out_h, out_w, s_h, s_w, p_h, p_w, False)
    plane = hq * wq
    phase_stride = stack * plane
    n_phases = s_h * s_w

    # gx_phase[P] = sum over the phase's taps of w * gy_grid[P - ai*wq - bj]: a gather from the
    # output gradient laid out on the same grid (plane g at g*plane, rows out_h.. and columns
    # out_w.. zero) below ``margin`` zero rows, so every read index stays >= 0. Reads only go
    # up and left, so a plane never reads the planes after it.
    margin = (d_h * (k_h - 1)) // s_h + 1
    # Taps grouped by phase: ``order`` lists tap indices phase by phase, phase ph owning
    # slots first[ph]:first[ph+1].
    first = np.zeros(n_phases + 1, np.int64)
    for i in range(k_h):
        for j in range(k_w):
            first[((i * d_h) % s_h) * s_w + (j * d_w) % s_w + 1] += 1
    for ph in range(n_phases):
        first[ph + 1] += first[ph]
    fill = first[:n_phases].copy()
    order = np.empty(n_taps, np.int64)
    offs = np.empty(n_taps, np.int64)
    for i in range(k_h):
        for j in range(k_w):
            ph = ((i * d_h) % s_h) * s_w + (j * d_w) % s_w
            slot = fill[ph]
            fill[ph] += 1
            order[slot] = i * k_w + j
            offs[slot] = (margin - (i * d_h) // s_h) * wq - (j * d_w) // s_w

    gx = np.empty((n_img, n_ch, h, wd), np.float32)
    n_items, n_blocks = _item_blocks(n_img, n_ch, stack, n_threads)
    for blk in prange(n_blocks):
        gybuf = np.zeros(margin * wq + phase_stride, np.float32)
        gxbuf = np.zeros(n_phases * phase_stride, np.float32)  # phases without taps stay 0
        ws = np.empty(n_taps, np.float32)
        for item in range(*block_bounds(blk, n_blocks, n_items)):
            ci, n0, count = _item_images(item, n_ch, stack, n_img)
            for t in range(n_taps):
                ws[t] = w_taps[ci, order[t]]
            _stack_rows(gy, n0, count, ci, gybuf, margin * wq, wq, plane, True)
            for ph in range(n_phases):
                if first[ph + 1] > first[ph]:
                    _gather_taps(gxbuf, ph * phase_stride, count * plane, gybuf, offs, ws,
                                 first[ph], first[ph + 1], True)
            _stack_phases(gx, n0, count, ci, gxbuf, p_h, p_w, s_h, s_w, wq, plane,
                          phase_stride, False)
    return gx


@njit(cache=True, parallel=True)
def _depthwise_grad_weight_kernel(gy, x, s_h, s_w, p_h, p_w, d_h, d_w, k_h, k_w, stack,
                                  n_threads):
    n_img, n_ch, h, wd = x.shape
    out_h, out_w = gy.shape[2], gy.shape[3]
    n_taps = k_h * k_w
    wq, lead, plane, phase_stride, offs = _stack_geometry(h, wd, out_h, out_w, s_h, s_w, p_h, p_w,
                                                          d_h, d_w, k_h, k_w, stack)

    # Pass 1: per item and tap, one dot product over the item's stacked planes of the output
    # gradient (zero outside each plane's out_h x out_w corner) with the input at the tap.
    n_items, n_blocks = _item_blocks(n_img, n_ch, stack, n_threads)
    n_groups = (n_img + stack - 1) // stack
    partial = np.empty((n_ch, n_groups, n_taps), np.float32)
    for blk in prange(n_blocks):
        xbuf, gybuf = _stack_buffers(lead + s_h * s_w * phase_stride, phase_stride)
        for item in range(*block_bounds(blk, n_blocks, n_items)):
            ci, n0, count = _item_images(item, n_ch, stack, n_img)
            grp = item // n_ch
            _stack_phases(x, n0, count, ci, xbuf, p_h, p_w, s_h, s_w, wq, plane,
                          phase_stride, True)
            _stack_rows(gy, n0, count, ci, gybuf, _ZERO, wq, plane, True)
            length = (count - 1) * plane + (out_h - 1) * wq + out_w
            _dot_taps(gybuf[:length], xbuf, offs, partial[ci, grp])

    # Pass 2: per channel, the image groups added in order in float64.
    gw = np.empty((n_ch, n_taps), np.float32)
    for ci in prange(n_ch):
        for t in range(n_taps):
            total = 0.0
            for grp in range(n_groups):
                total += np.float64(partial[ci, grp, t])
            gw[ci, t] = np.float32(total)
    return gw


def _stack_size(n_img, h, wd, out_h, out_w, s_h, s_w, p_h, p_w, shared):
    """Images per work item: enough stacked planes for long loops, scratch kept near L1/L2.

    Depends on the shapes only (never on the thread count), so results do not either.
    """
    hq, wq, _ = _layout(h, wd, out_h, out_w, s_h, s_w, p_h, p_w, shared)
    return max(1, min(n_img, _STACK_BUDGET // (s_h * s_w * hq * wq)))


# Serial twins of the parallel kernels, for calls too small to wake the thread team
# (kernels._util.SERIAL_BELOW).
_depthwise_forward_kernel_serial = serial_twin(_depthwise_forward_kernel)
_depthwise_codes_kernel_serial = serial_twin(_depthwise_codes_kernel)
_depthwise_grad_input_kernel_serial = serial_twin(_depthwise_grad_input_kernel)
_depthwise_grad_weight_kernel_serial = serial_twin(_depthwise_grad_weight_kernel)


# ----------------------------------------------------------------------------- public API


def _check_weight_shape(w_shape, n_ch, name):
    c_w, one, k_h, k_w = w_shape
    if one != 1 or c_w != n_ch or k_h < 1 or k_w < 1:
        raise ValueError(
            f"{name} must be (C, 1, kh, kw) with C={n_ch} and kh, kw >= 1, got {tuple(w_shape)}")
    return k_h, k_w


def depthwise_conv2d(x, w, stride=1, padding=0, dilation=1):
    """Return the depthwise convolution y (N, C, OH, OW) of x (N, C, H, W) with w (C, 1, kh, kw).

    y[n, c, oh, ow] = sum_{i, j} w[c, 0, i, j] * xpad[n, c, oh*s_h + i*d_h, ow*s_w + j*d_w],
    xpad being x zero-padded by ``padding`` on each side (cross-correlation, as torch).
    """
    geom = conv_geometry(stride, padding, dilation)
    x = check_float32_4d(x, "x")
    w = check_float32_4d(w, "w")
    n_img, n_ch, h, wd = x.shape
    k_h, k_w = _check_weight_shape(w.shape, n_ch, "w")
    out_h, out_w = conv_output_hw(h, wd, k_h, k_w, geom)
    s_h, s_w, p_h, p_w, d_h, d_w = geom
    stack = _stack_size(n_img, h, wd, out_h, out_w, s_h, s_w, p_h, p_w, s_h == 1 and s_w == 1)
    kernel, n_threads = pick_kernel(_depthwise_forward_kernel, _depthwise_forward_kernel_serial,
                                    max(x.size, n_img * n_ch * out_h * out_w))
    return kernel(x, w.reshape(n_ch, k_h * k_w), s_h, s_w, p_h, p_w, d_h, d_w, k_h, k_w, out_h,
                  out_w, stack, n_threads)


def _check_gy(gy, expected, given):
    if gy.shape != expected:
        raise ValueError(f"gy must have shape {expected} for {given}, got {gy.shape}")


def depthwise_conv2d_grad_input(gy, w, input_shape, stride=1, padding=0, dilation=1):
    """Return dL/dx (``input_shape``) of :func:`depthwise_conv2d` given dL/dy ``gy`` and w."""
    geom = conv_geometry(stride, padding, dilation)
    gy = check_float32_4d(gy, "gy")
    w = check_float32_4d(w, "w")
    n_img, n_ch, h, wd = check_shape4(input_shape, "input_shape", minimum=0)
    k_h, k_w = _check_weight_shape(w.shape, n_ch, "w")
    out_h, out_w = conv_output_hw(h, wd, k_h, k_w, geom)
    _check_gy(gy, (n_img, n_ch, out_h, out_w), f"input_shape {(n_img, n_ch, h, wd)}")
    s_h, s_w, p_h, p_w, d_h, d_w = geom
    w_taps = w.reshape(n_ch, k_h * k_w)
    # With stride 1 the input gradient is the forward convolution of gy, zero-padded by the
    # kernel's reach minus the padding, with the kernel flipped (when that padding is >= 0).
    e_h = d_h * (k_h - 1) - p_h
    e_w = d_w * (k_w - 1) - p_w
    if s_h == 1 and s_w == 1 and e_h >= 0 and e_w >= 0:
        stack = _stack_size(n_img, out_h, out_w, h, wd, 1, 1, e_h, e_w, True)
        kernel, n_threads = pick_kernel(_depthwise_forward_kernel,
                                        _depthwise_forward_kernel_serial,
                                        max(gy.size, n_img * n_ch * h * wd))
        return kernel(gy, np.ascontiguousarray(w_taps[:, ::-1]), 1, 1, e_h, e_w, d_h, d_w, k_h,
                      k_w, h, wd, stack, n_threads)
    stack = _stack_size(n_img, h, wd, out_h, out_w, s_h, s_w, p_h, p_w, False)
    kernel, n_threads = pick_kernel(_depthwise_grad_input_kernel,
                                    _depthwise_grad_input_kernel_serial,
                                    max(gy.size, n_img * n_ch * h * wd))
    return kernel(gy, w_taps, h, wd, s_h, s_w, p_h, p_w, d_h, d_w, k_h, k_w, stack, n_threads)


def depthwise_conv2d_grad_weight(gy, x, weight_shape, stride=1, padding=0, dilation=1):
    """Return dL/dw (``weight_shape`` = (C, 1, kh, kw)) of :func:`depthwise_conv2d` given gy and x.

    Per plane the positions are summed in float32 vector lanes (fixed order), then the planes
    are added over images in order in float64: the result does not depend on thread count.
    """
    geom = conv_geometry(stride, padding, dilation)
    gy = check_float32_4d(gy, "gy")
    x = check_float32_4d(x, "x")
    n_img, n_ch, h, wd = x.shape
    k_h, k_w = _check_weight_shape(check_shape4(weight_shape, "weight_shape", minimum=0), n_ch,
                                   "weight_shape")
    out_h, out_w = conv_output_hw(h, wd, k_h, k_w, geom)
    _check_gy(gy, (n_img, n_ch, out_h, out_w), f"x of shape {x.shape}")
    s_h, s_w, p_h, p_w, d_h, d_w = geom
    stack = _stack_size(n_img, h, wd, out_h, out_w, s_h, s_w, p_h, p_w, s_h == 1 and s_w == 1)
    kernel, n_threads = pick_kernel(_depthwise_grad_weight_kernel,
                                    _depthwise_grad_weight_kernel_serial, max(gy.size, x.size))
    gw = kernel(gy, x, s_h, s_w, p_h, p_w, d_h, d_w, k_h, k_w, stack, n_threads)
    return gw.reshape(n_ch, 1, k_h, k_w)


def depthwise_conv2d_codes(x, scale, zero_point, table_t, w_feats, cst, out_scale, stride=1,
                           padding=0, dilation=1, affine=None):
    """The quantised depthwise convolution in one pass: returns ``(y, codes)``.

    ``codes`` (uint8, x's shape) are x's 8-bit codes with ``scale`` and ``zero_point``
    (:mod:`approxdarts_np.kernels.codes`: exactly the quantisation pass's codes);
    ``table_t`` (J, 256) float32 maps a code to its J integer features (``affine``: its
    :func:`~approxdarts_np.kernels.codes.affine_offset`, computed when None); ``w_feats``
    (C*J, 1, kh, kw) float32 holds the weights' features (row c*J + j: feature j of channel
    c); ``cst`` (C,) integers. y[n, c] = float32((cst[c] + sum_j depthwise(F_j[codes[n, c]],
    w_feats[c*J + j])) * out_scale), the product taken in float64 -- what quantising, running
    :func:`depthwise_conv2d` on the features and ``feature_sum`` give, without their passes
    over memory. The float32 sums are exact only while they stay below 2**24: the caller
    checks that bound (``features_fit_float32``). x must be finite float32 (its range gave the
    scale); ValueError for a scale without a normal float32 inverse or bad shapes.
    """
    geom = conv_geometry(stride, padding, dilation)
    x = check_float32_4d(x, "x")
    w_feats = check_float32_4d(w_feats, "w_feats")
    inv, zero_point, table_t, affine = check_code_args(scale, zero_point, table_t, affine)
    n_img, n_ch, h, wd = x.shape
    n_feat = table_t.shape[0]
    k_h, k_w = _check_weight_shape((w_feats.shape[0] // n_feat,) + w_feats.shape[1:], n_ch,
                                   "w_feats / J")
    if w_feats.shape[0] != n_ch * n_feat:
        raise ValueError(f"w_feats must have C*J = {n_ch * n_feat} rows, got {w_feats.shape[0]}")
    cst = np.ascontiguousarray(cst, dtype=np.int64)
    if cst.shape != (n_ch,):
        raise ValueError(f"cst must have shape ({n_ch},), got {cst.shape}")
    conv_output_hw(h, wd, k_h, k_w, geom)
    return depthwise_codes_unchecked(x, scale, inv, zero_point, table_t, affine, w_feats, cst,
                                     out_scale, geom)


def depthwise_codes_unchecked(x, scale, inv, zero_point, table_t, affine, w_feats, cst,
                              out_scale, geom):
    """:func:`depthwise_conv2d_codes` for arguments already checked (the quantised convolution's
    hot path): ``inv`` = float32(1/scale), ``affine`` known, ``geom`` the 6-tuple of
    ``conv_geometry``, arrays C-contiguous with the shapes and dtypes it requires."""
    n_img, n_ch, h, wd = x.shape
    n_feat = table_t.shape[0]
    k_h, k_w = w_feats.shape[2], w_feats.shape[3]
    out_h, out_w = conv_output_hw(h, wd, k_h, k_w, geom)
    s_h, s_w, p_h, p_w, d_h, d_w = geom
    stack = _stack_size(n_img, h, wd, out_h, out_w, s_h, s_w, p_h, p_w, s_h == 1 and s_w == 1)
    kernel, n_threads = pick_kernel(_depthwise_codes_kernel, _depthwise_codes_kernel_serial,
                                    max(x.size, n_img * n_ch * out_h * out_w) * n_feat)
    return kernel(x, float(scale), inv, zero_point, table_t, affine,
                  w_feats.reshape(n_ch * n_feat, -1), cst, float(out_scale), s_h, s_w, p_h, p_w,
                  d_h, d_w, k_h, k_w, out_h, out_w, stack, n_threads)
