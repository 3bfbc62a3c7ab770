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

``nn.Conv3d`` is the same with three spatial dims (patches by ``Tensor.unfold``, as ``F.unfold``
is 2-d only). ``nn.ConvTranspose1d/2d/3d`` computes y = conv_transpose(x, W), the adjoint of a
convolution, so its weight gradient is a convolution's with the roles swapped: the output gradient
b (zero-padded by ``padding``, cropped of ``output_padding``) is the convolution's input and the
layer input x its output gradient, with the same kernel, stride, dilation and groups; W is
(c_in, c_out / h, *k), i.e. r = input channel within the group, c = (output channel within the
group, kernel offsets). The same two forms apply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gradstore.capture.factors import Dense, Outer
from gradstore.capture.registry import register_rule
from gradstore.errors import CaptureError

#: "auto" picks per call; "outer" or "dense" force one form (tests exercise both).
FORM = "auto"


@dataclass(frozen=True)
class Geometry:
    """What the weight-gradient computation needs of a convolution: y = conv(x, W), W (o, c_in/h, *k)."""

    kernel_size: tuple
    stride: tuple
    dilation: tuple
    out_channels: int
    groups: int
    weight_shape: tuple

    @classmethod
    def of(cls, module) -> Geometry:
        return cls(tuple(module.kernel_size), tuple(module.stride), tuple(module.dilation), module.out_channels,
                   module.groups, tuple(module.weight.shape))

    @property
    def row_size(self) -> int:
        """c: the elements of one output channel's weights, ``weight[o].numel()``."""
        return math.prod(self.weight_shape[1:])


def _padded(module, x):
    pad = module._reversed_padding_repeated_twice
    if any(pad):
        x = F.pad(x, pad, mode="constant" if module.padding_mode == "zeros" else module.padding_mode)
    return x


def _patches(geo, x):
    """Unfolded input patches (n, c_in * k, t) of the padded input ``x``."""
    kernel, stride, dilation = geo.kernel_size, geo.stride, geo.dilation
    if len(kernel) == 3:  # F.unfold is 2-d only: windows of each spatial dim, every dilation-th
        for dim, (k, s, d) in enumerate(zip(kernel, stride, dilation)):
            x = x.unfold(2 + dim, (k - 1) * d + 1, s)
        x = x[..., :: dilation[0], :: dilation[1], :: dilation[2]]  # (n, c, t0, t1, t2, k0, k1, k2)
        n, c = x.shape[:2]
        return x.permute(0, 1, 5, 6, 7, 2, 3, 4).reshape(n, c * math.prod(kernel), -1)
    if len(kernel) == 1:
        x = x.unsqueeze(2)
        kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
    return F.unfold(x, kernel, dilation=dilation, stride=stride)


