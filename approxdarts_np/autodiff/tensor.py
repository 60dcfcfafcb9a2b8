"""Tensor and Function: the reverse-mode autodiff engine.

A :class:`Tensor` wraps a float32 ndarray. Every differentiable op is a
:class:`Function` subclass with ``forward`` and ``backward`` side by side; the
state backward needs is saved on the function instance (the "ctx"). The engine
sorts the graph once per :meth:`Tensor.backward` (iteratively, so depth is not
limited by Python's recursion limit) and checks that every gradient a backward
returns has exactly its input's shape and dtype, so a wrong backward fails at
its source.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import threading
from typing import Iterator

import numpy as np

from approxdarts_np.kernels import elementwise as kew

DTYPE = np.float32

# Whether new results record their graph. A ContextVar (not a module global) so
# that ``no_grad`` is safe across threads and generators.
_GRAD_ENABLED = contextvars.ContextVar("approxdarts_np_grad_enabled", default=True)


@contextlib.contextmanager
def no_grad() -> Iterator[None]:
    """Inside this block no op records a graph (evaluation, optimizer updates)."""
    token = _GRAD_ENABLED.set(False)
    try:
        yield
    finally:
        _GRAD_ENABLED.reset(token)


def is_grad_enabled() -> bool:
    """True when ops record the graph for backward."""
    return _GRAD_ENABLED.get()


def unbroadcast(grad: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum ``grad`` down to ``shape``: the one place where broadcasting is undone."""
    if grad.shape == shape:
        return grad
    lead = grad.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        i + lead for i, n in enumerate(shape) if n == 1 and grad.shape[i + lead] != 1)
    out = grad.sum(axis=axes, keepdims=True, dtype=DTYPE) if axes else grad
    if lead:
        out = out.reshape(out.shape[lead:])
    return out.reshape(shape).astype(DTYPE, copy=False)


class Tensor:
    """A float32 array that can record the ops applied to it and back-propagate."""

    __slots__ = ("data", "grad", "requires_grad", "_ctx", "name", "_relu", "__weakref__")
    # Make ``ndarray op Tensor`` defer to Tensor's reflected operators.
    __array_ufunc__ = None

    def __init__(self, data, requires_grad: bool = False, name: str | None = None):
        arr = np.asarray(data)
        if arr.dtype != DTYPE:
            arr = arr.astype(DTYPE)
        self.data: np.ndarray = arr
        self.grad: np.ndarray | None = None
        self.requires_grad = bool(requires_grad)
        self._ctx: Function | None = None
        self.name = name
        # ReLU of this tensor, when it is an op's result (see functional.relu); False: never shared.
        self._relu: Tensor | None | bool = False

    # ------------------------------------------------------------ properties
    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def size(self) -> int:
        return self.data.size

    def numpy(self) -> np.ndarray:
        """The underlying array (not a copy)."""
        return self.data

    def item(self) -> float:
        return float(self.data.reshape(-1)[0]) if self.data.size == 1 else float(self.data)

    def detach(self) -> "Tensor":
        """The same data, cut from the graph."""
        return Tensor(self.data, requires_grad=False)

    def __repr__(self) -> str:
        flag = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor(shape={self.shape}{flag})"

    def __len__(self) -> int:
        return len(self.data)

    # -------------------------------------------------------------- backward
    def backward(self, grad: np.ndarray | None = None) -> None:
        """Accumulate d(self)/d(leaf) into ``leaf.grad`` for every leaf that requires grad.

        The graph is released as it is consumed: each function drops its saved
        state right after its backward ran, and an intermediate gradient is
        dropped as soon as the function that consumes it has run.
        """
        if grad is None:
            if self.data.size != 1:
                raise ValueError("backward() without a gradient needs a scalar tensor")
            grad = np.ones_like(self.data)
        grad = np.asarray(grad, dtype=DTYPE)
        if grad.shape != self.shape:
            raise ValueError(f"gradient shape {grad.shape} != tensor shape {self.shape}")
        root = _graph_node(self)
        if root is self and not self.requires_grad:
            return
        grads: dict[int, np.ndarray] = {id(root): grad}
        # Sums this loop allocated itself (id -> array, the reference keeps the id unique):
        # only those may take further gradients in place. Arrays returned by a backward may be
        # shared (Add returns one array for both inputs), so they are never written to.
        owned: dict[int, np.ndarray] = {}
        order = _topological_order(root)
        if not any(getattr(node, "collective", False) for node in order):
            for node in order:
                _backward_node(node, grads.pop(id(node), None), grads, owned)
            return
        # Collective functions (batch norm over a batch split across replicas) exchange sums with the
        # other replicas in backward: run them level by level, every ready one of a level together.
        for plain, collective in _collective_levels(order):
            for node in plain:
                _backward_node(node, grads.pop(id(node), None), grads, owned)
            pending = [(node, grads.pop(id(node), None)) for node in collective]
            for node, g in pending:
                owned.pop(id(g), None)
            results = run_independent([functools.partial(_node_gradients, node, g) for node, g in pending])
            for (node, _), in_grads in zip(pending, results):
                _accumulate(node, in_grads, grads, owned)

    # ------------------------------------------------------------- operators
    def __add__(self, other):
        return F.add(self, other)

    __radd__ = __add__

    def __sub__(self, other):
        return F.sub(self, other)

    def __rsub__(self, other):
        return F.sub(other, self)

    def __mul__(self, other):
        return F.mul(self, other)

    __rmul__ = __mul__

    def __truediv__(self, other):
        if isinstance(other, Tensor):
            raise TypeError("division by a Tensor is not supported; multiply by its reciprocal")
        return F.mul(self, 1.0 / float(other))

    def __neg__(self):
        return F.neg(self)

    def __matmul__(self, other):
        return F.matmul(self, other)

    def __getitem__(self, index):
        return F.getitem(self, index)

    def sum(self, axis=None, keepdims: bool = False):
        return F.sum(self, axis=axis, keepdims=keepdims)

    def mean(self, axis=None, keepdims: bool = False):
        return F.mean(self, axis=axis, keepdims=keepdims)

    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return F.reshape(self, shape)

    def transpose(self, *axes):
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        return F.transpose(self, axes or None)

    @property
    def T(self):
        return F.transpose(self, None)

    def relu(self):
        return F.relu(self)

    def exp(self):
        return F.exp(self)

    def log(self):
        return F.log(self)

    def softmax(self, axis: int = -1):
        return F.softmax(self, axis=axis)

    def log_softmax(self, axis: int = -1):
        return F.log_softmax(self, axis=axis)


