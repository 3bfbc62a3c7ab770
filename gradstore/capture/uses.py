"""Every use of every trainable parameter in the capture forward: :class:`UseTracker`.

The engine is parameter-centric: it must know each use of each captured parameter, wherever it
happens. :class:`UseTracker` is a :class:`torch.overrides.TorchFunctionMode` over the capture
forward (model and ``loss_fn``), with a stack of running modules kept by forward pre/post hooks
on every module. An operation that consumes a captured parameter (the tensor itself, or a view of
it such as ``weight.T`` or ``in_proj_weight.split(...)[0]``) and returns a result autograd tracks
is either

- **covered by a module rule**: the innermost running module owns the parameter and has a rule
  (:mod:`gradstore.capture.registry`); the module's recorded call (:class:`~gradstore.capture.hooks.Tap`)
  gives its factors; or
- **recorded as an op use** (:class:`OpUse`): the operation's arguments (detached) and a tensor
  hook on its output that receives the output gradient. The engine turns it into factors by an op
  rule (:mod:`gradstore.capture.ops`), the torch.func op fallback, or the fallback of the owning
  module, and refuses in one line when none applies.

Operations that produce a view of a parameter are not uses by themselves; the operation consuming
the view is. Operations under ``torch.no_grad()`` or with untracked results are ignored.

Example data: the tracker tags the capture's input tensors and every result of an operation one of
whose arguments is tagged. A use none of whose arguments is tagged (``self.pos(torch.arange(T))``)
computes one value for the whole batch: its per-example gradients are recovered exactly when that
value is only combined elementwise with example data (``tok + pos``; the tracker then hands the
operation an expanded copy, ``pos.expand(n, T, d)``, equal in value, whose gradient is per
example), and refused otherwise.

``F.multi_head_attention_forward`` is entered (its inner ``F.linear`` calls are seen), with the
example axis second, as that function lays out its tensors (``(L, N, E)``).
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from gradstore._nest import tensor_leaves
from gradstore.capture.hooks import edges_of
from gradstore.capture.ops import op_name

#: composite functions the tracker enters, with the example axis their tensors use
ENTERED = {F.multi_head_attention_forward: 1}

#: operations that tile a parameter over the examples (``bias_k.repeat(1, N, 1)`` in
#: ``F.multi_head_attention_forward``, a class token's ``cls.expand(N, -1, -1)``): when the output has
#: the m examples on the example axis where the parameter has size 1, it is example data (slice n
#: belongs to example n) and the use is batched, for :func:`gradstore.capture.ops.broadcast_op`
TILING = {torch.Tensor.repeat, torch.Tensor.expand}

#: module types whose tensors put the example axis second when ``batch_first`` is False
SEQUENCE_FIRST_TYPES = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
                        nn.Transformer)

#: elementwise operations through which a batch-constant use is expanded over the examples
BROADCASTING = {
    torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__,
    torch.sub, torch.Tensor.sub, torch.Tensor.__sub__, torch.Tensor.__rsub__,
    torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__,
}

#: calls that make no tensor (metadata, hooks): nothing to record, tag or expand, so the tracker
#: passes them straight through. Module hooks run under the mode too, so without this every
#: ``requires_grad``, ``grad_fn`` and ``register_hook`` of the engine's own forward hooks (two
#: thirds of the calls the tracker saw on the benchmark LMs) paid the whole interception.
NO_TENSOR = frozenset(
    [getattr(torch.Tensor, name).__get__ for name in (
        "requires_grad", "grad_fn", "output_nr", "is_leaf", "shape", "dtype", "device", "ndim", "layout",
        "_version", "is_cuda", "is_sparse", "is_quantized", "is_meta", "itemsize", "nbytes")
     if hasattr(torch.Tensor, name)]
    + [getattr(torch.Tensor, name) for name in (
        "size", "dim", "ndimension", "numel", "nelement", "stride", "storage_offset", "is_contiguous",
        "element_size", "data_ptr", "_is_view", "register_hook", "get_device", "is_floating_point",
        "is_complex", "__len__")
       if hasattr(torch.Tensor, name)]
)


class Slot:
    """Placeholder for a (view of a) captured parameter in a recorded operation's arguments."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


