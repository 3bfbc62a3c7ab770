"""nn.PReLU rule vs the vmap(grad) oracle: one slope or one per channel, any number of spatial dims."""

import torch
from capture_harness import check_all, sq_loss
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn


@settings(max_examples=20, deadline=None)
@given(m=st.integers(1, 4), per_channel=st.booleans(), spatial=st.integers(0, 2))
def test_prelu(m, per_channel, spatial):
    torch.manual_seed(m + spatial)
    prelu = nn.PReLU(3 if per_channel else 1)
    prelu.weight.data.uniform_(-0.5, 0.5)
    layers = [nn.Linear(4, 3)] if spatial == 0 else [nn.Conv1d(4, 3, 1) if spatial == 1 else nn.Conv2d(4, 3, 1)]
    model = nn.Sequential(*layers, prelu).double()
    x = torch.randn(m, 4, *([3] * spatial), dtype=torch.float64)
    y = torch.randn_like(model(x))
    check_all(model, sq_loss, x, y, rtol=1e-6)
