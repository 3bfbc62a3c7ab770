"""Hook lifecycle: record every call of the observed modules during one forward+backward pass.

:class:`Tap` is a context manager owning every hook handle; it stores what it records in its own
``uses`` dict (nothing is attached to modules or parameters) and removes all hooks on exit.

A module's output may be any structure (tuple, list, dict, Hugging Face ``ModelOutput``): it is
flattened with ``torch.utils._pytree.tree_flatten`` and each tensor leaf gets a gradient hook. A
rule then receives ``grad_output`` as a tensor for a single-tensor output, else as a tuple with one
entry per tensor leaf in flatten order (None where no gradient reached that leaf).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.utils._pytree import tree_flatten

from gradstore.errors import CaptureError


def edges_of(leaves: list) -> list:
    """The autograd edge of each tensor (None stays None): where its gradient arrives."""
    return [None if leaf is None else get_gradient_edge(leaf) for leaf in leaves]


def detached(value):
    """Tensors detached, nested tuples and lists (an LSTM's (h0, c0)) too, a PackedSequence as is."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if type(value).__name__ == "PackedSequence":
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(detached(v) for v in value)
    if isinstance(value, dict):
        return {k: detached(v) for k, v in value.items()}
    return value


@dataclass(eq=False)
class Use:
    """One call of a module: its (detached) positional inputs, keyword inputs and output gradients.

    ``edges`` are the autograd edges of the output's tensor leaves when the module returned them
    (``torch.autograd.graph.get_gradient_edge``; None for a leaf without gradient): they, not the
    tensors, are kept, so an output autograd does not save is freed as in a plain pass, and
    the gradient asked for at an edge is that of the value the module returned even after an
    in-place op (``ReLU(inplace=True)``) rewrote the tensor. ``single``: the output was one tensor.
    ``axis``: where the example axis of the call's tensors lies (1 inside a ``batch_first=False``
    transformer). ``batched``: some input carried example data.
    """

    inputs: tuple
    kwargs: dict
    grads: list = field(default_factory=list)
    edges: list = field(default_factory=list)
    single: bool = True
    axis: int = 0
    batched: bool = True
    expanded: object = None

    @property
    def grad_output(self):
        """The rule's ``grad_output``: a tensor (single-tensor output) or a tuple per tensor leaf."""
        if self.single:
            return self.grads[0] if self.grads else None
        return tuple(self.grads)

    @property
    def reached(self) -> bool:
        return any(g is not None for g in self.grads)


class Tap:
    """Record inputs and output gradients of ``modules`` (qualified name -> module) per call.

    Set ``recording = False`` to make the hooks inert (e.g. while a fallback re-runs a module).
    ``tracker`` (a :class:`~gradstore.capture.uses.UseTracker`, optional) tells the example axis and
    whether an input carries example data.
    """

    def __init__(self, modules: dict[str, nn.Module], tracker=None):
        self.modules = modules
        self.tracker = tracker
        self.uses: dict[str, list[Use]] = {name: [] for name in modules}
        self.recording = True
        #: hooks ignore gradients (the self-check's extra backward passes)
        self.muted = False
        #: called with a module's name and the use when one of its uses receives an output gradient
        self.on_grad = None
        self._handles: list = []

    def __enter__(self) -> Tap:
        for name, module in self.modules.items():
            hook = partial(self._on_forward, name)
            self._handles.append(module.register_forward_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _on_forward(self, name, module, args, kwargs, output):
        if not self.recording:
            return None
        leaves = [output] if isinstance(output, torch.Tensor) else tree_flatten(output)[0]
        leaves = [leaf if isinstance(leaf, torch.Tensor) and leaf.requires_grad else None
                  for leaf in leaves if isinstance(leaf, torch.Tensor)]
        if not any(leaf is not None for leaf in leaves):
            return None
        tracker = self.tracker
        use = Use(detached(tuple(args)), detached(dict(kwargs)), grads=[None] * len(leaves), edges=edges_of(leaves),
                  single=isinstance(output, torch.Tensor),
                  axis=tracker.axis if tracker is not None else 0,
                  batched=tracker.is_data((args, kwargs)) if tracker is not None else True)
        self.uses[name].append(use)
        # A tensor hook registered now sees the gradient w.r.t. this value even if a later
        # in-place op (e.g. ReLU(inplace=True)) rewrites the tensor.
        for i, leaf in enumerate(leaves):
            if leaf is not None:
                leaf.register_hook(partial(self._on_grad, name, use, i))
        if tracker is not None and not use.batched and use.single:
            tracker.watch_constant(output, use)
        return None

    def release(self, name: str) -> None:
        """Forget the recorded tensors of module ``name`` (the graph's hooks still hold each Use)."""
        for use in self.uses[name]:
            use.inputs, use.kwargs, use.grads, use.edges = (), {}, [], []
        self.uses[name] = []

    def _on_grad(self, name: str, use: Use, i: int, grad: torch.Tensor) -> None:
        if self.muted or not use.grads:  # muted, or the use was released (nothing needs it)
            return
        use.grads[i] = grad if use.grads[i] is None else use.grads[i] + grad
        if self.on_grad is not None:
            self.on_grad(name, use)


def check_rows(path: str, grad, m: int) -> None:
    """A module rule needs its output gradient's first axis to be the m examples."""
    first = grad if isinstance(grad, torch.Tensor) else next((g for g in grad if g is not None), None)
    if first is not None and (first.dim() == 0 or first.shape[0] != m):
        raise CaptureError(
            f"module {path!r} saw a batch of {first.shape[0] if first.dim() else 0} rows, not the {m} examples; "
            "every layer with parameters needs the example axis first"
        )
