"""Helpers of the recording tests: per-example oracles by an explicit loop over examples (autograd)."""

import torch


def loop_sq_norms(model, loss_of_example, n, layers):
    """||g_i||² per layer by one backward pass per example: ``loss_of_example(i)`` is example i's loss.

    ``layers`` maps a layer name to its parameter names; returns a (n, layers) float64 tensor.
    """
    params = dict(model.named_parameters())
    out = torch.zeros(n, len(layers), dtype=torch.float64)
    grads_all = []
    for i in range(n):
        grads = torch.autograd.grad(loss_of_example(i), list(params.values()), allow_unused=True)
        by_name = {k: (torch.zeros_like(p) if g is None else g).double() for (k, p), g in zip(params.items(), grads)}
        grads_all.append(by_name)
        for j, names in enumerate(layers.values()):
            out[i, j] = sum(float((by_name[k] ** 2).sum()) for k in names)
    return out, grads_all


def layer_dots(grads_all, layers):
    """g_i · Σ_j g_j per layer from the per-example gradients of :func:`loop_sq_norms`."""
    n = len(grads_all)
    out = torch.zeros(n, len(layers), dtype=torch.float64)
    for j, names in enumerate(layers.values()):
        flat = torch.stack([torch.cat([g[k].reshape(-1) for k in names]) for g in grads_all])
        out[:, j] = flat @ flat.sum(0)
    return out
