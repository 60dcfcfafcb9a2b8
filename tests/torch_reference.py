"""A PyTorch re-implementation of the networks, run on the weights of our own modules.

The reference walks our module tree only to read weights and layer settings;
every computation (convolutions, BN, pools, MixedOp's weighted sum, cell wiring,
FactorizedReduce, drop-path) is written here again in torch, following the
DARTS definitions, so that the two implementations share no arithmetic.

Layers set to 8-bit arithmetic (``layer.arithmetic``) run here on de-quantised operands,
quantised by this module's own code (docs/design.md §2): with an exact table as torch's float conv of
the de-quantised tensors, with any other table as :class:`TableConv`, whose forward is a plain
NumPy gather ``M[q_x, q_w]`` and whose backward is the straight-through estimator (torch's conv
gradients at the de-quantised tensors).
"""
from __future__ import annotations

import collections
import contextlib

import numpy as np
import torch
import torch.nn.functional as TF

from approxdarts_np import nn
from approxdarts_np.nas import model_eval as me
from approxdarts_np.nas import model_search as ms
from approxdarts_np.nas import operations as ops


class TorchMirror:
    """torch leaf tensors for every Parameter of ``model``, and a forward that uses them."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.leaf = {id(p): torch.tensor(p.data.copy(), requires_grad=True) for p in model.parameters()}
        self.macs: list[tuple[str, int]] = []  # (kind, MACs) of every conv/linear call, in order
        self.quantised_calls: list = []  # layers run in 8 bit, in call order
        # Optional: the codes our layers quantised to, per weight, in call order (see
        # recording_codes); used instead of the mirror's own when they agree up to rare ties.
        self.codes: dict | None = None
        self.code_flips = 0  # operand codes that differed by one (a float-rounding tie)
        self.drop_masks = None  # iterator of (N,1,1,1) keep masks for drop-path, when training with it
        # Running statistics are updated on copies, to compare with ours afterwards.
        self.buffers = {id(m): (torch.tensor(m._buffers["running_mean"].copy()),
                                torch.tensor(m._buffers["running_var"].copy()))
                        for m in model.modules() if isinstance(m, nn.BatchNorm2d)}

    def p(self, param) -> torch.Tensor:
        return self.leaf[id(param)]

    def grad(self, param) -> np.ndarray:
        g = self.leaf[id(param)].grad
        return np.zeros_like(param.data) if g is None else g.numpy()

    # ------------------------------------------------------------ dispatch
    def run(self, m, x, *extra):
        if isinstance(m, me.NetworkCIFAR):
            return self.network_cifar(m, x)
        if isinstance(m, me.EvalCell):
            return self.eval_cell(m, x, *extra)
        if isinstance(m, me.AuxiliaryHead):
            return self.run(m.classifier, self.run(m.features, x).flatten(1))
        if isinstance(m, ms.Network):
            return self.network(m, x)
        if isinstance(m, ms.SearchCell):
            return self.search_cell(m, x, *extra)
        if isinstance(m, ms.MixedOp):
            return self.mixed_op(m, x, *extra)
        if isinstance(m, nn.Sequential):
            for layer in m.layers:
                x = self.run(layer, x)
            return x
        if isinstance(m, (ops.ReLUConvBN, ops.DilConv)):
            return self.run(m.op, x)
        if isinstance(m, ops.SepConv):
            return self.run(m.second, self.run(m.first, x))
        if isinstance(m, ops.FactorizedReduce):
            x = torch.relu(x)
            a = self.conv(m.conv_1, x)
            b = self.conv(m.conv_2, x[:, :, 1:, 1:])
            return self.batch_norm(m.bn, torch.cat([a, b], dim=1))
        if isinstance(m, ops.Zero):
            return x[:, :, ::m.stride, ::m.stride] * 0.0
        if isinstance(m, nn.ReLU):
            return torch.relu(x)
        if isinstance(m, nn.Identity):
            return x
        if isinstance(m, (nn.Conv2d, nn.DepthwiseConv2d)):
            return self.conv(m, x)
        if isinstance(m, nn.BatchNorm2d):
            return self.batch_norm(m, x)
        if isinstance(m, nn.MaxPool2d):
            return TF.max_pool2d(x, m.kernel_size, m.stride, m.padding)
        if isinstance(m, nn.AvgPool2d):
            return TF.avg_pool2d(x, m.kernel_size, m.stride, m.padding, count_include_pad=m.count_include_pad)
        if isinstance(m, nn.GlobalAvgPool2d):
            return x.mean(dim=(2, 3))
        if isinstance(m, nn.Linear):
            self.macs.append(("linear", x.shape[0] * m.weight.shape[0] * m.weight.shape[1]))
            y = x @ self.p(m.weight).T
            return y + self.p(m.bias) if m.bias is not None else y
        raise TypeError(f"no torch mirror for {type(m).__name__}")

    def conv(self, m, x):
        groups = m.weight.shape[0] if isinstance(m, nn.DepthwiseConv2d) else m.groups
        w = self.p(m.weight)
        arithmetic = getattr(m, "arithmetic", None)
        if arithmetic is None:
            y = TF.conv2d(x, w, None, m.stride, m.padding, m.dilation, groups)
        else:
            table = np.asarray(arithmetic.multiplier.table)
            self.quantised_calls.append(m)
            x_codes = quantize_reference(x.detach().numpy())
            w_codes = quantize_reference(w.detach().numpy())
            if self.codes is not None:
                x_codes, w_codes = self._replayed_codes(m, x_codes, w_codes)
            if np.array_equal(table, EXACT_TABLE):
                # Exact 8 bit = the float conv of the de-quantised operands; the gradient passes
                # straight through the rounding to x and w.
                y = TF.conv2d(straight_through(x, x_codes), straight_through(w, w_codes), None,
                              m.stride, m.padding, m.dilation, groups)
            else:
                y = TableConv.apply(x, w, table, x_codes, w_codes, m.stride, m.padding, m.dilation, groups)
        shape = m.weight.shape
        self.macs.append(("conv", y.numel() * shape[1] * shape[2] * shape[3]))
        return y

    def batch_norm(self, m, x):
        rm, rv = self.buffers[id(m)]
        w = self.p(m.weight) if m.affine else None
        b = self.p(m.bias) if m.affine else None
        return TF.batch_norm(x, rm, rv, w, b, training=m.training, momentum=m.momentum, eps=m.eps)

    def _replayed_codes(self, m, x_codes, w_codes):
        """Our codes for this call, after checking them against the mirror's own quantisation.

        The two quantise float tensors that agree only up to float rounding, so a value within
        rounding of a tie may take the neighbouring code; anything more is a quantisation bug.
        Quantisation is discontinuous, so replaying our codes keeps one tie from cascading
        through the following layers' batch statistics.
        """
        ours_x, ours_w = self.codes[id(m.weight)].popleft()
        for operand, own, ours in (("input", x_codes, ours_x), ("weight", w_codes, ours_w)):
            where = f"{self._name(m)} {operand}"
            q_own, s_own, z_own = own
            q_ours, s_ours, z_ours = ours
            assert q_own.shape == q_ours.shape, where
            assert abs(s_own - s_ours) <= 1e-5 * s_own, f"{where}: scale {s_ours} vs {s_own}"
            assert abs(z_own - z_ours) <= 1, f"{where}: zero point {z_ours} vs {z_own}"
            diff = np.abs(q_own - q_ours.astype(np.int64))
            assert diff.max(initial=0) <= 1, f"{where}: codes differ by {diff.max()}"
            flips = int(np.count_nonzero(diff))
            assert flips <= max(2, q_own.size // 1000), f"{where}: {flips} of {q_own.size} codes differ"
            self.code_flips += flips
        return ((ours_x[0].astype(np.int64), ours_x[1], ours_x[2]),
                (ours_w[0].astype(np.int64), ours_w[1], ours_w[2]))

    def _name(self, layer) -> str:
        if not hasattr(self, "_names"):
            self._names = {id(mod): name for name, mod in self.model.named_modules()}
        return self._names.get(id(layer), type(layer).__name__)

    # ------------------------------------------------------------ DARTS search network
    def mixed_op(self, m, x, weights):
        # All eight candidates, `none` included, as in DARTS: Σ_o w_o · op_o(x).
        stride = _edge_stride(m)
        out = weights[0] * (x[:, :, ::stride, ::stride] * 0.0)
        for w, op in zip(weights[1:], m.ops):
            out = out + w * self.run(op, x)
        return out

    def search_cell(self, cell, s0, s1, weights):
        states = [self.run(cell.preprocess0, s0), self.run(cell.preprocess1, s1)]
        offset = 0
        for _ in range(ms.STEPS):
            s = sum(self.run(cell.edges[offset + j], h, weights[offset + j]) for j, h in enumerate(states))
            offset += len(states)
            states.append(s)
        return torch.cat(states[-ms.STEPS:], dim=1)

    def network(self, net, x):
        s0 = s1 = self.run(net.stem, x)
        for cell in net.cells:
            alphas = net.alphas_reduce if cell.reduction else net.alphas_normal
            weights = torch.softmax(self.p(alphas), dim=-1)
            s0, s1 = s1, self.search_cell(cell, s0, s1, weights)
        return self.run(net.classifier, self.run(net.global_pooling, s1))


    # ------------------------------------------------------------ DARTS evaluation network
    def eval_cell(self, cell, s0, s1, drop_prob=0.0):
        states = [self.run(cell.preprocess0, s0), self.run(cell.preprocess1, s1)]
        pairs = cell.op_names
        for i in range(len(pairs) // 2):
            hs = []
            for k in (2 * i, 2 * i + 1):
                h = self.run(cell.ops[k], states[cell.indices[k]])
                if cell.training and drop_prob > 0 and not isinstance(cell.ops[k], nn.Identity):
                    keep = 1.0 - drop_prob
                    h = h / keep * torch.tensor(next(self.drop_masks))
                hs.append(h)
            states.append(hs[0] + hs[1])
        return torch.cat([states[i] for i in cell.concat], dim=1)

    def network_cifar(self, net, x):
        aux = None
        s0 = s1 = self.run(net.stem, x)
        for i, cell in enumerate(net.cells):
            s0, s1 = s1, self.eval_cell(cell, s0, s1, net.drop_path_prob)
            if i == 2 * net.layers // 3 and net.auxiliary_head is not None and net.training:
                aux = self.run(net.auxiliary_head, s1)
        return self.run(net.classifier, self.run(net.global_pooling, s1)), aux


def _edge_stride(mixed: ms.MixedOp) -> int:
    pool = mixed.ops[0].layers[0]  # max_pool_3x3 carries the edge's stride
    return pool.stride


# ---------------------------------------------------------------- 8-bit arithmetic, written again

EXACT_TABLE = np.multiply.outer(np.arange(256, dtype=np.int64), np.arange(256, dtype=np.int64))


def _round_half_up(v: np.ndarray) -> np.ndarray:
    floor = np.floor(v)
    return floor + (v - floor >= 0.5)


def quantize_reference(x: np.ndarray) -> tuple[np.ndarray, float, int]:
    """docs/design.md §2 per-tensor uint8 quantisation: ``(q as int64, scale, zero point)``.

    Range widened to contain 0, s = (hi - lo) / 255, z = round(-lo / s) clamped, q = clamp(round(x / s)
    + z); rounding half up, in float64; an all-zero tensor gets s = 1, z = 0.
    """
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    if lo == hi:
        return np.zeros(x.shape, dtype=np.int64), 1.0, 0
    s = (hi - lo) / 255.0
    z = int(min(max(_round_half_up(np.float64(-lo / s)), 0), 255))
    q = np.clip(_round_half_up(x.astype(np.float64) / s) + z, 0, 255).astype(np.int64)
    return q, s, z


def dequantized(codes) -> np.ndarray:
    """``(q - z) * s`` in float64, rounded once to float32."""
    q, s, z = codes
    return ((q - z) * s).astype(np.float32)


def straight_through(t: torch.Tensor, codes) -> torch.Tensor:
    """The de-quantised values of ``t``'s codes forward, the identity backward."""
    deq = torch.from_numpy(dequantized(codes))
    return t + (deq - t).detach()


