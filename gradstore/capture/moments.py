"""Streaming coherence moments: m, Σ g_n and Σ ||g_n||² over any number of examples.

Chunks of examples go through :func:`gradstore.capture.capture` one at a time; the sums are
accumulated in float64, so memory is O(parameters + chunk) whatever m is. Because every field is a
sum, two :class:`Moments` over disjoint example sets add exactly (``a + b``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradstore.capture.engine import capture, first_input, plan, require_trainable
from gradstore.errors import CaptureError

_BY = ("param", "layer", "model")


@dataclass
class Moments:
    """Exact first and second moments of per-example gradients over m examples.

    Attributes
    ----------
    m : int
        Number of examples.
    sum_grad : dict[str, Tensor]
        Parameter name -> Σ_n g_n (float64, on the model's device).
    sum_sq_norm : dict[str, float]
        Parameter name -> Σ_n ||g_n||².
    layer_of : dict[str, str]
        Parameter name -> owning module's qualified name.
    """

    m: int
    sum_grad: dict
    sum_sq_norm: dict
    layer_of: dict

    def norm_sq_of_sum(self, by: str = "param"):
        """||Σ_n g_n||² per parameter, per layer (dict) or for the whole model (float)."""
        return self._group({name: float((g * g).sum()) for name, g in self.sum_grad.items()}, by)

    def sum_of_norm_sq(self, by: str = "param"):
        """Σ_n ||g_n||² per parameter, per layer (dict) or for the whole model (float)."""
        return self._group(dict(self.sum_sq_norm), by)

    def _group(self, per_param: dict, by: str):
        if by not in _BY:
            raise CaptureError(f"by must be one of {_BY}, got {by!r}")
        if by == "param":
            return per_param
        if by == "model":
            return float(sum(per_param.values()))
        out: dict[str, float] = {}
        for name, value in per_param.items():
            out[self.layer_of[name]] = out.get(self.layer_of[name], 0.0) + value
        return out

    def __add__(self, other: Moments) -> Moments:
        if not isinstance(other, Moments):
            return NotImplemented
        if set(self.sum_grad) != set(other.sum_grad):
            raise CaptureError("cannot add Moments of different parameter sets; capture the same model")
        return Moments(
            self.m + other.m,
            {k: g + other.sum_grad[k].to(g.device) for k, g in self.sum_grad.items()},
            {k: s + other.sum_sq_norm[k] for k, s in self.sum_sq_norm.items()},
            dict(self.layer_of),
        )

    merge = __add__


def _rows(data, rows: slice):
    if isinstance(data, dict):
        return {k: _rows(d, rows) for k, d in data.items()}
    if isinstance(data, (tuple, list)):
        return type(data)(_rows(d, rows) for d in data)
    return data[rows] if isinstance(data, torch.Tensor) else data


def _to(data, device):
    if isinstance(data, dict):
        return {k: _to(d, device) for k, d in data.items()}
    if isinstance(data, (tuple, list)):
        return type(data)(_to(d, device) for d in data)
    return data.to(device) if isinstance(data, torch.Tensor) and device is not None else data


def _example_count(inputs, targets) -> int:
    """m, with every tensor of ``inputs`` and ``targets`` holding m rows (chunks slice them all)."""
    first = first_input(inputs)
    if not isinstance(first, torch.Tensor) or first.dim() == 0:
        raise CaptureError("inputs must be a tensor (or tuple of tensors) with the example axis first")
    m = int(first.shape[0])
    if m == 0:
        raise CaptureError("coherence_moments needs at least one example; got an empty batch")
    for name, data in (("every tensor in inputs", inputs), ("targets", targets)):
        values = data.values() if isinstance(data, dict) else data if isinstance(data, (tuple, list)) else (data,)
        for value in values:
            if isinstance(value, torch.Tensor) and (value.dim() == 0 or value.shape[0] != m):
                raise CaptureError(f"{name} must have {m} rows like inputs (example axis first), "
                                   f"got shape {tuple(value.shape)}")
    return m


def coherence_moments(model, loss_fn, inputs, targets, chunk_size: int = 1024) -> Moments:
    """Exact m, Σ g_n and Σ ||g_n||² over all examples, streamed in chunks of ``chunk_size``.

    Parameters
    ----------
    model, loss_fn :
        As for :func:`gradstore.capture.capture`.
    inputs, targets : Tensor (or tuple of Tensor)
        All m examples, example axis first; may live on the CPU while the model is on a GPU
        (each chunk is moved to the model's device).
    chunk_size : int
        Examples per forward+backward pass; bounds memory.

    Returns
    -------
    Moments
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise CaptureError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    m = _example_count(inputs, targets)
    require_trainable(model, plan(model))
    device = next((p.device for p in model.parameters()), None)
    sum_grad: dict = {}
    sum_sq_norm: dict = {}
    layer_of: dict = {}
    for start in range(0, m, chunk_size):
        rows = slice(start, min(m, start + chunk_size))
        result = capture(model, loss_fn, _to(_rows(inputs, rows), device), _to(_rows(targets, rows), device),
                         sq_norms=True, grad_sum=True)
        layer_of = result.layer_of
        for name, g in result.grad_sum.items():
            if name in sum_grad:
                sum_grad[name].add_(g)  # float64 += model dtype, in place
            else:
                sum_grad[name] = g.to(torch.float64, copy=True)
            # a float64 scalar tensor on the device: no host sync per chunk (one at the end)
            sq = result.sq_norms[name].sum(dtype=torch.float64)
            sum_sq_norm[name] = sum_sq_norm[name].add_(sq) if name in sum_sq_norm else sq
    names = list(sum_sq_norm)
    totals = torch.stack([sum_sq_norm[n] for n in names]).tolist() if names else []
    return Moments(m, sum_grad, dict(zip(names, totals)), layer_of)
