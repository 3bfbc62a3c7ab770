"""Operation-level rules: factors of a parameter consumed by one torch operation, wherever it runs.

Module rules (:mod:`gradstore.capture.registry`) see a module's inputs and output gradient. A
parameter can also be consumed outside its own module's ``forward``: functional weight tying
(``h @ self.emb.weight.T``, ``F.linear(h, self.emb.weight)``), ``in_proj_weight`` and
``out_proj.weight`` inside ``F.multi_head_attention_forward``, ``torch.addmm`` inside Hugging Face's
``Conv1D``. The capture forward records each such operation (:mod:`gradstore.capture.uses`) and an
**op rule** turns its inputs and output gradient into factors, one rule serving every module that
calls the operation.

An op rule is ``rule(call) -> dict[str, Factor]``: ``call`` is an :class:`OpCall` (the operation's
arguments bound to their names, the output gradient, the example layout); the dict maps argument
names (``"weight"``) to factors shaped like that argument (the engine maps a view of a parameter,
``weight.T`` or a row block ``weight[:E]``, back to the parameter). An argument the rule does not
return, or a call the rule declines (``None``), goes to the exact torch.func fallback for that
operation (:func:`gradstore.capture.fallback.op_fallback`).

Example layout: tensors an operation sees carry the examples on their first axis, or -- inside
``F.multi_head_attention_forward`` and in modules with ``batch_first=False`` -- on their second
(``(L, N, E)``); a first axis of k·m rows is read as examples-major (``x.view(-1, d)`` of a
``(m, T, d)`` tensor, as Hugging Face's ``Conv1D`` does). Anything else is refused.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gradstore.capture.factors import Dense, OneHot, Outer
from gradstore.errors import CaptureError


@dataclass(frozen=True)
class Layout:
    """Where the example axis of the tensors an operation sees lies: ``axis`` 0 or 1, m examples."""

    m: int
    axis: int = 0


def example_first(x: torch.Tensor, layout: Layout, features: int = 1, *, what: str = "a tensor") -> torch.Tensor:
    """``x`` viewed as (m, t, *features): examples first, every other leading axis flattened into t.

    ``features`` trailing axes are kept. Raises CaptureError when no example axis can be found.
    """
    m = layout.m
    lead = x.shape[: x.dim() - features]
    rest = x.shape[x.dim() - features:]
    if len(lead) == 0:
        raise CaptureError(f"{what} of shape {tuple(x.shape)} has no example axis")
    if layout.axis == 1 and len(lead) >= 2 and lead[1] == m:
        x = x.movedim(1, 0)
    elif layout.axis == 1 and len(lead) == 1 and lead[0] % m == 0:  # (L*N, ...) rows, l-major
        x = x.reshape(-1, m, *rest).movedim(1, 0)
    elif lead[0] == m:
        pass
    elif len(lead) == 1 and lead[0] % m == 0 and lead[0] > m:  # (m*T, ...) rows, example-major
        x = x.reshape(m, -1, *rest)
    else:
        raise CaptureError(f"{what} of shape {tuple(x.shape)} has no axis of the {m} examples")
    return x.reshape(m, -1, *rest)


@dataclass
class OpCall:
    """One recorded call of an operation: bound arguments, the output gradient, the example layout.

    ``args`` maps argument names to values (tensors detached); ``params`` is the set of argument
    names that are (views of) captured parameters; ``grad`` is the gradient of the summed loss
    with respect to the output (a tuple for several tensor outputs).
    """

    name: str
    args: dict
    params: frozenset
    grad: object
    layout: Layout

    @property
    def m(self) -> int:
        return self.layout.m


OpRule = Callable  # (OpCall) -> dict[str, Factor] | None


@dataclass(frozen=True)
class _Entry:
    rule: OpRule
    names: tuple  # argument names of the operation, in positional order
    swap: bool = False  # Tensor.__rmatmul__: self is the second operand


_OP_RULES: dict = {}


def register_op_rule(*funcs, names: tuple, overwrite: bool = False, swap: bool = False):
    """Decorator registering ``rule`` for each operation in ``funcs`` (``F.linear``, ``torch.addmm``).

    ``names`` are the operation's argument names in positional order (the call is bound to them).
    """

    def decorate(rule):
        for func in funcs:
            if func in _OP_RULES and not overwrite:
                raise CaptureError(f"an op rule is already registered for {func!r}; pass overwrite=True")
            _OP_RULES[func] = _Entry(rule, tuple(names), swap)
        return rule

    return decorate


def lookup_op_rule(func):
    """The registered entry for ``func`` (rule, argument names), or None."""
    return _OP_RULES.get(func)


def registered_ops() -> tuple:
    return tuple(_OP_RULES)


def bind(func, names: tuple, args: tuple, kwargs: dict, swap: bool = False) -> dict:
    """The operation's arguments by name (positional ones in ``names`` order, then keywords)."""
    if swap:
        args = (args[1], args[0], *args[2:])
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def op_name(func) -> str:
    from torch.overrides import resolve_name

    name = resolve_name(func) or getattr(func, "__qualname__", None) or repr(func)
    if name.startswith("torch.nn.functional."):
        name = "F." + name[len("torch.nn.functional."):]
    if name.endswith(".__get__"):
        name = name[: -len(".__get__")]
    return name


# ---- the built-in op rules ---------------------------------------------------------------------
# Index letters: n = example, t = position (all other leading axes), i = input feature,
# o = output feature, v = vocabulary row, d = embedding feature.


