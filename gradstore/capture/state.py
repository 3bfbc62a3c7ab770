"""Keep the observed training run untouched, and prime BatchNorm running statistics."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def _cuda_devices(model: nn.Module) -> list[int]:
    devices = set()
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type == "cuda":
            devices.add(tensor.device.index if tensor.device.index is not None else torch.cuda.current_device())
    return sorted(devices)


@contextmanager
def preserved_run(model: nn.Module):
    """Restore every module's train/eval mode and the CPU and CUDA RNG states on exit.

    Parameters, ``.grad`` and ``requires_grad`` are never written by capture (it uses
    ``torch.autograd.grad``), so they need no restoring.
    """
    modes = [(module, module.training) for module in model.modules()]
    try:
        with torch.random.fork_rng(devices=_cuda_devices(model)):
            yield model
    finally:
        for module, training in modes:
            module.training = training


def prime_batchnorm(model: nn.Module, batches: Iterable, *, reset: bool = False) -> int:
    """Update BatchNorm running statistics with forward passes; parameters are not touched.

    BatchNorm layers run in training mode (so they update their running statistics), every other
    module in eval mode, without gradients. Modes and the RNG state are restored afterwards. This
    *changes* the running statistics; use :func:`bn_priming` to undo it on exit.

    Parameters
    ----------
    model : nn.Module
    batches : iterable of Tensor (or tuple of Tensor)
        Inputs of the N priming forward passes.
    reset : bool, default False
        Reset the statistics first and average the passes with equal weight (momentum None).

    Returns
    -------
    int
        The number of forward passes run.
    """
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    passes = 0
    with preserved_run(model), torch.no_grad():
        model.eval()
        for norm in norms:
            norm.train()
            if reset:
                norm.reset_running_stats()
                norm.momentum = None
        try:
            for batch in batches:
                model(*batch) if isinstance(batch, (tuple, list)) else model(batch)
                passes += 1
        finally:
            for norm, momentum in zip(norms, momenta):
                norm.momentum = momentum
    return passes


@contextmanager
def bn_priming(model: nn.Module, batches: Iterable, *, reset: bool = False):
    """Context manager: :func:`prime_batchnorm` on entry, the original running statistics on exit.

    Example
    -------
    >>> with bn_priming(model, [x1, x2, x3]):          # doctest: +SKIP
    ...     result = capture(model, loss_fn, x, y)
    """
    saved = [
        (buffer, buffer.detach().clone())
        for module in model.modules()
        if isinstance(module, _BatchNorm)
        for buffer in module.buffers(recurse=False)
    ]
    try:
        prime_batchnorm(model, batches, reset=reset)
        yield model
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