def table_conv_reference(x_codes, w_codes, table: np.ndarray, stride, padding, dilation,
                         groups: int) -> np.ndarray:
    """Sum ``M[q_x, q_w] - z_w q_x - z_x q_w + z_x z_w`` in int64 by a plain gather per kernel
    offset, and scale by ``s_x s_w`` (float64, rounded once to float32)."""
    qx, sx, zx = x_codes
    qw, sw, zw = w_codes
    (sh, sw_), (ph, pw), (dh, dw) = stride, padding, dilation
    n, c_in, h, w_in = qx.shape
    c_out, cin_g, kh, kw = qw.shape
    cout_g = c_out // groups
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w_in + 2 * pw - dw * (kw - 1) - 1) // sw_ + 1
    padded = np.pad(qx, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=zx)  # x = 0 is q = z_x
    qw_g = qw.reshape(groups, cout_g, cin_g, kh, kw)
    acc = np.zeros((n, groups, cout_g, ho, wo), dtype=np.int64)
    for i in range(kh):
        for j in range(kw):
            window = padded[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw_ * (wo - 1) + 1: sw_]
            a = window.reshape(n, groups, 1, cin_g, ho, wo)
            b = qw_g[None, :, :, :, i, j, None, None]
            acc += (table[a, b] - zw * a - zx * b + zx * zw).sum(axis=3)
    return (acc.reshape(n, c_out, ho, wo) * (sx * sw)).astype(np.float32)


