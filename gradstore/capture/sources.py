"""Where each parameter's per-example factors come from, and the factors themselves.

After the capture forward, every use of a captured parameter is known (:mod:`gradstore.capture.uses`):
calls of modules that own it and have a rule (the Tap's records), and recorded operations. For
each parameter :func:`assign` picks, in this order,

1. module rules for the calls of its rule-owning modules, plus, for every recorded operation,
2. that operation's op rule (:mod:`gradstore.capture.ops`), or the exact torch.func op fallback
   when its output carries the example axis;
3. when an operation has neither, the torch.func fallback of the owning module (no rule), if every
   use of the parameter ran inside that module's forward;

and refuses in one line (the parameter, the operation, where, the fix) otherwise. The factors of
all uses are merged (:func:`gradstore.capture.factors.merge`): exact cross terms between uses.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from gradstore.capture.factors import Dense, OneHot, Outer, merge
from gradstore.capture.fallback import example_axis, fallback_rule, op_fallback, warn_fallback, warn_op_fallback
from gradstore.capture.hooks import check_rows
from gradstore.capture.ops import OpCall, Layout, bind, lookup_op_rule
from gradstore.capture.registry import lookup_rule, wants_kwargs
from gradstore.capture.uses import Slot
from gradstore.errors import CaptureError


@dataclass
class Sources:
    """The uses that make up one parameter's per-example gradient."""

    modules: list = field(default_factory=list)  # (path, local) of rule-owning modules
    ops: list = field(default_factory=list)  # OpUse records consuming it
    fallback: tuple | None = None  # (path, local): the owning module's torch.func fallback


def _constant_ok(use) -> bool:
    exp = use.expanded
    return not use.batched and exp is not None and not exp.escaped


def _op_coverable(use, m: int) -> bool:
    if not use.batched:
        return _constant_ok(use)
    if lookup_op_rule(use.func) is not None:
        return True
    return all(shape is None or example_axis(shape, m, use.axis) is not None for shape in use.shapes)


def assign(pl, tap, tracker, rule_paths: set, m: int) -> dict[str, Sources]:
    """Parameter name -> its :class:`Sources`; raises CaptureError for a use nothing covers."""
    if tracker.nested:
        name, owner, op, child = tracker.nested[0]
        kind = type(pl.modules[owner]).__name__
        raise CaptureError(
            f"parameter {name!r} of {owner!r} ({kind}, which has a capture rule) is used by {op} inside its child "
            f"{child!r}, which the rule does not see; register a rule for {kind} (register_rule(..., overwrite=True)) "
            "that covers its whole forward, or consume the parameter in the module's own forward"
        )
    out = {name: Sources() for name in pl.params}
    for name, owns in pl.owners.items():
        out[name].modules = [(path, local) for path, local in owns if path in rule_paths]
    for use in tracker.uses:
        for name in {n for n, _ in use.views}:
            out[name].ops.append(use)
    for name, src in out.items():
        for path, _ in src.modules:
            for use in tap.uses[path]:
                if not use.batched and not _constant_ok(use):
                    raise CaptureError(_constant_message(name, type(pl.modules[path]).__name__, path, use, m))
        bad = [u for u in src.ops if not _op_coverable(u, m)]
        if not bad:
            continue
        owners = [(p, local) for p, local in pl.owners[name] if p not in rule_paths]
        whole = next(((p, local) for p, local in owners if all(p in u.owners_running for u in src.ops)), None)
        if whole is not None:
            src.ops, src.fallback = [], whole
            continue
        raise CaptureError(_op_message(name, bad[0], pl, m))
    return out


def _fix_for_constant() -> str:
    return ("pass such inputs with the example axis, e.g. position_ids of shape (n, T) "
            "(torch.arange(T).expand(n, T)), or combine the result with example data only by +, - or *")


def _constant_message(name, op, path, use, m) -> str:
    escaped = use.expanded.escaped if use.expanded is not None else []
    how = f"its result is consumed by {escaped[0]}" if escaped else "its result is not combined with the examples"
    return (f"parameter {name!r} is used by {op} ({path or '<root>'!r}) on inputs without the axis of the {m} "
            f"examples and {how}, so its per-example gradients cannot be told apart; {_fix_for_constant()}")


