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

    def named_modules(self) -> Iterator[tuple[str, "Module"]]:
        """``(dotted name, module)`` for this module ("" at the top) and every module below it.

        A module reachable by two paths (e.g. a layer held as an attribute and
        inside a Sequential) is listed once, under the first path.
        """
        seen: set[int] = set()
        stack = [("", self)]
        while stack:
            prefix, module = stack.pop()
            if id(module) in seen:
                continue
            seen.add(id(module))
            yield prefix, module
            children = list(module.named_children())
            for name, child in reversed(children):
                stack.append((f"{prefix}.{name}" if prefix else name, child))

    def modules(self) -> Iterator["Module"]:
        """This module and every module below it, depth first, each once."""
        for _, m in self.named_modules():
            yield m

    def named_parameters(self) -> Iterator[tuple[str, Parameter]]:
        """``(dotted name, parameter)`` for every Parameter, each once, in a fixed order."""
        seen: set[int] = set()
        for prefix, module in self.named_modules():
            for name, value in vars(module).items():
                if isinstance(value, Parameter) and id(value) not in seen:
                    seen.add(id(value))
                    yield (f"{prefix}.{name}" if prefix else name), value

    def parameters(self) -> list[Parameter]:
        """Every Parameter of this module and its children, each once, in a fixed order."""
        return [p for _, p in self.named_parameters()]

    def register_buffer(self, name: str, value: np.ndarray) -> None:
        self._buffers[name] = np.asarray(value, dtype=np.float32)

    def named_buffers(self) -> Iterator[tuple[str, np.ndarray]]:
        for prefix, module in self.named_modules():
            for name, value in module._buffers.items():
                yield (f"{prefix}.{name}" if prefix else name), value

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
        buffers = {(f"{prefix}.{key}" if prefix else key): (module, key)
                   for prefix, module in self.named_modules() for key in module._buffers}
        expected = set(own) | set(buffers)
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise KeyError(f"state dict mismatch: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
        for name, p in own.items():
            _copy_into(name, p.data, state[name])
        for name, (module, key) in buffers.items():
            _copy_into(name, module._buffers[key], state[name])


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