@dataclass(eq=False)
class OpUse:
    """One operation consuming captured parameters outside a module rule's coverage.

    ``args``/``kwargs`` hold the call's arguments, tensors detached, each captured parameter (or
    view) replaced by a :class:`Slot`; ``views[i]`` is ``(parameter name, detached view)``.
    ``edges`` and ``shapes`` are the autograd edges and shapes of the output's tensor leaves (as in
    :class:`~gradstore.capture.hooks.Use`), ``grads`` their output
    gradients. ``owners_running``: owner paths of the slot parameters that were on the module
    stack. ``batched``: whether any other argument carried example data.
    """

    func: object
    args: tuple
    kwargs: dict
    views: list
    axis: int
    module: str
    owners_running: set
    batched: bool
    edges: list = field(default_factory=list)
    shapes: list = field(default_factory=list)
    grads: list = field(default_factory=list)
    inputs_versions: list = field(default_factory=list)
    expanded: object = None  # for a batch-constant use: the expansion recovering per-example grads

    @property
    def name(self) -> str:
        return op_name(self.func)

    @property
    def grad(self):
        return self.grads[0] if len(self.grads) == 1 else tuple(self.grads)

    def release(self) -> None:
        """Forget the recorded arguments and output gradients (the graph's hooks still hold the use)."""
        self.args, self.kwargs, self.grads, self.edges, self.inputs_versions = (), {}, [], [], []


class _Reentered(TorchFunctionMode):
    """Re-enables the tracker inside a function the tracker enters (modes pop while they run)."""

    def __init__(self, tracker):
        super().__init__()
        self.tracker = tracker

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return self.tracker.__torch_function__(func, types, args, kwargs)


def _entered(tracker, func, args, kwargs):
    """Run a Python-level torch function with the tracker active inside it.

    Such a function starts with ``if has_torch_function(tens_ops): return handle_torch_function(...)``,
    which would hand it back to the tracker forever; its module's ``has_torch_function`` answers
    False to that one first check (then is restored), so the body runs with the tracker seeing its
    operations (``F.linear`` on ``in_proj_weight``, ``out_proj.weight``).
    """
    module = sys.modules[func.__module__]
    original = module.has_torch_function

    def once(ops):
        module.has_torch_function = original
        return False

    module.has_torch_function = once
    try:
        with _Reentered(tracker):
            return func(*args, **kwargs)
    finally:
        module.has_torch_function = original


