"""A PyTorch re-implementation of the networks, run on the weights of our own modules.

The reference walks our module tree only to read weights and layer settings;
every computation (convolutions, BN, pools, MixedOp's weighted sum, cell wiring,
FactorizedReduce, drop-path) is written here again in torch, following the
DARTS definitions, so that the two implementations share no arithmetic.
"""
from __future__ import annotations

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
        y = TF.conv2d(x, self.p(m.weight), None, m.stride, m.padding, m.dilation, groups)
        w = m.weight.shape
        self.macs.append(("conv", y.numel() * w[1] * w[2] * w[3]))
        return y

    def batch_norm(self, m, x):
        rm, rv = self.buffers[id(m)]
        w = self.p(m.weight) if m.affine else None
        b = self.p(m.bias) if m.affine else None
        return TF.batch_norm(x, rm, rv, w, b, training=m.training, momentum=m.momentum, eps=m.eps)

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
