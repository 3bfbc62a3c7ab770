"""Hook lifecycle: record every use of the observed modules during one forward+backward pass.

:class:`Tap` is a context manager owning every hook handle; it stores what it records in its own
``uses`` dict (nothing is attached to modules or parameters) and removes all hooks on exit.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from gradstore.errors import CaptureError


@dataclass
class Use:
    """One call of a module: its (detached) positional inputs, keyword inputs and output gradient.

    ``output`` is the output tensor itself until the backward pass (then dropped) and ``version``
    its version counter when the module returned it: a later in-place op (``ReLU(inplace=True)``)
    bumps the counter, and :attr:`intact` is then False.
    """

    inputs: tuple
    kwargs: dict
    grad_output: torch.Tensor | None = None
    output: torch.Tensor | None = None
    version: int = 0

    @property
    def intact(self) -> bool:
        """The output tensor still holds what the module returned (no in-place op since)."""
        return self.output is not None and self.output._version == self.version


class Tap:
    """Record inputs and output gradients of ``modules`` (qualified name -> module) per use.

    Set ``recording = False`` to make the hooks inert (e.g. while a fallback re-runs a module).
    """

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.uses: dict[str, list[Use]] = {name: [] for name in modules}
        self.recording = True
        #: called with a module's name when one of its uses receives its output gradient
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
        if not isinstance(output, torch.Tensor):
            raise CaptureError(
                f"module {name!r} ({type(module).__name__}) returns {type(output).__name__}, not one "
                "tensor; capture needs a module with parameters to return a single tensor"
            )
        if not output.requires_grad:
            return None
        use = Use(tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args), dict(kwargs),
                  output=output, version=output._version)
        self.uses[name].append(use)
        # A tensor hook registered now sees the gradient w.r.t. this value even if a later
        # in-place op (e.g. ReLU(inplace=True)) rewrites the tensor.
        output.register_hook(partial(self._on_grad, name, use))
        return None

    def release(self, name: str) -> None:
        """Forget the recorded tensors of module ``name`` (the graph's hooks still hold each Use)."""
        for use in self.uses[name]:
            use.inputs, use.kwargs, use.grad_output, use.output = (), {}, None, None
        self.uses[name] = []

    def _on_grad(self, name: str, use: Use, grad: torch.Tensor) -> None:
        use.grad_output = grad if use.grad_output is None else use.grad_output + grad
        if self.on_grad is not None:
            self.on_grad(name)
