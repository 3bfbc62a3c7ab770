"""torch.func fallbacks: exact per-example gradients where no rule applies (Dense factors).

* :func:`fallback_rule` -- a module with parameters and no rule whose parameters are used only
  inside its own forward: ``vmap(grad(<b_n, f(θ, x_n)>))`` over examples n, from the recorded
  inputs x and output gradients b of each call. The module must treat examples independently
  along the example axis of its tensor inputs.
* :func:`op_fallback` -- one recorded operation consuming (a view of) a parameter, with an output
  that carries the example axis: the per-example gradient of that argument is the operation's
  vector-Jacobian product with the output gradient restricted to example n,
  ``g_n = J^T (b ⊙ [example = n])``, vmapped over blocks of examples. Exact whenever examples
  are independent downstream of the operation, whatever the operation mixes upstream.
"""

from __future__ import annotations

import warnings

import torch
from torch.func import functional_call, grad, vjp, vmap

from gradstore.capture.factors import BLOCK_ELEMENTS, Dense
from gradstore._nest import tensor_leaves
from gradstore.errors import CaptureError


class CaptureFallbackWarning(UserWarning):
    """A parameter is captured by a slow torch.func fallback (no rule registered for it)."""


_WARNED: set[tuple[str, str]] = set()


def warn_fallback(path: str, module) -> None:
    """Warn once per process for each (module path, type) captured by the module fallback."""
    key = (path, type(module).__qualname__)
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(
        f"gradstore.capture: no rule for module {path or '<root>'!r} ({type(module).__qualname__}); "
        "using the slower torch.func fallback. Register one with "
        "gradstore.capture.register_rule(" + type(module).__qualname__ + ")",
        CaptureFallbackWarning,
        stacklevel=4,
    )


def warn_op_fallback(param: str, op: str, path: str, module) -> None:
    """Warn once per process for each (parameter, operation) captured by the op fallback."""
    key = (param, op)
    if key in _WARNED:
        return
    _WARNED.add(key)
    kind = type(module).__qualname__
    warnings.warn(
        f"gradstore.capture: no rule for {op} consuming {param!r} (module {path or '<root>'!r}, {kind}); "
        f"using the slower torch.func fallback for that operation. Register a module rule with "
        f"gradstore.capture.register_rule({kind}) or an op rule with gradstore.capture.ops.register_op_rule",
        CaptureFallbackWarning,
        stacklevel=4,
    )


def _in_dims(value, n: int, axis: int):
    if isinstance(value, torch.Tensor):
        return axis if value.dim() > axis and value.shape[axis] == n else None
    if isinstance(value, (tuple, list)) and type(value).__name__ != "PackedSequence":
        return type(value)(_in_dims(v, n, axis) for v in value)
    if isinstance(value, dict):
        return {k: _in_dims(v, n, axis) for k, v in value.items()}
    return None


def _unsqueezed(value, dims, axis: int):
    if isinstance(value, torch.Tensor):
        return value.unsqueeze(axis) if dims is not None else value
    if isinstance(value, (tuple, list)) and type(value).__name__ != "PackedSequence":
        return type(value)(_unsqueezed(v, d, axis) for v, d in zip(value, dims))
    if isinstance(value, dict):
        return {k: _unsqueezed(v, dims[k], axis) for k, v in value.items()}
    return value


