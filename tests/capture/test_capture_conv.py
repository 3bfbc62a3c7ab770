"""Conv1d / Conv2d rule vs the vmap(grad) oracle: strides, dilation, groups, padding modes."""

from contextlib import contextmanager

import pytest
import torch
from capture_harness import check_all, sq_loss
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gradstore.capture.rules import conv as conv_rules


@contextmanager
def conv_form(form, dense_by="auto"):
    """Force the conv rule's form ("outer" or "dense") and the dense form's method ("matmul" or
    "conv": a batched matrix product or a grouped convolution) inside the block; defaults after it."""
    width = conv_rules.MATMUL_MIN_WIDTH
    conv_rules.FORM = form
    conv_rules.MATMUL_MIN_WIDTH = {"auto": width, "matmul": 0, "conv": 10**9}[dense_by]
    try:
        yield
    finally:
        conv_rules.FORM, conv_rules.MATMUL_MIN_WIDTH = "auto", width


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")  # torch's, on the model itself
@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 3), groups=st.sampled_from([1, 2]), k=st.integers(1, 3), stride=st.integers(1, 2),
       dilation=st.integers(1, 2), padding=st.sampled_from([0, 1, "same"]),
       mode=st.sampled_from(["zeros", "reflect", "circular"]), bias=st.booleans(), dims=st.sampled_from([1, 2]),
       form=st.sampled_from(["outer", "dense", "auto"]), dense_by=st.sampled_from(["matmul", "conv"]))
def test_conv_shapes(m, groups, k, stride, dilation, padding, mode, bias, dims, form, dense_by):
    if padding == "same":
        stride = 1
    conv = (nn.Conv1d if dims == 1 else nn.Conv2d)(
        2 * groups, 2 * groups, k, stride=stride, dilation=dilation, padding=padding, padding_mode=mode,
        groups=groups, bias=bias,
    )
    torch.manual_seed(m + k)
    model = nn.Sequential(conv).double()
    x = torch.randn(m, 2 * groups, *([6] * dims), dtype=torch.float64)
    y = torch.randn_like(model(x))
    with conv_form(form, dense_by):
        check_all(model, sq_loss, x, y, rtol=1e-6)


def test_conv2d_float32():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 2, stride=2))
    x = torch.randn(5, 3, 8, 8)
    y = torch.randn(5, 2, 4, 4)
    check_all(model, sq_loss, x, y, rtol=1e-4)


def test_large_kernel_takes_the_gram_path():
    # t * (r + c) < r * c: few output locations, many channels -> pairwise form instead of materializing
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(16, 16, 3)).double()
    x = torch.randn(3, 16, 4, 4, dtype=torch.float64)
    check_all(model, sq_loss, x, torch.randn(3, 16, 2, 2, dtype=torch.float64), rtol=1e-6)


@pytest.mark.parametrize(("form", "dense_by"), [("outer", "auto"), ("dense", "matmul"), ("dense", "conv")])
@pytest.mark.parametrize("dims", [1, 2])
def test_conv_strided_dilated_grouped_both_forms(form, dense_by, dims):
    torch.manual_seed(5)
    conv = (nn.Conv1d if dims == 1 else nn.Conv2d)(4, 6, 3, stride=2, dilation=2, padding=2, groups=2,
                                                    padding_mode="reflect")
    model = nn.Sequential(conv).double()
    x = torch.randn(3, 4, *([9] * dims), dtype=torch.float64)
    y = torch.randn_like(model(x))
    with conv_form(form, dense_by):
        check_all(model, sq_loss, x, y, rtol=1e-6)


@pytest.mark.parametrize("dense_by", ["matmul", "conv"])
@pytest.mark.parametrize("dims", [1, 2])
def test_dense_form_in_blocks_of_examples(dims, dense_by, monkeypatch):
    """A block budget of about two examples: the grouped convolution runs block by block (3 blocks + a rest)."""
    torch.manual_seed(6)
    conv = (nn.Conv1d if dims == 1 else nn.Conv2d)(4, 6, 3, stride=2, padding=1, groups=2)
    model = nn.Sequential(conv).double()
    x = torch.randn(7, 4, *([7] * dims), dtype=torch.float64)
    y = torch.randn_like(model(x))
    per_example = x[0].numel() + y[0].numel() + conv.weight.numel()
    if dense_by == "matmul":  # the patches: c = (c_in / h) * k values per location and group
        per_example += y[0, 0].numel() * conv.groups * conv.weight[0].numel()
    monkeypatch.setattr(conv_rules, "DENSE_BLOCK_ELEMENTS", 2 * per_example)
    with conv_form("dense", dense_by):
        check_all(model, sq_loss, x, y, rtol=1e-6)