class UseTracker(TorchFunctionMode):
    """Classify and record every use of a captured parameter during the capture forward.

    Parameters
    ----------
    model : nn.Module
        Every module of it is hooked to keep the stack of running modules.
    params : dict
        Full name -> captured (trainable) parameter.
    owners : dict
        Full name -> list of (owning module path, local name): several for tied parameters.
    rule_paths : set
        Paths of owning modules that have a module rule.
    m : int
        Number of examples.
    data : iterable of Tensor
        The capture's input tensors (example data).
    """

    def __init__(self, model: nn.Module, params: dict, owners: dict, rule_paths: set, m: int, data=()):
        super().__init__()
        self.model = model
        self.m = m
        self.ids = {id(p): name for name, p in params.items()}
        self.owners = owners
        self.rule_owner = {name: {path for path, _ in owns if path in rule_paths} for name, owns in owners.items()}
        self.all_owner = {name: {path for path, _ in owns} for name, owns in owners.items()}
        self.stack: list[str] = []
        self.axes: list[int] = [0]
        self.types: dict[str, str] = {}
        self.uses: list[OpUse] = []
        #: (parameter, rule-owning module, operation, running child) of a parameter consumed inside a
        #: child of its own rule-covered module: refused (the rule and the op would both count it)
        self.nested: list = []
        self._data: dict[int, weakref.ref] = {}
        #: id(output) -> (ref, use record) of batch-constant uses, module or op, awaiting expansion
        self.constant: dict[int, tuple] = {}
        self.recording = True
        self.muted = False
        #: called with the use when a recorded operation's output receives a gradient
        self.on_grad = None
        self._handles: list = []
        for value in data:
            self.tag(value)

    # -- example data ------------------------------------------------------------------------
    def tag(self, value) -> None:
        if isinstance(value, torch.Tensor):
            self._data[id(value)] = weakref.ref(value)
        elif isinstance(value, (tuple, list)):
            for item in value:
                self.tag(item)
        elif isinstance(value, dict):
            for item in value.values():
                self.tag(item)

    def is_data(self, value) -> bool:
        if isinstance(value, torch.Tensor):
            ref = self._data.get(id(value))
            return ref is not None and ref() is value
        if isinstance(value, (tuple, list)):
            return any(self.is_data(v) for v in value)
        if isinstance(value, dict):
            return any(self.is_data(v) for v in value.values())
        return False

    @property
    def axis(self) -> int:
        return self.axes[-1]

    # -- the stack of running modules -------------------------------------------------------
    def __enter__(self):
        for path, module in self.model.named_modules():
            self.types[path] = type(module).__name__
            seq_first = _sequence_first(module)
            self._handles.append(module.register_forward_pre_hook(partial(self._push, path, seq_first)))
            self._handles.append(module.register_forward_hook(partial(self._pop, path, seq_first), always_call=True))
        try:
            return super().__enter__()
        except BaseException:
            self._remove()
            raise

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.stack.clear()

    def _push(self, path, seq_first, module, args):
        self.stack.append(path)
        self.axes.append(1 if seq_first else self.axes[-1])

    def _pop(self, path, seq_first, module, args, output):
        if self.stack and self.stack[-1] == path:
            self.stack.pop()
            self.axes.pop()

    def where(self) -> str:
        if not self.stack:
            return "loss_fn"
        if self.stack[-1] == "":
            return "the model's forward"
        return f"the forward of {self.stack[-1]!r} ({self.types[self.stack[-1]]})"

    # -- the interception -----------------------------------------------------------------------
    def _param_of(self, value):
        if isinstance(value, torch.Tensor):
            name = self.ids.get(id(value))
            if name is None and value._is_view():
                name = self.ids.get(id(value._base))
                if name is not None and self.is_data(value):  # cls.expand(n, ...): a view, but example data
                    name = None
            return name
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in NO_TENSOR:
            return func(*args, **kwargs)
        if func in ENTERED and self.recording:
            self.axes.append(ENTERED[func])
            try:
                out = _entered(self, func, args, kwargs)
            finally:
                self.axes.pop()
            if self.is_data((args, kwargs)):
                self.tag(out)
            return out
        if not self.recording:
            return func(*args, **kwargs)
        found: list = []
        _walk((args, kwargs), self._param_of, found)
        pending: list = []
        if self.constant:
            args, kwargs, pending = self._expand_constants(func, args, kwargs)
        out = func(*args, **kwargs)
        for value, use in pending:  # a differentiable consumer that is not an expansion
            if out is not value and _tracked(out, self.ids) and torch.is_grad_enabled():
                use.expanded.escaped.append(op_name(func))
        tiled = self._tiled_axis(args, out) if func in TILING and found else None  # a view of it, but data
        data = tiled is not None or self.is_data((args, kwargs))
        if data:
            self.tag(out)
        if found and torch.is_grad_enabled() and (tiled is not None or _tracked(out, self.ids)):
            running = self.stack[-1] if self.stack else None
            op_level = [n for n in found if running not in self.rule_owner[n]]
            for n in op_level:  # inside a rule owner's forward, but in a child: the rule would count it too
                owner = next((p for p in self.rule_owner[n] if p in self.stack), None)
                if owner is not None and not self.nested:
                    self.nested.append((n, owner, op_name(func), running))
            if op_level:
                self._record(func, args, kwargs, out, set(op_level), data, axis=tiled)
        return out

    def _tiled_axis(self, args, out):
        """The axis along which ``args[0].repeat/expand(...)`` put the m examples, or None.

        An axis where the source has size 1 and the output m: the current example axis if it is
        one (``bias_k.repeat(1, N, 1)`` in attention, ``cls.expand(n, -1, -1)``), else the only
        one (``h0.expand(-1, n, -1)``, an RNN's (layers, n, hidden) initial state).
        """
        src = args[0] if args else None
        if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor) or out.dim() < src.dim():
            return None
        shape = (1,) * (out.dim() - src.dim()) + tuple(src.shape)
        axes = [k for k in range(out.dim()) if shape[k] == 1 and out.shape[k] == self.m]
        if self.axis in axes:
            return self.axis
        return axes[0] if len(axes) == 1 else None

    def _record(self, func, args, kwargs, out, names: set, data: bool, axis: int | None = None) -> None:
        views: list = []

        def strip(value):
            if isinstance(value, torch.Tensor):
                name = self._param_of(value)
                if name is not None and name in names:
                    views.append((name, value.detach()))
                    return Slot(len(views) - 1)
                return value.detach()
            if isinstance(value, (tuple, list)) and not _is_packed(value):
                return type(value)(strip(v) for v in value)
            if isinstance(value, dict):
                return {k: strip(v) for k, v in value.items()}
            return value

        s_args, s_kwargs = strip(args), strip(kwargs)
        running = {p for n in names for p in self.all_owner[n] if p in self.stack}
        use = OpUse(func, s_args, s_kwargs, views, self.axis if axis is None else axis,
                    self.stack[-1] if self.stack else None, running, data)
        inputs: list = []
        _walk((s_args, s_kwargs), lambda v: v if isinstance(v, torch.Tensor) else None, inputs, keep=True)
        use.inputs_versions = [(t, t._version) for t in inputs]
        leaves = tensor_leaves(out, dicts=False)
        leaves = [leaf if isinstance(leaf, torch.Tensor) and leaf.requires_grad else None for leaf in leaves]
        use.edges = edges_of(leaves)
        use.shapes = [None if leaf is None else tuple(leaf.shape) for leaf in leaves]
        use.grads = [None] * len(leaves)
        for i, leaf in enumerate(leaves):
            if leaf is not None:
                leaf.register_hook(partial(self._on_grad, use, i))
        self.uses.append(use)
        if not data:
            self.watch_constant(out, use)

    def _on_grad(self, use: OpUse, i: int, grad: torch.Tensor) -> None:
        if not self.muted and use.grads:  # not muted, nor released
            use.grads[i] = grad if use.grads[i] is None else use.grads[i] + grad
            if self.on_grad is not None:
                self.on_grad(use)

    # -- batch-constant uses ----------------------------------------------------------------------
    def watch_constant(self, out, use) -> None:
        """Register a use computed without example data: its output may be expanded later."""
        if isinstance(out, torch.Tensor) and out.requires_grad:
            use.expanded = Expansion(self)
            self.constant[id(out)] = (weakref.ref(out), use)

    def _constant(self, value):
        if isinstance(value, torch.Tensor):
            entry = self.constant.get(id(value))
            if entry is not None and entry[0]() is value:
                return entry[1]
        return None

    def _expand_constants(self, func, args, kwargs):
        """Hand a broadcasting op an expanded copy of each batch-constant use's output it combines
        with example data; any other consumer of such an output marks it escaped."""
        hits = [(i, a, self._constant(a)) for i, a in enumerate(args) if self._constant(a) is not None]
        hits += [(k, v, self._constant(v)) for k, v in kwargs.items() if self._constant(v) is not None]
        nested: list = []
        _walk((args, kwargs), self._constant, nested)
        if not hits and not nested:
            return args, kwargs, []
        pending = [(v, u) for _, v, u in hits]
        if len(nested) > len(hits):  # inside a list argument (torch.cat): never expanded
            return args, kwargs, pending + [(None, u) for u in nested]
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        data = [t for t in tensors if self.is_data(t)]
        if func not in BROADCASTING or not data or not torch.is_grad_enabled():
            return args, kwargs, pending
        shape = torch.broadcast_shapes(*(t.shape for t in tensors))
        axis = self.axis
        if axis != 0 or len(shape) == 0 or shape[0] != self.m:  # expanded over a leading example axis only
            return args, kwargs, pending
        args, kwargs = list(args), dict(kwargs)
        for key, value, use in hits:
            expanded = value.expand(shape)
            use.expanded.add(expanded, value.shape, axis)
            if isinstance(key, int):
                args[key] = expanded
            else:
                kwargs[key] = expanded
        return tuple(args), kwargs, []