def as_tensor(value) -> Tensor:
    """A Tensor for ``value`` (returned unchanged when it already is one)."""
    return value if isinstance(value, Tensor) else Tensor(value)


def _grad_error(ctx: "Function", shape: tuple[int, ...], grad) -> None:
    got = (grad.shape, grad.dtype) if isinstance(grad, np.ndarray) else type(grad).__name__
    raise RuntimeError(f"{type(ctx).__name__}.backward returned a gradient {got} for an input "
                       f"of shape {shape} and dtype {DTYPE.__name__}")


def _graph_node(t: Tensor):
    """The node a gradient for ``t`` goes to: its producing function, or ``t`` itself.

    A result whose graph a backward already consumed counts as a leaf again.
    """
    ctx = t._ctx
    return t if ctx is None or ctx.consumed else ctx


def _backward_node(node, g, grads: dict, owned: dict) -> None:
    """Run one node of a backward pass: a leaf takes its gradient, a function passes it on."""
    owned.pop(id(g), None)
    if type(node) is Tensor or not isinstance(node, Function):  # a leaf Tensor
        if g is not None:
            node.grad = g.copy() if node.grad is None else node.grad + g
        return
    _accumulate(node, _node_gradients(node, g), grads, owned)


def _node_gradients(node, g):
    """The input gradients of function ``node`` for output gradient ``g`` (None: no gradient reached it)."""
    if g is None:
        return None
    in_grads = node.backward(g)
    return in_grads if isinstance(in_grads, tuple) else (in_grads,)


def _accumulate(node, in_grads, grads: dict, owned: dict) -> None:
    """Add ``node``'s input gradients to those of its inputs, then release the node."""
    if in_grads is None:
        node.release()
        return
    inputs = node.inputs
    if len(in_grads) != len(inputs):
        raise RuntimeError(f"{type(node).__name__}.backward returned {len(in_grads)} "
                           f"gradients for {len(inputs)} inputs")
    for i, (nxt, pg) in enumerate(zip(inputs, in_grads)):
        if pg is None or nxt is None:
            continue
        if type(pg) is not np.ndarray:
            pg = np.asarray(pg) if isinstance(pg, np.generic) else pg  # 0-d results
            if type(pg) is not np.ndarray:
                _grad_error(node, node.in_shapes[i], pg)
        if pg.shape != node.in_shapes[i] or pg.dtype != DTYPE:
            _grad_error(node, node.in_shapes[i], pg)
        key = id(nxt)
        prev = grads.get(key)
        if prev is None:
            grads[key] = pg
        elif owned.get(id(prev)) is prev:
            kew.add_into(prev, pg)
        else:
            total = np.add(prev, pg, dtype=DTYPE)
            owned[id(total)] = total
            grads[key] = total
    node.release()