@register_op_rule(F.linear, names=("input", "weight", "bias"))
def linear_op(call: OpCall):
    """y = x W^T + b: weight g_n = sum_t b_t ⊗ x_t (Outer), bias g_n = sum_t b_t."""
    if "input" in call.params:
        return None
    weight = call.args["weight"]
    if weight.dim() != 2:
        return None
    b = example_first(call.grad, call.layout, what="F.linear's output gradient")  # (n, t, o)
    out = {}
    if "weight" in call.params:
        x = example_first(call.args["input"], call.layout, what="F.linear's input")  # (n, t, i)
        out["weight"] = Outer(b[:, :, None, :], x[:, :, None, :], tuple(weight.shape))
    if "bias" in call.params and call.args.get("bias") is not None and call.args["bias"].dim() == 1:
        out["bias"] = Dense(b.sum(1))
    return out


def _matmul(call: OpCall):
    """y = a @ w with a 2-d parameter w (k, o) on the right: g_n = sum_t a_t ⊗ b_t in w's layout
    (Outer L = a, R = b); w @ x with the parameter on the left: g_n = sum_s b_s ⊗ x_s."""
    a, w = call.args["input"], call.args["other"]
    if "input" in call.params and "other" not in call.params and a.dim() == 2 and w.dim() >= 3:
        # w (k, o) on the left of x (n, o, s): y = W x, (n, k, s); g_n = sum_s b[:, s] ⊗ x[:, s]
        b = example_first(call.grad.transpose(-1, -2), call.layout, what="matmul's output gradient")
        x = example_first(w.transpose(-1, -2), call.layout, what="matmul's input")
        return {"input": Outer(b[:, :, None, :], x[:, :, None, :], tuple(a.shape))}
    if "other" in call.params and "input" not in call.params and w.dim() == 2 and a.dim() >= 2:
        x = example_first(a, call.layout, what="matmul's input")  # (n, t, k)
        b = example_first(call.grad, call.layout, what="matmul's output gradient")  # (n, t, o)
        return {"other": Outer(x[:, :, None, :], b[:, :, None, :], tuple(w.shape))}
    return None


register_op_rule(torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm,
                 names=("input", "other"))(_matmul)
register_op_rule(torch.Tensor.__rmatmul__, names=("input", "other"), swap=True)(_matmul)


@register_op_rule(torch.addmm, torch.Tensor.addmm, names=("input", "mat1", "mat2"))
def addmm_op(call: OpCall):
    """y = input + mat1 @ mat2 (beta = alpha = 1; Hugging Face ``Conv1D``): mat2 (i, o) g_n =
    sum_t x_t ⊗ b_t (Outer), input (o,) g_n = sum_t b_t."""
    if call.args.get("beta", 1) != 1 or call.args.get("alpha", 1) != 1 or "mat1" in call.params:
        return None
    out = {}
    b = example_first(call.grad, call.layout, what="addmm's output gradient")
    if "mat2" in call.params:
        x = example_first(call.args["mat1"], call.layout, what="addmm's input")
        out["mat2"] = Outer(x[:, :, None, :], b[:, :, None, :], tuple(call.args["mat2"].shape))
    if "input" in call.params and call.args["input"].dim() == 1:
        out["input"] = Dense(b.sum(1))
    return out


@register_op_rule(F.embedding, names=("input", "weight", "padding_idx", "max_norm", "norm_type",
                                      "scale_grad_by_freq", "sparse"))
def embedding_op(call: OpCall):
    """Rows looked up by index: weight g_n[v] = sum_t [x_t = v] b_t (Outer with a OneHot side)."""
    if "weight" not in call.params or "input" in call.params or call.args.get("scale_grad_by_freq"):
        return None
    idx, weight = call.args["input"], call.args["weight"]
    index = example_first(idx, call.layout, features=0, what="F.embedding's index")  # (n, t)
    b = example_first(call.grad, call.layout, what="F.embedding's output gradient")  # (n, t, d)
    padding = call.args.get("padding_idx")
    if padding is not None:
        if padding < 0:
            padding += weight.shape[0]
        b = b * (index != padding)[..., None].to(b.dtype)
    return {"weight": Outer(OneHot(index, weight.shape[0]), b[:, :, None, :], tuple(weight.shape))}


def broadcast_op(call: OpCall):
    """A parameter tiled over the examples: ``bias_k.repeat(1, N, 1)`` inside
    ``F.multi_head_attention_forward`` (``add_bias_kv``), a class token ``cls.expand(N, -1, -1)``.
    g_n = the output gradient's slice of example n, summed over the axes where the parameter has
    size 1 and the output more (Dense). Declined (so the fallback takes it) where an axis of size
    > 1 is tiled, or the output has no example axis the parameter is broadcast along."""
    param, grad = call.args["input"], call.grad
    if "input" not in call.params or not isinstance(grad, torch.Tensor):
        return None
    axis = call.layout.axis
    shape = (1,) * (grad.dim() - param.dim()) + tuple(param.shape)
    if len(shape) != grad.dim() or axis >= grad.dim() or grad.shape[axis] != call.m or shape[axis] != 1:
        return None
    tiled = [k for k, (p, g) in enumerate(zip(shape, grad.shape)) if k != axis and p != g]
    if any(shape[k] != 1 for k in tiled):
        return None
    g = grad.sum(tiled, keepdim=True) if tiled else grad
    return {"input": Dense(g.movedim(axis, 0).reshape(call.m, *param.shape))}


register_op_rule(torch.Tensor.repeat, torch.Tensor.expand, names=("input",))(broadcast_op)


def signature_names(func) -> tuple | None:
    """Positional argument names of a Python-level function (None for builtins)."""
    try:
        return tuple(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return None
