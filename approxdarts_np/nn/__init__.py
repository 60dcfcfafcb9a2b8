"""Layers, the Module base and optimizers."""
from approxdarts_np.nn.layers import (AvgPool2d, BatchNorm2d, Conv2d, DepthwiseConv2d, GlobalAvgPool2d,
                                      Identity, Linear, MaxPool2d, ReLU)
from approxdarts_np.nn.module import Module, ModuleList, Parameter, Sequential
from approxdarts_np.nn.optim import SGD, Adam, Optimizer, clip_grad_norm, cosine_lr

__all__ = ["AvgPool2d", "BatchNorm2d", "Conv2d", "DepthwiseConv2d", "GlobalAvgPool2d", "Identity",
           "Linear", "MaxPool2d", "ReLU", "Module", "ModuleList", "Parameter", "Sequential", "SGD",
           "Adam", "Optimizer", "clip_grad_norm", "cosine_lr"]
