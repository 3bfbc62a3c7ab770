"""``nn.Conv1d`` / ``nn.Conv2d``: a linear layer applied at every output location.

Index letters: n = example, t = output location (flattened spatial), h = group, r = output channel
within the group, c = (input channel within the group, kernel offsets) -- the order of
``weight[o].flatten()``. With unfolded input patches a (n,t,h,c) and output gradient b (n,t,h,r):
weight g_n[h, r, c] = sum_t b[n,t,h,r] a[n,t,h,c]; bias g_n[o] = sum_t b[n,o,t].
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from gradstore.capture.factors import Dense, Outer
from gradstore.capture.registry import register_rule
from gradstore.errors import CaptureError


def _patches(module, x):
    """(n, t, c_in * prod(kernel)) input patches, honouring padding mode and 'same'/'valid'."""
    pad = module._reversed_padding_repeated_twice
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    if any(pad):
        x = F.pad(x, pad, mode=mode)
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(2)
        kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
    cols = F.unfold(x, kernel, dilation=dilation, stride=stride)  # (n, c*k, t)
    return cols.transpose(1, 2)


@register_rule(nn.Conv1d, nn.Conv2d)
def conv_rule(module, inputs, grad_output):
    """Factors of ``weight`` (Outer over output locations) and ``bias`` (Dense)."""
    x = inputs[0]
    if x.dim() != len(module.kernel_size) + 2:
        raise CaptureError(
            f"{type(module).__name__} input of shape {tuple(x.shape)} has no example axis; "
            "capture needs batched inputs (examples first)"
        )
    n, groups, out_channels = x.shape[0], module.groups, module.out_channels
    a = _patches(module, x)
    a = a.reshape(n, a.shape[1], groups, -1)
    b = grad_output.reshape(n, out_channels, -1).transpose(1, 2)
    factors = {"weight": Outer(b.reshape(n, -1, groups, out_channels // groups), a, tuple(module.weight.shape))}
    if module.bias is not None:
        factors["bias"] = Dense(b.sum(1))
    return factors
