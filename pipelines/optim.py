"""Optimizers that suppress weak gradient directions, as reusable ``torch.optim`` optimizers.

=================  ==========================================================================
``WinsorizedSGD``  Coherent Gradients §3: per coordinate, the c smallest and c largest
                   per-example gradients are replaced by the (c+1)-th smallest / largest,
                   then averaged (per-example gradients from :mod:`gradstore.capture`).
``M3``             Weak and Strong Gradient Directions: the minibatch split into 3 groups,
                   coordinate-wise median of the 3 group-mean gradients.
``RM3``            coordinate-wise median of the current and previous two minibatch gradients;
                   no update on the first two steps.
``RA3``            mean of the current and previous two minibatch gradients (the staleness
                   control of RM3), same schedule.
=================  ==========================================================================

All four take a plain SGD step ``θ ← θ − lr · d`` along their direction ``d``.

``RM3`` and ``RA3`` read ``p.grad`` like any optimizer. ``WinsorizedSGD`` and ``M3`` need more than
the mean gradient, so they compute it themselves: call ``opt.batch_gradient(model, loss_fn, inputs,
targets)`` (``loss_fn`` returns per-example losses, ``reduction='none'``) instead of
``loss.backward()``, then ``opt.step()``. They say so with the class attribute ``needs_batch = True``,
which :func:`pipelines.train.train` checks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from gradstore.errors import GradstoreError

__all__ = ["M3", "RA3", "RM3", "WinsorizedSGD", "median_of_three", "winsorized_mean"]


def _check_lr(lr: float) -> float:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
        raise GradstoreError(f"learning rate must be a positive finite number, got {lr!r}")
    return float(lr)


def median_of_three(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Elementwise median of three tensors (= a + b + c − min − max, computed without rounding)."""
    return torch.maximum(torch.minimum(a, b), torch.minimum(torch.maximum(a, b), c))


def winsorized_mean(values: torch.Tensor, c: int, dim: int = 0) -> torch.Tensor:
    """Mean along ``dim`` after replacing the c smallest and c largest values by their neighbours.

    Per position, the c smallest values become the (c+1)-th smallest and the c largest become the
    (c+1)-th largest; c = 0 is the plain mean. Needs ``2c + 1 <= values.shape[dim]``.
    """
    m = values.shape[dim]
    if c < 0 or 2 * c + 1 > m:
        raise GradstoreError(f"winsorizing c={c} values at each end needs at least {2 * c + 1} rows, got {m}")
    if c == 0:
        return values.mean(dim)
    # topk of c + 1 per column is much faster than kthvalue or a full sort for small c
    low = values.topk(c + 1, dim=dim, largest=False).values.narrow(dim, c, 1)
    high = values.topk(c + 1, dim=dim, largest=True).values.narrow(dim, c, 1)
    return torch.clamp(values, low, high).mean(dim)


class _OwnGradient(torch.optim.Optimizer):
    """An SGD step along a direction the optimizer computes from the minibatch itself."""

    needs_batch = True

    def __init__(self, params, defaults):
        super().__init__(params, defaults)
        self._ready = False

    def _named(self, model: nn.Module) -> list[tuple[str, torch.Tensor]]:
        """The optimizer's parameters that take part, named as in ``model.named_parameters()``."""
        names = {id(p): n for n, p in model.named_parameters()}
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) not in names:
                    raise GradstoreError("the optimizer holds a parameter that is not one of the model's; "
                                         "build it with model.parameters() of the model passed to batch_gradient")
                if p.requires_grad:
                    out.append((names[id(p)], p))
        return out

    def batch_gradient(self, model: nn.Module, loss_fn: Callable, inputs: torch.Tensor, targets) -> torch.Tensor:
        """Set ``p.grad`` to this optimizer's direction on the minibatch; return the mean loss (detached)."""
        named = self._named(model)
        directions, loss = self._directions(model, loss_fn, inputs, targets, [n for n, _ in named])
        for name, p in named:
            p.grad = directions[name].detach().to(p.dtype)
        self._ready = True
        return loss

    def _directions(self, model, loss_fn, inputs, targets, names):
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        """Move each parameter by −lr times the direction set by :meth:`batch_gradient`."""
        if closure is not None:
            raise GradstoreError(f"{type(self).__name__}.step takes no closure; call batch_gradient(...) first")
        if not self._ready:
            raise GradstoreError(f"{type(self).__name__} computes its own gradient: call "
                                 "batch_gradient(model, loss_fn, inputs, targets) before each step()")
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])
        self._ready = False


