"""Module base: parameter discovery, buffers, train/eval mode and state dicts."""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from approxdarts_np.autodiff import Tensor


class Parameter(Tensor):
    """A Tensor that a Module owns and an optimizer updates."""

    __slots__ = ()

    def __init__(self, data, name: str | None = None):
        super().__init__(data, requires_grad=True, name=name)


class Module:
    """Base class: attributes that are Parameters, Modules or lists of Modules are found by walking.

    Buffers (state that is saved but not trained, such as BatchNorm running
    statistics) are float32 ndarrays registered with :meth:`register_buffer`.
    """

    def __init__(self) -> None:
        self.training = True
        self._buffers: dict[str, np.ndarray] = {}

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):  # pragma: no cover - interface
        raise NotImplementedError

    # ---------------------------------------------------------------- walking
    def named_children(self) -> Iterator[tuple[str, "Module"]]:
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value
            elif isinstance(value, (list, tuple)):
                for i, item in enumerate(value):
                    if isinstance(item, Module):
                        yield f"{name}.{i}", item

    def modules(self) -> Iterator["Module"]:
        """This module and every module below it, depth first."""
        yield self
        for _, child in self.named_children():
            yield from child.modules()

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        for name, value in vars(self).items():
            if isinstance(value, Parameter):
                yield prefix + name, value
        for name, child in self.named_children():
            yield from child.named_parameters(prefix + name + ".")

    def parameters(self) -> list[Parameter]:
        """Every Parameter of this module and its children, each once, in a fixed order."""
        seen: set[int] = set()
        out = []
        for _, p in self.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    def register_buffer(self, name: str, value: np.ndarray) -> None:
        self._buffers[name] = np.asarray(value, dtype=np.float32)

    def named_buffers(self, prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
        for name, value in self._buffers.items():
            yield prefix + name, value
        for name, child in self.named_children():
            yield from child.named_buffers(prefix + name + ".")

    # ---------------------------------------------------------------- modes
    def train(self, mode: bool = True) -> "Module":
        for m in self.modules():
            m.training = mode
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of every parameter and buffer, keyed by dotted name."""
        state = {name: p.data.copy() for name, p in self.named_parameters()}
        state.update({name: b.copy() for name, b in self.named_buffers()})
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Load values saved by :meth:`state_dict`; names and shapes must match exactly."""
        own = dict(self.named_parameters())
        buffers = {name: (module, key) for module_prefix, module in _named_modules(self)
                   for key in module._buffers for name in [module_prefix + key]}
        expected = set(own) | set(buffers)
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise KeyError(f"state dict mismatch: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
        for name, p in own.items():
            _copy_into(name, p.data, state[name])
        for name, (module, key) in buffers.items():
            _copy_into(name, module._buffers[key], state[name])


def _named_modules(module: Module, prefix: str = "") -> Iterator[tuple[str, Module]]:
    yield prefix, module
    for name, child in module.named_children():
        yield from _named_modules(child, prefix + name + ".")


def _copy_into(name: str, target: np.ndarray, value) -> None:
    value = np.asarray(value)
    if value.shape != target.shape:
        raise ValueError(f"{name}: saved shape {value.shape} != model shape {target.shape}")
    target[...] = value


class Sequential(Module):
    """Apply modules in order."""

    def __init__(self, *layers: Module):
        super().__init__()
        self.layers = list(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class ModuleList(Module):
    """A list of modules whose parameters are found by the walk."""

    def __init__(self, items: Iterable[Module] = ()):
        super().__init__()
        self.items = list(items)

    def __iter__(self):
        return iter(self.items)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def append(self, m: Module) -> None:
        self.items.append(m)
