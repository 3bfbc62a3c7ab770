"""Shared harness for the capture tests: a torch.func vmap(grad) oracle and one comparison routine."""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from gradstore.capture import Projection, capture


def ce_loss(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


def sq_loss(outputs, targets):
    return ((outputs - targets) ** 2).flatten(1).sum(1)


def oracle_grads(model, loss_fn, inputs, targets):
    """Parameter name -> (m, *shape) per-example gradients by vmap(grad), model in eval mode."""
    model = copy.deepcopy(model).eval()
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)

    def one(p, y, *xs):
        out = functional_call(model, {**p, **frozen, **buffers}, tuple(x.unsqueeze(0) for x in xs))
        return loss_fn(out, y.unsqueeze(0)).sum()

    with warnings.catch_warnings():  # vmap over attention: "performance drop ... batching rule"
        warnings.filterwarnings("ignore", message="There is a performance drop", category=UserWarning)
        try:
            return vmap(grad(one), in_dims=(None, 0, *[0] * len(inputs)))(params, targets, *inputs)
        except RuntimeError as err:  # torch.func's own limits, e.g. vmap of slow_conv2d's backward at T = 1
            if "contiguous" not in str(err):  # ("grad_weight must be contiguous"): a loop of grad instead
                raise
    rows = [grad(one)(params, targets[i], *(x[i] for x in inputs)) for i in range(targets.shape[0])]
    return {name: torch.stack([row[name] for row in rows]) for name in params}


def rel_err(actual, expected) -> float:
    """||actual - expected|| / ||expected||, the denominator floored for quantities that are 0 in theory
    (e.g. a bias followed by a per-channel normalization), where only rounding noise remains."""
    floor = 1e-6 if expected.dtype == torch.float64 else 1e-2
    actual, expected = actual.double(), expected.double()
    return (actual - expected).norm().item() / max(expected.norm().item(), floor)


def check_all(model, loss_fn, inputs, targets, *, rtol, k=4, seed=0):
    """Every quantity of one capture against the oracle; returns the capture result."""
    ref = oracle_grads(model, loss_fn, inputs, targets)
    gen = torch.Generator().manual_seed(seed)
    coords = {n: torch.randint(0, g[0].numel(), (3,), generator=gen) for n, g in ref.items()}
    proj = Projection(k, seed=seed)
    res = capture(model, loss_fn, inputs, targets, coords=coords, projection=proj, gram=True,
                  dot_with="sum", grad_sum=True, grads=True, verify=True)  # the engine's self-check on too
    assert set(res.sq_norms) == set(ref)
    for name, g in ref.items():
        m = g.shape[0]
        flat = g.reshape(m, -1)
        u, v = proj.matrices(name, g.shape[1:], device=g.device, dtype=g.dtype)
        p = (u[:, :, None] * v[:, None, :]).reshape(k, -1)
        total = flat.sum(0)
        expected = {
            "sq_norms": (flat * flat).sum(1),
            "coords": flat[:, coords[name]],
            "proj": flat @ p.T,
            "gram": flat @ flat.T,
            "dots": flat @ total,
            "grad_sum": total,
            "grads": flat,
        }
        for quantity, value in expected.items():
            got = getattr(res, quantity)[name].reshape(value.shape)
            assert got.dtype == g.dtype, (name, quantity)
            err = rel_err(got, value)
            assert err <= rtol, f"{name} {quantity}: relative error {err:.2e} > {rtol}"
    return res


def double_model(model):
    return copy.deepcopy(model).double()
