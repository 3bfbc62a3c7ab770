"""``nn.Embedding``: g_n[v, d] = sum_t [idx[n,t] = v] b[n,t,d]; ``nn.EmbeddingBag`` (one bag an example).

Index letters: n = example, t = position (the index tensor's dims after the first, flattened),
v = vocabulary row, d = embedding feature. The left side is a :class:`OneHot` of the indices, so
inner products of two positions are index equalities and nothing of size v is formed.

EmbeddingBag, bag n with output gradient b[n, d] (the example is the bag):

* ``sum`` / ``mean``: g_n[v, d] = sum_t [idx[n,t] = v] w[n,t] b[n,d], with w the per-sample weight
  (``sum``), 1/(count of non-padding entries) (``mean``) or 1, and 0 at ``padding_idx`` and past the
  end of the bag (bags given by ``offsets`` are padded to the longest);
* ``max``: g_n[v, d] = [j[n,d] = v] b[n,d], j the row that held the maximum of feature d (the index
  torch's own backward uses, ties included), zero for an empty bag: a :class:`MaxRows` factor, one
  entry per column, whose quantities cost O(d) per example (or pair), never O(V·d).
"""

from __future__ import annotations

import torch
from torch import nn

from gradstore.capture.factors import BLOCK_ELEMENTS, Dense, OneHot, Outer
from gradstore.capture.registry import register_rule
from gradstore.errors import CaptureError


def _embedding_refusal(module):
    """Why an Embedding or EmbeddingBag cannot be captured whatever the input, or None."""
    name = type(module).__name__
    if module.scale_grad_by_freq:
        return (f"{name}(scale_grad_by_freq=True) couples examples in a batch, so per-example "
                "gradients are undefined; capture a model without it")
    if isinstance(module, nn.EmbeddingBag) and module.max_norm is not None:
        return (f"{name}(max_norm=...) rewrites the weight in place during the forward pass, which "
                "capture must not do; renormalize outside the model or capture one without max_norm")
    return None


@register_rule(nn.Embedding)
def embedding_rule(module: nn.Embedding, inputs, grad_output):
    """Factor of ``weight``: Outer(L = one_hot(idx), R = b), padding rows excluded."""
    reason = _embedding_refusal(module)
    if reason:
        raise CaptureError(reason)
    idx = inputs[0]
    n = idx.shape[0]
    index = idx.reshape(n, -1)
    b = grad_output.reshape(n, -1, 1, module.embedding_dim)
    if module.padding_idx is not None:
        b = b * (index != module.padding_idx)[..., None, None].to(b.dtype)
    return {"weight": Outer(OneHot(index, module.num_embeddings), b, tuple(module.weight.shape))}


_BAG_MODES = {"sum": 0, "mean": 1, "max": 2}


