"""torch.func fallback for modules with parameters and no registered rule.

Per-example gradients of the module's own parameters are ``vmap(grad(<b_n, f(θ, x_n)>))`` over
examples n, from the recorded input x and output gradient b of each use (Dense factors). The
module must treat examples independently along the first axis of its tensor inputs.
"""

from __future__ import annotations

import warnings

import torch
from torch.func import functional_call, grad, vmap

from gradstore.capture.factors import Dense
from gradstore.errors import CaptureError


class CaptureFallbackWarning(UserWarning):
    """A module is captured by the slow torch.func fallback (no rule registered for its type)."""


_WARNED: set[tuple[str, str]] = set()


def warn_fallback(path: str, module) -> None:
    """Warn once per process for each (module path, type) captured by the fallback."""
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


def fallback_rule(module, params: dict[str, torch.Tensor], use) -> dict[str, Dense]:
    """Dense factors of ``params`` (local name -> tensor) for one recorded ``use`` of ``module``."""
    b = use.grad_output
    n = b.shape[0]
    in_dims = tuple(0 if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == n else None for x in use.inputs)
    kwargs = use.kwargs

    def contracted(theta, b_n, *xs):
        args = tuple(x.unsqueeze(0) if d == 0 else x for x, d in zip(xs, in_dims))
        return (functional_call(module, theta, args, kwargs) * b_n.unsqueeze(0)).sum()

    theta = {name: p.detach() for name, p in params.items()}
    try:
        grads = vmap(grad(contracted), in_dims=(None, 0, *in_dims))(theta, b, *use.inputs)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise CaptureError(
            f"the torch.func fallback failed on {type(module).__qualname__} ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0]}); register a rule with gradstore.capture.register_rule"
        ) from exc
    return {name: Dense(g) for name, g in grads.items()}