class WinsorizedSGD(_OwnGradient):
    """SGD along the coordinate-wise winsorized mean of the minibatch's per-example gradients.

    Parameters
    ----------
    params : iterable of Tensor
        ``model.parameters()`` of the model later passed to :meth:`batch_gradient`.
    lr : float
        Learning rate (> 0).
    c : int
        Values replaced at each end per coordinate (>= 0); c = 0 is SGD on the mean loss. The
        minibatch needs at least 2c + 1 examples.

    Notes
    -----
    Per-example gradients come from :func:`gradstore.capture.capture` (one forward+backward pass,
    materialized: memory m × #parameters), which runs the model in eval mode (BatchNorm uses its
    running statistics, dropout is off). c = 0 skips the per-example gradients and uses their sum.
    """

    def __init__(self, params: Iterable, lr: float = 0.1, c: int = 0):
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise GradstoreError(f"winsorization c must be an integer >= 0, got {c!r}")
        super().__init__(params, {"lr": _check_lr(lr), "c": c})

    def _directions(self, model, loss_fn, inputs, targets, names):
        from gradstore.capture import capture

        c = self.param_groups[0]["c"]
        if any(g["c"] != c for g in self.param_groups):
            raise GradstoreError("WinsorizedSGD takes one c for all parameter groups; give the same c to each group")
        res = capture(model, loss_fn, inputs, targets, sq_norms=False, grad_sum=(c == 0), grads=(c > 0))
        if c == 0:
            return {n: res.grad_sum[n] / res.m for n in names}, res.losses.mean()
        if 2 * c + 1 > res.m:
            raise GradstoreError(f"winsorization c={c} needs minibatches of at least {2 * c + 1} examples, got {res.m}")
        return {n: winsorized_mean(res.grads[n], c) for n in names}, res.losses.mean()


class M3(_OwnGradient):
    """SGD along the coordinate-wise median of the mean gradients of 3 groups of the minibatch.

    The minibatch is split in order into 3 groups as equal as possible (``torch.tensor_split``);
    each group's mean gradient comes from an ordinary forward+backward pass with the model in its
    current mode. Needs at least 3 examples.
    """

    def __init__(self, params: Iterable, lr: float = 0.1):
        super().__init__(params, {"lr": _check_lr(lr)})

    def _directions(self, model, loss_fn, inputs, targets, names):
        m = len(inputs)
        if m < 3:
            raise GradstoreError(f"M3 splits the minibatch into 3 groups and needs >= 3 examples, got {m}")
        params = dict(model.named_parameters())
        chosen = [params[n] for n in names]
        means, total = [], 0.0
        for idx in torch.tensor_split(torch.arange(m, device=inputs.device), 3):
            losses = loss_fn(model(inputs[idx]), targets[idx])
            grads = torch.autograd.grad(losses.mean(), chosen, allow_unused=True)
            means.append([torch.zeros_like(p) if g is None else g for g, p in zip(grads, chosen)])
            total += float(losses.detach().sum())
        out = {n: median_of_three(a, b, c) for n, a, b, c in zip(names, *means)}
        return out, torch.tensor(total / m)


class _LastThree(torch.optim.Optimizer):
    """SGD along a combination of the current and previous two gradients (from the third step on)."""

    def __init__(self, params: Iterable, lr: float = 0.1):
        super().__init__(params, {"lr": _check_lr(lr)})

    @staticmethod
    def _combine(g0, g1, g2):
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        """Update from ``p.grad`` and the two gradients before it; the first two steps only remember."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                seen = state.get("seen", 0)
                g = p.grad.detach().clone()
                if seen >= 2:
                    p.add_(self._combine(g, state["prev_1"], state["prev_2"]), alpha=-group["lr"])
                if seen >= 1:
                    state["prev_2"] = state["prev_1"]
                state["prev_1"] = g
                state["seen"] = seen + 1
        return loss


class RM3(_LastThree):
    """SGD along the coordinate-wise median of the current and previous two minibatch gradients."""

    _combine = staticmethod(median_of_three)


class RA3(_LastThree):
    """SGD along the mean of the current and previous two minibatch gradients (RM3's staleness control)."""

    @staticmethod
    def _combine(g0, g1, g2):
        return (g0 + g1 + g2) / 3
