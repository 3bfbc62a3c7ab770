"""The tensors of a nest of tensors, tuples, lists (and dicts): one walk for capture and recording (torch side;
imports no gradstore package, so gradstore.record does not load gradstore.capture through it)."""

from __future__ import annotations

import torch


def tensor_leaves(nest, *, dicts: bool = True) -> list:
    """The tensors of a tensor / tuple / list nest, in order; dict values too unless ``dicts=False``
    (operation outputs, which torch returns as tensors or tuples)."""
    if isinstance(nest, torch.Tensor):
        return [nest]
    if isinstance(nest, (tuple, list)):
        return [t for item in nest for t in tensor_leaves(item, dicts=dicts)]
    if dicts and isinstance(nest, dict):
        return [t for item in nest.values() for t in tensor_leaves(item, dicts=dicts)]
    return []
