"""The opt-in self-check of a capture (``capture(..., verify=True)``).

For every parameter, the factors' Σ_n g_n is compared with autograd's gradient of the summed loss,
and one example's g_i (the last, i = m - 1) with autograd's gradient of that example's loss: with
r = autograd's g_i, ||g_i - r||² = ||g_i||² - 2 g_i·r + ||r||² from the factors' own ``sq_norms``
and ``dots`` (no materialization). The second check catches what the first cannot: a use
attributed to the wrong examples (a mistaken example axis) leaves Σ_n g_n unchanged.

Tolerance (relative to the reference norm): :data:`RTOL` per dtype for Σ_n g_n; for g_i the
square root of the dtype's machine epsilon, times 100, at least :data:`RTOL` (the difference of
squares loses half the digits): 1.5e-6 in float64, 3.5e-2 in float32.
"""

from __future__ import annotations

import math

import torch

from gradstore.errors import CaptureError

#: relative tolerance of the Σ_n g_n comparison, per parameter dtype
RTOL = {torch.float64: 1e-6, torch.float32: 1e-3}
_DEFAULT_RTOL = 1e-2  # float16 / bfloat16


def _rtol(dtype) -> float:
    return RTOL.get(dtype, _DEFAULT_RTOL)


def check(losses: torch.Tensor, params: dict, factors: dict, m: int) -> None:
    """Raise CaptureError naming the first parameter whose factors disagree with autograd."""
    names = list(params)
    tensors = [params[n] for n in names]
    total = torch.autograd.grad(losses.sum(), tensors, allow_unused=True, retain_graph=True)
    i = m - 1
    one = torch.autograd.grad(losses[i], tensors, allow_unused=True)
    for name, ref_sum, ref_one in zip(names, total, one):
        param = params[name]
        ref_sum = torch.zeros_like(param) if ref_sum is None else ref_sum
        ref_one = torch.zeros_like(param) if ref_one is None else ref_one
        factor = factors[name]
        rtol = _rtol(param.dtype)
        with torch.no_grad():
            got = factor.sum()
            err = (got.double() - ref_sum.double()).norm().item()
            scale = max(ref_sum.double().norm().item(), 1e-30)
            if err > rtol * scale and err > 1e-12:
                raise CaptureError(
                    f"verify: parameter {name!r}: the factors' sum of per-example gradients differs from "
                    f"autograd's gradient of the summed loss by {err / scale:.2e} relative (tolerance {rtol:g}); "
                    "a use of it is not captured correctly -- please report this with the model"
                )
            sq = factor.sq_norms()[i].double()
            dot = factor.dots(ref_one)[i].double()
            ref_sq = ref_one.double().square().sum()
            diff = max((sq - 2 * dot + ref_sq).item(), 0.0)
            tol = max(rtol, 100 * math.sqrt(torch.finfo(param.dtype).eps))
            if math.sqrt(diff) > tol * max(math.sqrt(ref_sq.item()), 1e-30) and diff > 1e-20:
                raise CaptureError(
                    f"verify: parameter {name!r}: example {i}'s gradient from the factors differs from autograd's "
                    f"by {math.sqrt(diff / max(ref_sq.item(), 1e-300)):.2e} relative (tolerance {tol:.1e}); "
                    "a use of it is attributed to the wrong examples -- please report this with the model"
                )
