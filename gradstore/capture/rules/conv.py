"""``nn.Conv1d`` / ``nn.Conv2d``: a linear layer applied at every output location.

Index letters: n = example, t = output location (flattened spatial), h = group, r = output channel
within the group, c = (input channel within the group, kernel offsets) -- the order of
``weight[o].flatten()``. With input patches a (n,t,h,c) and output gradient b (n,t,h,r):
weight g_n[h, r, c] = sum_t b[n,t,h,r] a[n,t,h,c]; bias g_n[o] = sum_t b[n,o,t].

Two forms, whichever is cheaper for the shapes at hand (``FORM = "auto"``):

* ``"outer"`` -- an :class:`Outer` factor over unfolded patches; pairwise (t × s) products then give
  norms and Gram blocks. Cheaper when t·(r + c) < r·c (few locations, many channels).
* ``"dense"`` -- per-example weight gradients materialized, block by block of examples: by a
  batched matrix product b_n a_n^T over unfolded patches when both sides are wide
  (:data:`MATMUL_MIN_WIDTH`), else by one grouped convolution (the input with examples as
  channels, correlated with each example's output gradient: groups = n·h, the original stride and
  dilation swapped), which needs no unfold. Cheaper otherwise, e.g. early conv layers.
"""

from __future__ import annotations

import torch
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


def _patches(module, x):
    """Unfolded input patches (n, c_in * k, t) of the padded input ``x``."""
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    if len(kernel) == 1:
        x = x.unsqueeze(2)
        kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
    return F.unfold(x, kernel, dilation=dilation, stride=stride)


def _outer(module, x, b, groups):
    """Outer factor from unfolded patches a (n, t, h, c) and b (n, t, h, r)."""
    n = x.shape[0]
    a = _patches(module, x).transpose(1, 2)  # (n, t, c_in * k)
    left = b.reshape(n, module.out_channels, -1).transpose(1, 2).reshape(n, -1, groups, module.out_channels // groups)
    return Outer(left, a.reshape(n, a.shape[1], groups, -1), tuple(module.weight.shape))


#: The dense form works on blocks of examples whose temporaries (input, output gradient, patches,
#: result) hold at most this many elements: they are reused by the allocator instead of being
#: mapped and zero-filled afresh (measured: 1.10× -> 1.03× for cnn-bn on 2 cores).
DENSE_BLOCK_ELEMENTS = 1 << 22

#: Per-example products g_n = b_n a_n^T with both sides at least this wide go to a batched matrix
#: product over unfolded patches; narrower ones (a first layer: one input channel) to a grouped
#: convolution, which does not unfold. Measured on 2 cores, cnn-bn, m = 4000: conv2 (r = 32,
#: c = 144) 191 ms by matmul vs 292 ms by grouped convolution; conv1 (r = 16, c = 9) 84 vs 30 ms.
MATMUL_MIN_WIDTH = 16


def _dense(module, x, b, groups):
    """Per-example weight gradients (n, o, c_in/h, *k); on the CPU by blocks of examples.

    Blocks and the matmul method serve the CPU (its allocator, its small-matrix products); on a GPU
    one grouped convolution over all examples is fastest (cuDNN; measured on an H100, cnn-bn,
    m = 4000: 0.7× of a plain forward+backward, against 2.6× by blocked matmuls).
    """
    n = x.shape[0]
    if x.device.type != "cpu":
        return Dense(_conv_block(module, x, b, groups))
    r, c = module.out_channels // groups, module.weight[0].numel()
    by_matmul = min(r, c) >= MATMUL_MIN_WIDTH
    per_example = x[0].numel() + b[0].numel() + module.weight.numel()
    if by_matmul:
        per_example += b[0, 0].numel() * groups * c  # the unfolded patches
    block = _matmul_block if by_matmul else _conv_block
    size = max(1, DENSE_BLOCK_ELEMENTS // per_example)
    if n <= size:
        return Dense(block(module, x, b, groups))
    g = x.new_empty((n, *module.weight.shape))
    for start in range(0, n, size):
        rows = slice(start, min(n, start + size))
        g[rows] = block(module, x[rows], b[rows], groups)
    return Dense(g)


def _matmul_block(module, x, b, groups):
    """(n, o, c_in/h, *k) = b_n (h, r, t) @ a_n (h, t, c) per example: one batched matrix product."""
    n = x.shape[0]
    a = _patches(module, x)  # (n, c_in * k, t) = (n, h * c, t)
    a = a.reshape(n, groups, -1, a.shape[-1]).transpose(2, 3)  # (n, h, t, c)
    left = b.reshape(n, groups, module.out_channels // groups, -1)  # (n, h, r, t)
    return torch.matmul(left, a).reshape(n, *module.weight.shape)


def _conv_block(module, x, b, groups):
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
