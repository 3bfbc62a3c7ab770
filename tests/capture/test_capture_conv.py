"""Conv1d/2d/3d and ConvTranspose1d/2d/3d rules vs the vmap(grad) oracle: strides, dilation, groups,
padding modes, output_padding."""

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


@settings(max_examples=15, deadline=None)
@given(m=st.integers(1, 3), groups=st.sampled_from([1, 2]), k=st.integers(1, 2), stride=st.integers(1, 2),
       dilation=st.integers(1, 2), padding=st.sampled_from([0, 1]), mode=st.sampled_from(["zeros", "reflect", "circular"]),
       bias=st.booleans(), form=st.sampled_from(["outer", "dense", "auto"]), dense_by=st.sampled_from(["matmul", "conv"]))
def test_conv3d(m, groups, k, stride, dilation, padding, mode, bias, form, dense_by):
    conv = nn.Conv3d(2 * groups, 2 * groups, k, stride=stride, dilation=dilation, padding=padding,
                     padding_mode=mode, groups=groups, bias=bias)
    torch.manual_seed(m + k)
    model = nn.Sequential(conv).double()
    x = torch.randn(m, 2 * groups, 4, 3, 5, dtype=torch.float64)
    y = torch.randn_like(model(x))
    with conv_form(form, dense_by):
        check_all(model, sq_loss, x, y, rtol=1e-6)


def test_conv3d_anisotropic_kernel_stride_dilation():
    torch.manual_seed(3)
    conv = nn.Conv3d(4, 6, (1, 2, 3), stride=(2, 1, 2), dilation=(1, 2, 1), padding=(0, 1, 1), groups=2)
    model = nn.Sequential(conv).double()
    x = torch.randn(3, 4, 5, 4, 6, dtype=torch.float64)
    y = torch.randn_like(model(x))
    for form in ("outer", "dense"):
        with conv_form(form, "matmul"):
            check_all(model, sq_loss, x, y, rtol=1e-6)


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 3), groups=st.sampled_from([1, 2]), k=st.integers(1, 3), stride=st.integers(1, 3),
       dilation=st.integers(1, 2), padding=st.integers(0, 2), extra=st.integers(0, 2), bias=st.booleans(),
       dims=st.sampled_from([1, 2, 3]), form=st.sampled_from(["outer", "dense", "auto"]),
       dense_by=st.sampled_from(["matmul", "conv"]))
def test_conv_transpose(m, groups, k, stride, dilation, padding, extra, bias, dims, form, dense_by):
    output_padding = min(extra, max(stride, dilation) - 1)  # torch: smaller than stride or dilation
    padding = min(padding, (stride + dilation * (k - 1)) // 2)  # torch: the output must not be empty (min size 2)
    cls = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]
    conv = cls(2 * groups, 3 * groups, k, stride=stride, padding=padding, output_padding=output_padding,
               dilation=dilation, groups=groups, bias=bias)
    torch.manual_seed(m + k + dims)
    model = nn.Sequential(conv).double()
    x = torch.randn(m, 2 * groups, *([3, 4, 2][:dims]), dtype=torch.float64)
    y = torch.randn_like(model(x))
    with conv_form(form, dense_by):
        check_all(model, sq_loss, x, y, rtol=1e-6)


class UpTo(nn.Module):
    """A transposed convolution called with output_size (an output one larger than the default)."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1)

    def forward(self, x):
        return self.up(x, output_size=(2 * x.shape[2], 2 * x.shape[3]))


def test_conv_transpose_output_size():
    torch.manual_seed(4)
    model = UpTo().double()
    x = torch.randn(3, 3, 4, 5, dtype=torch.float64)
    y = torch.randn_like(model(x))
    assert y.shape[2:] == (8, 10)
    check_all(model, sq_loss, x, y, rtol=1e-6)