def _collective_levels(order: list) -> list[tuple[list, list]]:
    """``order`` (each node before its inputs) cut into levels, each (plain nodes, collective functions).

    A node's level is the number of collective functions on the longest path from the root to it,
    itself excluded. Running the levels in turn, each level's plain nodes in ``order`` and then its
    collective functions, still runs every node after all the nodes that consume its output: a
    consumer is at a lower level, or at the same level and earlier in ``order`` and not collective.
    """
    level: dict[int, int] = {}
    levels: list[tuple[list, list]] = []
    for node in order:
        own = level.get(id(node), 0)
        collective = getattr(node, "collective", False)
        while len(levels) <= own:
            levels.append(([], []))
        levels[own][1 if collective else 0].append(node)
        if isinstance(node, Function):
            below = own + (1 if collective else 0)
            for nxt in node.inputs:
                if nxt is not None and level.get(id(nxt), -1) < below:
                    level[id(nxt)] = below
    return levels


# How independent computations run (run_independent): in turn in this thread unless a runner is set
# for it (approxdarts_np.runs.replicas runs them side by side to batch their exchanges).
_RUNNER = threading.local()


def run_independent_with(runner) -> None:
    """Make :func:`run_independent` in this thread call ``runner(functions)`` (None: in turn)."""
    _RUNNER.run = runner


def run_independent(functions: list) -> list:
    """The results of ``functions`` (no arguments; none uses another's result), in their order.

    In one process they run in turn. A search whose batch is split over replicas runs them side by
    side, so that the sums each exchanges with the other replicas go in one exchange per round.
    """
    runner = getattr(_RUNNER, "run", None)
    if runner is None:
        return [f() for f in functions]
    return runner(functions)


def _topological_order(root) -> list:
    """Graph nodes reachable from ``root`` (a Function or a leaf Tensor), each before its inputs."""
    order: list = []
    visited: set[int] = set()
    stack: list = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        if isinstance(node, Function):
            for nxt in node.inputs:
                if nxt is not None and id(nxt) not in visited:
                    stack.append((nxt, False))
    order.reverse()
    return order


class Function:
    """One differentiable op: ``forward`` on arrays, ``backward`` from the output gradient.

    Subclasses save what backward needs on ``self`` and return from ``backward``
    one gradient (float32 array of the input's shape, or None) per Tensor input,
    in the order the inputs were given to :meth:`apply`.

    The graph links functions, not tensors: ``inputs`` holds, per input, the
    function that produced it, the leaf Tensor itself, or None when no gradient
    flows there. So an intermediate array lives only as long as a caller holds
    its Tensor or a backward saved it, never because the graph does.
    """

    inputs: tuple = ()
    needs: tuple = ()
    in_shapes: tuple = ()
    consumed = False  # set by release(): backward ran and the saved state is gone

    def forward(self, *arrays, **kwargs) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def backward(self, grad: np.ndarray):  # pragma: no cover - interface
        raise NotImplementedError

    def release(self) -> None:
        """Drop saved state and graph links once backward has run (frees memory early)."""
        self.__dict__.clear()
        self.consumed = True

    def needs_grad(self, i: int) -> bool:
        """Whether the i-th Tensor input wants a gradient (skip work when it does not)."""
        return self.needs[i]

    @classmethod
    def apply(cls, *inputs, **kwargs) -> Tensor:
        """Run forward on the inputs' arrays and record the op when a gradient may be needed."""
        tensors = [x if isinstance(x, Tensor) else Tensor(x) for x in inputs]
        ctx = cls()
        needs = tuple([t.requires_grad for t in tensors])
        record = True in needs and _GRAD_ENABLED.get()
        ctx.needs = needs if record else (False,) * len(tensors)
        out = ctx.forward(*[t.data for t in tensors], **kwargs)
        if type(out) is not np.ndarray:
            if isinstance(out, np.generic):  # numpy turns 0-d results into scalars
                out = np.asarray(out)
            if not isinstance(out, np.ndarray):
                raise RuntimeError(f"{cls.__name__}.forward must return a float32 ndarray, got {type(out)}")
        if out.dtype != DTYPE:
            raise RuntimeError(f"{cls.__name__}.forward must return a float32 ndarray, got {out.dtype}")
        result = Tensor.__new__(Tensor)
        result.data = out
        result.grad = None
        result.name = None
        result._relu = None
        if record:
            ctx.inputs = tuple([_graph_node(t) if t.requires_grad else None for t in tensors])
            ctx.in_shapes = tuple([t.data.shape for t in tensors])
            result.requires_grad = True
            result._ctx = ctx
        else:
            result.requires_grad = False
            result._ctx = None
            ctx.release()
        return result


# Bound late so that the operator methods above can reach the op library.
from approxdarts_np.autodiff import functional as F  # noqa: E402
