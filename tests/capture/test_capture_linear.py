"""nn.Linear rule vs the vmap(grad) oracle, including sequence inputs and shapes drawn by hypothesis."""

import pytest
import torch
from capture_harness import check_all, sq_loss
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gradstore.capture import capture
from gradstore.errors import CaptureError


@settings(max_examples=20, deadline=None)
@given(m=st.integers(1, 5), t=st.integers(0, 3), i=st.integers(1, 6), o=st.integers(1, 5), bias=st.booleans(),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_linear_shapes(m, t, i, o, bias, dtype):
    torch.manual_seed(m * 100 + t * 10 + i)
    model = nn.Sequential(nn.Linear(i, o, bias=bias)).to(dtype)
    x = torch.randn(m, *([t] if t else []), i, dtype=dtype)
    y = torch.randn(m, *([t] if t else []), o, dtype=dtype)
    check_all(model, sq_loss, x, y, rtol=1e-6 if dtype == torch.float64 else 1e-4)


def test_inplace_relu_after_linear():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(inplace=True), nn.Linear(7, 3)).double()
    check_all(model, sq_loss, torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64), rtol=1e-6)


def test_empty_batch_is_rejected():
    model = nn.Linear(3, 2)
    with pytest.raises(CaptureError, match="at least one example"):
        capture(model, sq_loss, torch.zeros(0, 3), torch.zeros(0, 2))


def test_loss_must_be_per_example():
    model = nn.Linear(3, 2)
    with pytest.raises(CaptureError, match="reduction='none'"):
        capture(model, lambda o, y: ((o - y) ** 2).mean(), torch.zeros(4, 3), torch.zeros(4, 2))
