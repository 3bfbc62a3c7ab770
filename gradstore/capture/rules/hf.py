"""Hugging Face transformers' ``Conv1D`` (GPT, GPT-2): y = x W + b with W of shape (in, out).

Index letters: n = example, t = position (all dims between the first and the last, flattened),
i = input feature, o = output feature. With layer input a (n,t,i) and output gradient b (n,t,o):
weight g_n[i, o] = sum_t a[n,t,i] b[n,t,o] (Outer: L = a, R = b -- nn.Linear's factor with the sides
swapped, as the weight is stored transposed); bias g_n[o] = sum_t b[n,t,o] (Dense).

Importing this module imports ``transformers.pytorch_utils``; the registry imports it only once
transformers is imported (``register_lazy`` in :mod:`gradstore.capture.rules`).
"""

from __future__ import annotations

from transformers.pytorch_utils import Conv1D

from gradstore.capture.factors import Dense, Outer
from gradstore.capture.registry import register_rule


@register_rule(Conv1D)
def hf_conv1d_rule(module, inputs, grad_output):
    """Factors of ``weight`` (Outer: L = a, R = b) and ``bias`` (Dense: sum_t b)."""
    n = grad_output.shape[0]
    n_in, n_out = module.weight.shape
    a = inputs[0].reshape(n, -1, 1, n_in)
    b = grad_output.reshape(n, -1, 1, n_out)
    factors = {"weight": Outer(a, b, (n_in, n_out))}
    if module.bias is not None:
        factors["bias"] = Dense(b[:, 0, 0] if b.shape[1] == 1 else b.sum(1)[:, 0])
    return factors