def _op_message(name, use, pl, m) -> str:
    where = ("loss_fn" if use.module is None else "the model's forward" if use.module == ""
             else f"the forward of {use.module!r}")
    path = pl.owner[name][0]
    if not use.batched:
        escaped = use.expanded.escaped if use.expanded is not None else []
        how = f" and its result is consumed by {escaped[0]}" if escaped else ""
        return (f"parameter {name!r} is used by {use.name} in {where} on no example data{how}, so its "
                f"per-example gradients cannot be told apart; compute it from the examples inside the "
                f"forward of its module {path or '<root>'!r}, or {_fix_for_constant()}")
    return (f"parameter {name!r} is used by {use.name} in {where}, whose output has no axis of the {m} examples "
            f"and which has no op rule, outside any rule of its module {path or '<root>'!r}; register an op rule "
            "(gradstore.capture.ops.register_op_rule) or compute it in a module with a rule")


# ---- factors ------------------------------------------------------------------------------------


def _swap01(value, m: int):
    if isinstance(value, torch.Tensor):
        return value.transpose(0, 1) if value.dim() >= 2 and value.shape[1] == m else value
    if isinstance(value, (tuple, list)) and type(value).__name__ != "PackedSequence":
        return type(value)(_swap01(v, m) for v in value)
    if isinstance(value, dict):
        return {k: _swap01(v, m) for k, v in value.items()}
    return value


def _expand_inputs(value, m: int, added: bool):
    """Inputs of a batch-constant use, expanded to m identical examples."""
    if isinstance(value, torch.Tensor):
        if added:
            return value.unsqueeze(0).expand(m, *value.shape)
        return value.expand(m, *value.shape[1:]) if value.dim() and value.shape[0] == 1 else value
    if isinstance(value, (tuple, list)) and type(value).__name__ != "PackedSequence":
        return type(value)(_expand_inputs(v, m, added) for v in value)
    if isinstance(value, dict):
        return {k: _expand_inputs(v, m, added) for k, v in value.items()}
    return value


def _constant_grad(use, m: int):
    """(per-example output gradient, whether an example axis was added) of a batch-constant use."""
    exp = use.expanded
    g = exp.per_example()
    if g is None:
        return None, False
    added = len(g.shape) > len(exp.shape)
    return g, added


def _positional(module, inputs: tuple, kwargs: dict):
    """Keyword arguments that name positional parameters of ``forward`` (``lin(input=x)``) moved into
    ``inputs``, in the signature's order, so a rule sees them positionally."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return inputs, kwargs
    inputs, kwargs = list(inputs), dict(kwargs)
    for param in params[len(inputs):]:
        if param.kind is not param.POSITIONAL_OR_KEYWORD or param.name not in kwargs:
            break
        inputs.append(kwargs.pop(param.name))
    return tuple(inputs), kwargs


def module_factors(path, module, use, m: int) -> dict:
    """Factors of ``module``'s parameters (local name -> factor) from one recorded call by its rule."""
    rule = lookup_rule(type(module))
    inputs, kwargs, grad = use.inputs, use.kwargs, use.grad_output
    if kwargs:
        inputs, kwargs = _positional(module, inputs, kwargs)
    if not use.batched:
        grad, added = _constant_grad(use, m)
        if grad is None:
            return {}
        inputs, kwargs = _expand_inputs(inputs, m, added), _expand_inputs(kwargs, m, added)
    elif use.axis == 1:
        inputs, kwargs, grad = _swap01(inputs, m), _swap01(kwargs, m), _swap01(grad, m)
    if grad is None or (isinstance(grad, tuple) and all(g is None for g in grad)):
        return {}
    if use.single:  # a structured output's layout (an RNN's time-major or packed output) is the rule's
        check_rows(path, grad, m)
    try:
        if wants_kwargs(rule):
            return rule(module, inputs, grad, kwargs)
        return rule(module, inputs, grad)
    except (AttributeError, TypeError) as exc:
        if use.single:
            raise
        raise CaptureError(
            f"module {path!r} ({type(module).__name__}) returns {len(grad)} tensors, not one tensor, and its "
            f"rule failed on the tuple of output gradients ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            f"register a rule for {type(module).__qualname__} that takes one gradient per output tensor"
        ) from exc


def module_fallback_factors(path, module, local, uses, m: int):
    warn_fallback(path, module)
    total = None
    for use in uses:
        if not use.reached:
            continue
        factor = fallback_rule(module, {local: module._parameters[local]}, use, m).get(local)
        if factor is not None:
            total = factor if total is None else merge(total, factor)
    return total


def _fill(args, kwargs, views):
    def put(value):
        if isinstance(value, Slot):
            return views[value.index]
        if isinstance(value, (tuple, list)) and type(value).__name__ != "PackedSequence":
            return type(value)(put(v) for v in value)
        if isinstance(value, dict):
            return {k: put(v) for k, v in value.items()}
        return value

    return put(args), put(kwargs)


