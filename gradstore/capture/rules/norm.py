"""Normalization layers: BatchNorm (eval mode), LayerNorm, GroupNorm, InstanceNorm, RMSNorm.

Each is ``y = x̂ * weight + bias`` with x̂ computed without parameters (RMSNorm has no bias), so
with output gradient b:
weight g_n[c] = sum_t x̂[n,c,t] b[n,c,t], bias g_n[c] = sum_t b[n,c,t] (Dense factors).
Index letters: n = example, c = normalized feature or channel, t = every other position.
BatchNorm is exact only in eval mode (running statistics): in training mode its output for one
example depends on the whole batch and per-example gradients are undefined. InstanceNorm is exact
in every mode: it normalizes each example by its own statistics, or (eval mode with
``track_running_stats=True``) by the running ones, never by the batch's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gradstore.capture.factors import Dense
from gradstore.capture.registry import register_rule
from gradstore.errors import CaptureError


def _affine(module, x_hat, grad_output, reduce_dims):
    """Dense weight and bias factors from x̂ and the output gradient; ``x_hat`` must be the rule's own
    fresh tensor: it is multiplied in place (one allocation of the layer's size less per call)."""
    def reduce(x):  # note: tensor.sum(()) would sum every dim
        return x.sum(reduce_dims) if reduce_dims else x

    factors = {}
    if getattr(module, "weight", None) is not None:
        factors["weight"] = Dense(reduce(x_hat.mul_(grad_output)))
    if getattr(module, "bias", None) is not None:
        factors["bias"] = Dense(reduce(grad_output))
    return factors


def _running_stats(module) -> str:
    return (
        f"{type(module).__name__} must use running statistics for per-example gradients "
        "(eval mode with track_running_stats=True); prime them with gradstore.capture.bn_priming"
    )


def _batchnorm_refusal(module):
    """Why a BatchNorm cannot be captured whatever the input (no running statistics), or None."""
    return _running_stats(module) if module.running_mean is None else None


@register_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def batchnorm_rule(module, inputs, grad_output):
    """Dense ``weight``, ``bias``; x̂ = (x - running_mean) / sqrt(running_var + eps), eval mode only.

    Channel axis 1. Without forming x̂: g_n[c] = (sum_t x[n,c,t] b[n,c,t] - mean[c] sum_t b[n,c,t]) / sqrt(var[c] + eps).
    """
    if module.running_mean is None or module.training:
        raise CaptureError(_running_stats(module))
    x = inputs[0]
    n, c = x.shape[0], x.shape[1]
    x, b = x.reshape(n, c, -1), grad_output.reshape(n, c, -1)
    b_sum = b.sum(2)
    factors = {}
    if module.weight is not None:
        xb = torch.einsum("nct,nct->nc", x, b)
        factors["weight"] = Dense((xb - module.running_mean * b_sum) * torch.rsqrt(module.running_var + module.eps))
    if module.bias is not None:
        factors["bias"] = Dense(b_sum)
    return factors


batchnorm_rule.refusal = _batchnorm_refusal


@register_rule(nn.LayerNorm)
def layernorm_rule(module, inputs, grad_output):
    """Dense ``weight``, ``bias``; x̂ = layer_norm(x) over the trailing ``normalized_shape`` dims.

    t = the leading dims."""
    x = inputs[0]
    n = x.shape[0]
    x_hat = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    shape = (n, -1, *module.normalized_shape)
    return _affine(module, x_hat.reshape(shape), grad_output.reshape(shape), (1,))


@register_rule(nn.GroupNorm)
def groupnorm_rule(module, inputs, grad_output):
    """Dense ``weight``, ``bias``; x̂ = group_norm(x) per example.

    Channel axis 1, t = spatial dims."""
    x = inputs[0]
    x_hat = F.group_norm(x, module.num_groups, None, None, module.eps)
    return _affine(module, x_hat, grad_output, tuple(range(2, x.dim())))


@register_rule(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
def instancenorm_rule(module, inputs, grad_output):
    """Dense ``weight``, ``bias``; x̂ = instance_norm(x), per example (or by running stats): any mode.

    Per example and channel over the spatial dims (t); in eval mode with tracked statistics, by the
    running ones."""
    x = inputs[0]
    if x.dim() == module._get_no_batch_dim():
        raise CaptureError(
            f"{type(module).__name__} input of shape {tuple(x.shape)} has no example axis; "
            "capture needs batched inputs (examples first)"
        )
    by_input = module.training or not module.track_running_stats
    # running statistics are read, never updated, here (use_input_stats=True would update them)
    mean, var = (None, None) if by_input else (module.running_mean, module.running_var)
    x_hat = F.instance_norm(x, mean, var, None, None, use_input_stats=by_input, eps=module.eps)
    return _affine(module, x_hat, grad_output, tuple(range(2, x.dim())))


@register_rule(nn.RMSNorm)
def rmsnorm_rule(module, inputs, grad_output):
    """Dense ``weight``; x̂ = x / sqrt(mean(x²) + eps) over the trailing ``normalized_shape`` dims.

    t = the leading dims."""
    x = inputs[0]
    n = x.shape[0]
    x_hat = F.rms_norm(x, module.normalized_shape, None, module.eps)
    shape = (n, -1, *module.normalized_shape)
    return _affine(module, x_hat.reshape(shape), grad_output.reshape(shape), (1,))