class Expansion:
    """The expanded copies of one batch-constant output and their per-example gradients."""

    def __init__(self, tracker):
        self.tracker = tracker
        self.escaped: list[str] = []
        self.grads: list = []  # per-example gradients of the output, (m, *shape without examples)
        self.shape = None
        self.axis = 0

    def add(self, expanded: torch.Tensor, shape, axis: int) -> None:
        self.shape, self.axis = tuple(shape), axis
        expanded.register_hook(self._on_grad)

    def _on_grad(self, grad):
        if self.tracker.muted:
            return
        # grad is (..., m at axis, ...) in the broadcast shape; reduce the broadcast axes to the
        # original shape (leading axes added, size-1 axes), keeping the example axis
        shape = self.shape
        lead = grad.dim() - len(shape)
        padded = (1,) * lead + shape
        axis = self.axis
        dims = [i for i, s in enumerate(padded) if s == 1 and grad.shape[i] != 1 and i != axis]
        g = grad.sum(dims, keepdim=True) if dims else grad
        g = g.movedim(axis, 0)  # (m, ...), the rest in the padded shape without the example axis
        self.grads.append(g)

    def per_example(self):
        """(m, *rest) per-example gradient of the output, summed over expansions (None if none)."""
        if not self.grads:
            return None
        total = self.grads[0]
        for g in self.grads[1:]:
            total = total + g
        return total