def _check_inputs_intact(use) -> None:
    for tensor, version in use.inputs_versions:
        if tensor._version != version:
            raise CaptureError(
                f"an input of {use.name} (which consumes {use.views[0][0]!r}) was modified in place after the "
                "operation, so its recorded value is gone; avoid the in-place op (e.g. ReLU(inplace=True)) there"
            )


def op_factors(use, m: int, params: dict, owners: dict, modules: dict) -> dict[int, object]:
    """Factors in the parameter's layout for each slot of one recorded operation."""
    _check_inputs_intact(use)
    grads = use.grads
    args, kwargs = use.args, use.kwargs
    constant = None
    if not use.batched:
        g, added = _constant_grad(use, m)
        if g is None:
            return {}
        constant = g if added else g.unsqueeze(1)
        grads = [g]
        args, kwargs = _expand_inputs(args, m, added), _expand_inputs(kwargs, m, added)
    if all(g is None for g in grads):
        return {}
    views = [v for _, v in use.views]
    layout = Layout(m, use.axis if use.batched else 0)
    out: dict[int, object] = {}
    entry = lookup_op_rule(use.func)
    if entry is not None:
        bound = bind(use.func, entry.names, args, kwargs, entry.swap)
        slot_of = {k: v.index for k, v in bound.items() if isinstance(v, Slot)}
        filled = {k: (views[v.index] if isinstance(v, Slot) else v) for k, v in bound.items()}
        call = OpCall(use.name, filled, frozenset(slot_of), grads[0] if len(grads) == 1 else tuple(grads), layout)
        got = entry.rule(call) or {}
        for key, factor in got.items():
            out[slot_of[key]] = factor
    missing = [i for i in range(len(views)) if i not in out]
    if missing:
        for i in missing:
            path = owners[use.views[i][0]][0][0]
            warn_op_fallback(use.views[i][0], use.name, path, modules[path])

        class _View:  # the fallback's view of the use, with expanded inputs where needed
            pass

        rec = _View()
        rec.func, rec.args, rec.kwargs, rec.views = use.func, use.args, use.kwargs, use.views
        rec.grads, rec.axis, rec.name = grads, layout.axis, use.name
        dense = op_fallback(rec, _fill, m, per_example=constant)
        for i in missing:
            out[i] = dense[i]
    return {i: to_param(f, views[i], params[use.views[i][0]]) for i, f in out.items()}


# ---- a factor of a view of a parameter -> a factor of the parameter ------------------------------


def to_param(factor, view: torch.Tensor, param: torch.Tensor):
    """The factor of ``param`` whose per-example gradient is ``factor``'s, scattered through the view."""
    offset = view.storage_offset() - param.storage_offset()
    if tuple(view.shape) == tuple(param.shape) and view.stride() == param.stride() and offset == 0:
        return factor
    shape = tuple(param.shape)
    if (param.dim() == 2 and view.dim() == 2 and offset == 0 and tuple(view.shape) == shape[::-1]
            and view.stride() == param.stride()[::-1]):  # view = param.T
        if isinstance(factor, Outer) and not isinstance(factor.left, OneHot) and factor.right.shape[2] == 1:
            return Outer(factor.right, factor.left, shape)
        if isinstance(factor, Dense):
            return Dense(factor.g.transpose(1, 2))
    if (param.is_contiguous() and view.dim() == param.dim() and view.dim() >= 1
            and tuple(view.shape[1:]) == shape[1:] and view.stride() == param.stride()):
        row = param.stride(0)
        start = offset // row if offset % row == 0 else None
        if start is not None and start + view.shape[0] <= shape[0]:  # a block of rows
            rows = shape[0]
            if isinstance(factor, Outer) and param.dim() == 2 and factor.right.shape[2] == 1:
                if isinstance(factor.left, OneHot):
                    return Outer(OneHot(factor.left.index + start, rows), factor.right, shape)
                left = F.pad(factor.left, (start, rows - start - view.shape[0]))
                return Outer(left, factor.right, shape)
            g = factor.materialize()
            full = g.new_zeros((g.shape[0], *shape))
            full[:, start:start + view.shape[0]] = g
            return Dense(full)
    g = factor.materialize()  # any other view: scatter through the view's flat indices
    base = torch.empty_strided(shape, param.stride(), dtype=torch.long, device=g.device)
    base.copy_(torch.arange(param.numel(), device=g.device).view(shape))  # storage slot -> flat index
    index = base.as_strided(view.shape, view.stride(), offset)
    full = g.new_zeros((g.shape[0], param.numel()))
    full.index_add_(1, index.reshape(-1), g.reshape(g.shape[0], -1))
    return Dense(full.reshape(g.shape[0], *shape))
