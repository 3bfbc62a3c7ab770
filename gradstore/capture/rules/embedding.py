"""``nn.Embedding``: g_n[v, d] = sum_t [idx[n,t] = v] b[n,t,d].

Index letters: n = example, t = position (the index tensor's dims after the first, flattened),
v = vocabulary row, d = embedding feature. The left side is a :class:`OneHot` of the indices, so
inner products of two positions are index equalities and nothing of size v is formed.
"""

from __future__ import annotations

from torch import nn

from gradstore.capture.factors import OneHot, Outer
from gradstore.capture.registry import register_rule
from gradstore.errors import CaptureError


@register_rule(nn.Embedding)
def embedding_rule(module: nn.Embedding, inputs, grad_output):
    """Factor of ``weight``: Outer(L = one_hot(idx), R = b), padding rows excluded."""
    if module.scale_grad_by_freq:
        raise CaptureError(
            "nn.Embedding(scale_grad_by_freq=True) couples examples in a batch, so per-example "
            "gradients are undefined; capture a model without it"
        )
    idx = inputs[0]
    n = idx.shape[0]
    index = idx.reshape(n, -1)
    b = grad_output.reshape(n, -1, 1, module.embedding_dim)
    if module.padding_idx is not None:
        b = b * (index != module.padding_idx)[..., None, None].to(b.dtype)
    return {"weight": Outer(OneHot(index, module.num_embeddings), b, tuple(module.weight.shape))}