class MaxRows(Dense):
    """g_n[v, d] = b[n, d] · [rows[n, d] = v]: one entry per column (EmbeddingBag ``max``).

    A :class:`Dense` factor whose ``g`` (n, V, d) is formed only when asked for (``materialize``,
    or merging with another use); its own quantities never form it: ||g_n||² = Σ_d b²_nd (each
    column holds one entry), g_n·g_m = Σ_d b_nd b_md [rows_nd = rows_md], O(d) per pair.
    """

    def __init__(self, rows: torch.Tensor, b: torch.Tensor, vocab: int):  # Dense is frozen: set directly
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "b", b)
        object.__setattr__(self, "vocab", vocab)

    @property
    def g(self) -> torch.Tensor:
        n, d = self.b.shape
        return self.b.new_zeros(n, self.vocab, d).scatter_(1, self.rows[:, None, :], self.b[:, None, :])

    @property
    def n(self) -> int:
        return self.b.shape[0]

    def sum(self) -> torch.Tensor:
        n, d = self.b.shape
        columns = torch.arange(d, device=self.b.device).repeat(n)
        out = self.b.new_zeros(self.vocab, d)
        return out.index_put_((self.rows.reshape(-1), columns), self.b.reshape(-1), accumulate=True)

    def sq_norms(self) -> torch.Tensor:
        return (self.b * self.b).sum(1)

    def gram(self) -> torch.Tensor:
        n, d = self.b.shape
        size = max(1, BLOCK_ELEMENTS // max(1, n * d))  # rows of examples per block of (rows, n, d) products
        out = []
        for start in range(0, n, size):
            rows = slice(start, min(n, start + size))
            same = (self.rows[rows, None, :] == self.rows[None, :, :]).to(self.b.dtype)
            out.append((self.b[rows, None, :] * self.b[None, :, :] * same).sum(-1))
        return torch.cat(out) if out else self.b.new_zeros(0, n)

    def dots(self, v: torch.Tensor) -> torch.Tensor:
        return (self.b * v.to(self.b.dtype).gather(0, self.rows)).sum(1)

    def coords(self, flat_index: torch.Tensor) -> torch.Tensor:
        d = self.b.shape[1]
        row, col = flat_index // d, flat_index % d
        return self.b[:, col] * (self.rows[:, col] == row).to(self.b.dtype)

    def project(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(n, k) = Σ_d b_nd u[k, rows_nd] v[k, d] on the (V, d) weight."""
        return torch.einsum("nd,knd,kd->nk", self.b, u.to(self.b.dtype)[:, self.rows], v.to(self.b.dtype))


def _arguments(inputs, kwargs):
    """(input, offsets, per_sample_weights) of a call, positional or keyword."""
    names = ("input", "offsets", "per_sample_weights")
    bound = dict(zip(names, inputs))
    for name in names:
        if name in (kwargs or {}):
            bound[name] = kwargs[name]
    return bound.get("input"), bound.get("offsets"), bound.get("per_sample_weights")


def _bags(module, idx, offsets, weights):
    """(index (n, t), offsets or None, per-sample weights or None, bag mask (n, t)) for the bags."""
    if idx.dim() == 2:
        if offsets is not None:
            raise CaptureError("nn.EmbeddingBag with a 2-d input takes no offsets; pass offsets=None")
        return idx, None, weights, torch.ones_like(idx, dtype=torch.bool)
    if idx.dim() != 1 or offsets is None:
        raise CaptureError(
            f"nn.EmbeddingBag input of shape {tuple(idx.shape)} with offsets={'given' if offsets is not None else 'None'}: "
            "capture needs a 2-d (bags, length) input or a 1-d input with offsets, one bag an example"
        )
    ends = offsets[1:] if module.include_last_offset else torch.cat([offsets[1:], offsets.new_tensor([idx.numel()])])
    starts = offsets[:-1] if module.include_last_offset else offsets
    lengths = ends - starts
    width = int(lengths.max()) if lengths.numel() else 0
    pos = starts[:, None] + torch.arange(width, device=idx.device)
    mask = torch.arange(width, device=idx.device)[None, :] < lengths[:, None]
    pos = torch.where(mask, pos, torch.zeros_like(pos))
    padded_weights = None if weights is None else torch.where(mask, weights[pos], torch.zeros_like(weights[pos]))
    return torch.where(mask, idx[pos], torch.zeros_like(pos)), offsets, padded_weights, mask


@register_rule(nn.EmbeddingBag, kwargs=True)
def embedding_bag_rule(module: nn.EmbeddingBag, inputs, grad_output, kwargs=None):
    """Factor of ``weight``: Outer(L = one_hot(idx), R = w · b) for sum/mean, over features for max."""
    reason = _embedding_refusal(module)
    if reason:
        raise CaptureError(reason)
    flat, offsets, weights = _arguments(inputs, kwargs)
    index, offsets, weights, mask = _bags(module, flat, offsets, weights)
    shape = tuple(module.weight.shape)
    b = grad_output  # (n, d)
    if module.mode == "max":
        # the rows that held each feature's maximum, as torch's own forward finds them
        flat = flat if offsets is not None else flat.reshape(-1)
        bag_offsets = offsets if offsets is not None else torch.arange(0, flat.numel(), max(1, index.shape[1]),
                                                                       device=flat.device)
        if offsets is None and index.shape[1] == 0:
            bag_offsets = torch.zeros(index.shape[0], dtype=torch.long, device=flat.device)
        _, _, bag_size, rows = torch.embedding_bag(
            module.weight.detach(), flat, bag_offsets, False, _BAG_MODES["max"], False, None,
            module.include_last_offset, module.padding_idx,
        )
        filled = (bag_size > 0).to(b.dtype)[:, None]  # an empty bag's output is a constant 0
        return {"weight": MaxRows(rows.long(), b * filled, module.num_embeddings)}
    w = mask.to(b.dtype)
    if module.padding_idx is not None:
        w = w * (index != module.padding_idx).to(b.dtype)
    if weights is not None:
        if module.mode != "sum":
            raise CaptureError("nn.EmbeddingBag takes per_sample_weights only with mode='sum'")
        w = w * weights.to(b.dtype)
    if module.mode == "mean":
        w = w / w.sum(1, keepdim=True).clamp(min=1)
    right = (w[:, :, None] * b[:, None, :]).unsqueeze(2)  # (n, t, 1, d)
    return {"weight": Outer(OneHot(index, module.num_embeddings), right, shape)}


embedding_rule.refusal = embedding_bag_rule.refusal = _embedding_refusal