class TableConv(torch.autograd.Function):
    """Convolution through a multiplier table (plain gather) on given codes; straight-through gradient."""

    @staticmethod
    def forward(ctx, x, w, table, x_codes, w_codes, stride, padding, dilation, groups):
        ctx.save_for_backward(torch.from_numpy(dequantized(x_codes)), torch.from_numpy(dequantized(w_codes)))
        ctx.geometry = (stride, padding, dilation, groups)
        return torch.from_numpy(table_conv_reference(x_codes, w_codes, table, stride, padding, dilation, groups))

    @staticmethod
    def backward(ctx, g):
        x_deq, w_deq = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        gx = torch.nn.grad.conv2d_input(x_deq.shape, w_deq, g, stride, padding, dilation, groups)
        gw = torch.nn.grad.conv2d_weight(x_deq, w_deq.shape, g, stride, padding, dilation, groups)
        return gx, gw, None, None, None, None, None, None, None


@contextlib.contextmanager
def recording_codes():
    """Record, per weight and in call order, the (q, s, z) codes our 8-bit layers quantise to.

    Yields the dict a TorchMirror takes as ``codes``. The package's own quantiser is called on the
    same operands the layer quantises (it is deterministic), so the record is what the layer used.
    """
    from approxdarts_np.approx import convolution, quantize

    codes: dict = collections.defaultdict(collections.deque)
    original = convolution.QuantizedArithmetic.conv2d

    def conv2d(self, x, w, *args, **kwargs):
        codes[id(w)].append((quantize.quantize_per_tensor(x.data), quantize.quantize_per_tensor(w.data)))
        return original(self, x, w, *args, **kwargs)

    convolution.QuantizedArithmetic.conv2d = conv2d
    try:
        yield codes
    finally:
        convolution.QuantizedArithmetic.conv2d = original
