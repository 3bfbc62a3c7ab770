"""``nn.Linear``: g_n = sum_t b_{n,t} ⊗ a_{n,t}.

Index letters: n = example, t = position (all dims between the first and the last, flattened;
t = 1 for a plain (n, i) input), i = input feature, o = output feature. With layer input a (n,t,i)
and output gradient b (n,t,o): weight g_n[o, i] = sum_t b[n,t,o] a[n,t,i]; bias g_n[o] = sum_t b[n,t,o].
"""

from __future__ import annotations

from torch import nn

from gradstore.capture.factors import Dense, Outer
from gradstore.capture.registry import register_rule


@register_rule(nn.Linear)
def linear_rule(module: nn.Linear, inputs, grad_output):
    """Factors of ``weight`` (Outer: L = b, R = a) and ``bias`` (Dense: sum_t b)."""
    n = grad_output.shape[0]
    a = inputs[0].reshape(n, -1, 1, module.in_features)
    b = grad_output.reshape(n, -1, 1, module.out_features)
    factors = {"weight": Outer(b, a, tuple(module.weight.shape))}
    if module.bias is not None:
        # over the 3-D view: the reduction of a (n, t, 1, o) view is up to 4x slower (measured)
        factors["bias"] = Dense(b[:, 0, 0] if b.shape[1] == 1 else b[:, :, 0].sum(1))
    return factors
