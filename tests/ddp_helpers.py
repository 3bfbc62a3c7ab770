"""What the DDP and multi-process tests share: the small model and seeded data they record, and
the comparison of a store written by several ranks with the one-process store."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def tiny_model() -> nn.Module:
    """5 -> 8 -> 3 MLP, seed 0 (every rank builds the same one)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def tiny_data(n: int, seed: int):
    """n seeded examples of 5 features and their labels among 3 classes."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def assert_same_store(got, want) -> None:
    """Every variable of ``got`` equals ``want``'s: floats to 1e-4 relative, values that cancel to
    near 0 (a dot product) to 1e-6 of the array's scale; the rest exactly."""
    for name in want.variables:
        x, y = want[name].values, got[name].values
        if x.dtype.kind == "f":
            scale = float(np.abs(x[np.isfinite(x)]).max()) if np.isfinite(x).any() else 0.0
            np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-6 * scale, equal_nan=True, err_msg=name)
        else:
            np.testing.assert_array_equal(y, x, err_msg=name)
