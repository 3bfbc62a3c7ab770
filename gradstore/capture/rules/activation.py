"""``nn.PReLU``: y = max(0, x) + a · min(0, x), a per channel (axis 1) or one for all.

Index letters: n = example, c = channel (axis 1 of the input; the one ``num_parameters`` counts),
t = every other position. With output gradient b: weight g_n[c] = sum_t min(0, x[n,c,t]) b[n,c,t]
(Dense), or with one parameter g_n[0] = sum over all of min(0, x) b.
"""

from __future__ import annotations

from torch import nn

from gradstore.capture.factors import Dense
from gradstore.capture.registry import register_rule
from gradstore.errors import CaptureError


@register_rule(nn.PReLU)
def prelu_rule(module: nn.PReLU, inputs, grad_output):
    """Factor of ``weight``: Dense(sum_t min(0, x) b), per channel or in total."""
    x = inputs[0]
    n = x.shape[0]
    if module.num_parameters > 1 and x.dim() < 2:
        raise CaptureError(
            f"PReLU(num_parameters={module.num_parameters}) input of shape {tuple(x.shape)} has no "
            "example axis before its channel axis; capture needs batched inputs (examples first)"
        )
    contribution = x.clamp(max=0) * grad_output
    if module.num_parameters == 1:
        return {"weight": Dense(contribution.reshape(n, -1).sum(1, keepdim=True))}
    return {"weight": Dense(contribution.reshape(n, x.shape[1], -1).sum(2))}