def _sequence_first(module) -> bool:
    """A transformer module laying out its tensors (L, N, E): ``batch_first=False``."""
    if not isinstance(module, SEQUENCE_FIRST_TYPES):
        return False
    attn = getattr(module, "self_attn", None)  # Transformer{Encoder,Decoder}Layer keep it there
    batch_first = getattr(module, "batch_first", getattr(attn, "batch_first", True))
    return batch_first is False


def _is_packed(value) -> bool:
    return type(value).__name__ == "PackedSequence"




def _walk(value, pick, found: list, keep: bool = False) -> None:
    """Append ``pick(tensor)`` for every tensor in ``value`` (nested tuples, lists, dicts); unique
    non-None results unless ``keep``."""
    if isinstance(value, torch.Tensor):
        got = pick(value)
        if got is not None and (keep or got not in found):
            found.append(got)
    elif isinstance(value, (tuple, list)):
        for item in value:
            _walk(item, pick, found, keep)
    elif isinstance(value, dict):
        for item in value.values():
            _walk(item, pick, found, keep)


def _tracked(out, ids) -> bool:
    """Whether ``out`` carries autograd history that is not just a view of a parameter."""
    if isinstance(out, torch.Tensor):
        if not out.requires_grad or id(out) in ids:
            return False
        return not (out._is_view() and id(out._base) in ids)
    if isinstance(out, (tuple, list)):
        return any(_tracked(o, ids) for o in out)
    return False
