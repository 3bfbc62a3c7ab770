"""``nn.Conv1d`` / ``nn.Conv2d``: a linear layer applied at every output location.

Index letters: n = example, t = output location (flattened spatial), h = group, r = output channel
within the group, c = (input channel within the group, kernel offsets) -- the order of
``weight[o].flatten()``. With input patches a (n,t,h,c) and output gradient b (n,t,h,r):
weight g_n[h, r, c] = sum_t b[n,t,h,r] a[n,t,h,c]; bias g_n[o] = sum_t b[n,o,t].

Two forms, whichever is cheaper for the shapes at hand (``FORM = "auto"``):

* ``"outer"`` -- an :class:`Outer` factor over unfolded patches; pairwise (t × s) products then give
  norms and Gram blocks. Cheaper when t·(r + c) < r·c (few locations, many channels).
* ``"dense"`` -- per-example weight gradients materialized by one grouped convolution (the input
  with examples as channels, correlated with each example's output gradient: groups = n·h, the
  original stride and dilation swapped), no unfold. Cheaper otherwise, e.g. early conv layers.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from gradstore.capture.factors import Dense, Outer
from gradstore.capture.registry import register_rule
from gradstore.errors import CaptureError

#: "auto" picks per call; "outer" or "dense" force one form (tests exercise both).
FORM = "auto"


def _padded(module, x):
    pad = module._reversed_padding_repeated_twice
    if any(pad):
        x = F.pad(x, pad, mode="constant" if module.padding_mode == "zeros" else module.padding_mode)
    return x


def _outer(module, x, b, groups):
    """Outer factor from unfolded patches a (n, t, h, c) and b (n, t, h, r)."""
    n, dims = x.shape[0], len(module.kernel_size)
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    if dims == 1:
        x = x.unsqueeze(2)
        kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
    a = F.unfold(x, kernel, dilation=dilation, stride=stride).transpose(1, 2)  # (n, t, c_in * k)
    left = b.reshape(n, module.out_channels, -1).transpose(1, 2).reshape(n, -1, groups, module.out_channels // groups)
    return Outer(left, a.reshape(n, a.shape[1], groups, -1), tuple(module.weight.shape))


#: The dense form runs its grouped convolution on blocks of examples whose input, output gradient
#: and result hold at most this many elements: small temporaries are reused by the allocator
#: instead of being mapped and zero-filled afresh (measured: 1.10× -> 1.03× for cnn-bn on 2 cores).
DENSE_BLOCK_ELEMENTS = 1 << 22


def _dense(module, x, b, groups):
    """Per-example weight gradients (n, o, c_in/h, *k), by blocks of examples."""
    n = x.shape[0]
    per_example = x[0].numel() + b[0].numel() + module.weight.numel()
    size = max(1, DENSE_BLOCK_ELEMENTS // per_example)
    if n <= size:
        return Dense(_dense_block(module, x, b, groups))
    g = x.new_empty((n, *module.weight.shape))
    for start in range(0, n, size):
        rows = slice(start, min(n, start + size))
        g[rows] = _dense_block(module, x[rows], b[rows], groups)
    return Dense(g)


def _dense_block(module, x, b, groups):
    """(n, o, c_in/h, *k) by one grouped convolution: examples (and groups) as channels."""
    n, c_in, dims = x.shape[0], x.shape[1], len(module.kernel_size)
    spatial = x.shape[2:]
    xin = x.reshape(n, groups, c_in // groups, *spatial).movedim(2, 0).reshape(c_in // groups, n * groups, *spatial)
    w = b.reshape(n * module.out_channels, 1, *b.shape[2:])
    conv = F.conv1d if dims == 1 else F.conv2d
    out = conv(xin, w, stride=module.dilation, dilation=module.stride, groups=n * groups)
    out = out[(..., *[slice(0, k) for k in module.kernel_size])]  # drop locations past the kernel
    return out.reshape(c_in // groups, n, module.out_channels, *module.kernel_size).movedim(0, 2)


@register_rule(nn.Conv1d, nn.Conv2d)
def conv_rule(module, inputs, grad_output):
    """Factors of ``weight`` (Outer or Dense, see the module docstring) and ``bias`` (Dense)."""
    x = inputs[0]
    if x.dim() != len(module.kernel_size) + 2:
        raise CaptureError(
            f"{type(module).__name__} input of shape {tuple(x.shape)} has no example axis; "
            "capture needs batched inputs (examples first)"
        )
    n, groups = x.shape[0], module.groups
    x = _padded(module, x)
    t = grad_output[0, 0].numel()
    r, c = module.out_channels // groups, module.weight[0].numel()
    form = FORM if FORM != "auto" else ("outer" if t * (r + c) < r * c else "dense")
    factors = {"weight": (_outer if form == "outer" else _dense)(module, x, grad_output, groups)}
    if module.bias is not None:
        factors["bias"] = Dense(grad_output.reshape(n, module.out_channels, -1).sum(2))
    return factors