def fallback_rule(module, params: dict[str, torch.Tensor], use, m: int) -> dict[str, Dense]:
    """Dense factors of ``params`` (local name -> tensor) for one recorded ``use`` of ``module``."""
    from torch.utils._pytree import tree_flatten

    axis = use.axis
    grads = [(i, g) for i, g in enumerate(use.grads) if g is not None]
    for _, g in grads:
        if g.dim() <= axis or g.shape[axis] != m:
            raise CaptureError(
                f"{type(module).__qualname__} returned a tensor of shape {tuple(g.shape)} without the axis of "
                f"the {m} examples; every layer with parameters needs the example axis first"
            )
    arg_dims = _in_dims(use.inputs, m, axis)
    kw_dims = _in_dims(use.kwargs, m, axis)
    where = [i for i, _ in grads]

    def contracted(theta, bs, args, kwargs):
        args = _unsqueezed(args, arg_dims, axis)
        kwargs = _unsqueezed(kwargs, kw_dims, axis)
        out = functional_call(module, theta, args, kwargs)
        leaves = [leaf for leaf in tree_flatten(out)[0] if isinstance(leaf, torch.Tensor)] \
            if not isinstance(out, torch.Tensor) else [out]
        total = 0
        for i, b in zip(where, bs):
            total = total + (leaves[i] * b.unsqueeze(axis)).sum()
        return total

    theta = {name: p.detach() for name, p in params.items()}
    bs = tuple(g for _, g in grads)
    try:
        out = vmap(grad(contracted), in_dims=(None, axis, arg_dims, kw_dims))(theta, bs, use.inputs, use.kwargs)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise CaptureError(
            f"the torch.func fallback failed on {type(module).__qualname__} ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0]}); register a rule with gradstore.capture.register_rule"
        ) from exc
    return {name: Dense(g) for name, g in out.items()}


def example_axis(shape, m: int, axis: int):
    """The example axis of an output of ``shape`` (the layout's axis, else 0), or None."""
    if len(shape) > axis and shape[axis] == m:
        return axis
    if len(shape) > 0 and shape[0] == m:
        return 0
    return None


def op_fallback(use, fill, m: int, per_example=None) -> dict[int, Dense]:
    """Per-example gradients (m, *view.shape) of each slot of one recorded operation ``use``.

    ``fill(args, kwargs, views)`` rebuilds the call with the slots replaced by ``views``.
    ``per_example``: for a batch-constant use, the (m, *output shape) per-example output
    gradients themselves (then no restriction to one example is needed).
    """
    slots = list(range(len(use.views)))
    if per_example is not None:
        def g(*views):
            args, kwargs = fill(use.args, use.kwargs, views)
            return use.func(*args, **kwargs)

        primals = tuple(use.views[i][1] for i in slots)
        _, pullback = vjp(g, *primals)
        out = vmap(pullback)(per_example)
        return {i: Dense(out[i]) for i in slots}
    grads = [(i, g) for i, g in enumerate(use.grads) if g is not None]
    if not grads:
        return {}
    axes = []
    for _, g in grads:
        ax = example_axis(g.shape, m, use.axis)
        if ax is None:
            raise CaptureError(f"{use.name}'s output of shape {tuple(g.shape)} has no axis of the {m} examples")
        axes.append(ax)
    where = [i for i, _ in grads]

    def f(*views):
        args, kwargs = fill(use.args, use.kwargs, views)
        out = use.func(*args, **kwargs)
        leaves = [out] if isinstance(out, torch.Tensor) else tensor_leaves(out, dicts=False)
        return tuple(leaves[i] for i in where)

    primals = tuple(use.views[i][1] for i in slots)
    try:
        _, pullback = vjp(f, *primals)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise CaptureError(
            f"the torch.func fallback failed on {use.name} ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0]}); register an op rule with gradstore.capture.ops.register_op_rule"
        ) from exc
    per_example = sum(g.numel() for _, g in grads)
    size = max(1, BLOCK_ELEMENTS // max(1, per_example))
    blocks: list = []
    for start in range(0, m, size):
        rows = torch.arange(start, min(m, start + size), device=grads[0][1].device)
        cotangents = []
        for (_, g), ax in zip(grads, axes):
            moved = g.movedim(ax, 0)  # (m, ...)
            cot = moved.new_zeros((len(rows), *moved.shape))
            cot[torch.arange(len(rows)), rows] = moved[rows]
            cotangents.append(cot.movedim(1, ax + 1))
        blocks.append(vmap(pullback)(tuple(cotangents)))
    return {i: Dense(torch.cat([b[i] for b in blocks])) for i in slots}