def _outer(geo, x, b, groups):
    """Outer factor from unfolded patches a (n, t, h, c) and b (n, t, h, r)."""
    n = x.shape[0]
    a = _patches(geo, x).transpose(1, 2)  # (n, t, c_in * k)
    left = b.reshape(n, geo.out_channels, -1).transpose(1, 2).reshape(n, -1, groups, geo.out_channels // groups)
    return Outer(left, a.reshape(n, a.shape[1], groups, -1), geo.weight_shape)


#: The dense form works on blocks of examples whose temporaries (input, output gradient, patches,
#: result) hold at most this many elements: they are reused by the allocator instead of being
#: mapped and zero-filled afresh (measured: 1.10× -> 1.03× for cnn-bn on 2 cores).
DENSE_BLOCK_ELEMENTS = 1 << 22

#: Per-example products g_n = b_n a_n^T with both sides at least this wide go to a batched matrix
#: product over unfolded patches; narrower ones (a first layer: one input channel) to a grouped
#: convolution, which does not unfold. Measured on 2 cores, cnn-bn, m = 4000: conv2 (r = 32,
#: c = 144) 191 ms by matmul vs 292 ms by grouped convolution; conv1 (r = 16, c = 9) 84 vs 30 ms.
MATMUL_MIN_WIDTH = 16


def _dense(geo, x, b, groups):
    """Per-example weight gradients (n, o, c_in/h, *k); on the CPU by blocks of examples.

    Blocks and the matmul method serve the CPU (its allocator, its small-matrix products); on a GPU
    one grouped convolution over all examples is fastest (cuDNN; measured on an H100, cnn-bn,
    m = 4000: 0.7× of a plain forward+backward, against 2.6× by blocked matmuls).
    """
    n = x.shape[0]
    if x.device.type != "cpu":
        return Dense(_conv_block(geo, x, b, groups))
    r, c = geo.out_channels // groups, geo.row_size
    by_matmul = min(r, c) >= MATMUL_MIN_WIDTH
    per_example = x[0].numel() + b[0].numel() + math.prod(geo.weight_shape)
    if by_matmul:
        per_example += b[0, 0].numel() * groups * c  # the unfolded patches
    block = _matmul_block if by_matmul else _conv_block
    size = max(1, DENSE_BLOCK_ELEMENTS // per_example)
    if n <= size:
        return Dense(block(geo, x, b, groups))
    g = x.new_empty((n, *geo.weight_shape))
    for start in range(0, n, size):
        rows = slice(start, min(n, start + size))
        g[rows] = block(geo, x[rows], b[rows], groups)
    return Dense(g)


def _matmul_block(geo, x, b, groups):
    """(n, o, c_in/h, *k) = b_n (h, r, t) @ a_n (h, t, c) per example: one batched matrix product."""
    n = x.shape[0]
    a = _patches(geo, x)  # (n, c_in * k, t) = (n, h * c, t)
    a = a.reshape(n, groups, -1, a.shape[-1]).transpose(2, 3)  # (n, h, t, c)
    left = b.reshape(n, groups, geo.out_channels // groups, -1)  # (n, h, r, t)
    return torch.matmul(left, a).reshape(n, *geo.weight_shape)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _conv_block(geo, x, b, groups):
    """(n, o, c_in/h, *k) by one grouped convolution: examples (and groups) as channels."""
    n, c_in, dims = x.shape[0], x.shape[1], len(geo.kernel_size)
    spatial = x.shape[2:]
    xin = x.reshape(n, groups, c_in // groups, *spatial).movedim(2, 0).reshape(c_in // groups, n * groups, *spatial)
    w = b.reshape(n * geo.out_channels, 1, *b.shape[2:])
    out = _CONV[dims](xin, w, stride=geo.dilation, dilation=geo.stride, groups=n * groups)
    out = out[(..., *[slice(0, k) for k in geo.kernel_size])]  # drop locations past the kernel
    return out.reshape(c_in // groups, n, geo.out_channels, *geo.kernel_size).movedim(0, 2)


def _weight_factor(geo, x, b):
    """The weight's factor, in the cheaper form, from the padded input x and output gradient b."""
    groups = geo.groups
    t = b[0, 0].numel()
    r, c = geo.out_channels // groups, geo.row_size
    form = FORM if FORM != "auto" else ("outer" if t * (r + c) < r * c else "dense")
    return (_outer if form == "outer" else _dense)(geo, x, b, groups)


def _batched(module, x):
    if x.dim() != len(module.kernel_size) + 2:
        raise CaptureError(
            f"{type(module).__name__} input of shape {tuple(x.shape)} has no example axis; "
            "capture needs batched inputs (examples first)"
        )


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv_rule(module, inputs, grad_output):
    """Factors of ``weight`` (Outer or Dense, see the module docstring) and ``bias`` (Dense)."""
    x = inputs[0]
    _batched(module, x)
    n = x.shape[0]
    factors = {"weight": _weight_factor(Geometry.of(module), _padded(module, x), grad_output)}
    if module.bias is not None:
        factors["bias"] = Dense(grad_output.reshape(n, module.out_channels, -1).sum(2))
    return factors


@register_rule(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def conv_transpose_rule(module, inputs, grad_output):
    """Factors of ``weight`` (a convolution's, roles swapped: see the module docstring) and ``bias``."""
    x = inputs[0]
    _batched(module, x)
    n = x.shape[0]
    if module.padding_mode != "zeros":
        raise CaptureError(f"{type(module).__name__} supports only padding_mode='zeros', got {module.padding_mode!r}")
    # the convolution whose adjoint this layer is: input b (c_out channels), output x (c_in channels)
    geo = Geometry(tuple(module.kernel_size), tuple(module.stride), tuple(module.dilation), module.in_channels,
                   module.groups, tuple(module.weight.shape))
    b = grad_output
    pad = [p for p in reversed(module.padding) for _ in range(2)]
    if any(pad):
        b = F.pad(b, pad)
    # crop what output_padding (or output_size) added: exactly the span the windows of x cover
    need = [(size - 1) * s + (k - 1) * d + 1
            for size, k, s, d in zip(x.shape[2:], module.kernel_size, module.stride, module.dilation)]
    b = b[(..., *[slice(0, size) for size in need])]
    factors = {"weight": _weight_factor(geo, b, x)}
    if module.bias is not None:
        factors["bias"] = Dense(grad_output.reshape(n, module.out_channels, -1).sum(2))
    return factors
