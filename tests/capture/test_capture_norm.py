"""BatchNorm (eval), LayerNorm and GroupNorm rules vs the vmap(grad) oracle; BatchNorm priming."""

import pytest
import torch
from capture_harness import check_all, sq_loss
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gradstore.capture import bn_priming, capture, prime_batchnorm
from gradstore.errors import CaptureError


def _randomize_bn(model):
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.normal_()
            module.bias.data.normal_()
    return model


@settings(max_examples=15, deadline=None)
@given(m=st.integers(1, 4), c=st.integers(1, 4), dims=st.sampled_from([0, 1, 2, 3]), affine=st.booleans())
def test_batchnorm_eval(m, c, dims, affine):
    torch.manual_seed(m * 7 + c)
    cls = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    bn = cls(c, affine=affine)
    model = nn.Sequential(bn).double()
    if affine:
        _randomize_bn(model)
    else:
        bn.running_mean.normal_()
    model.train()  # capture must switch to eval itself
    x = torch.randn(m, c, *([3] * dims), dtype=torch.float64)
    y = torch.randn_like(x)
    if affine:
        check_all(model, sq_loss, x, y, rtol=1e-6)
        assert model.training


@settings(max_examples=15, deadline=None)
@given(m=st.integers(1, 4), t=st.integers(1, 3), d=st.integers(2, 5), bias=st.booleans())
def test_layernorm(m, t, d, bias):
    torch.manual_seed(m + t + d)
    ln = nn.LayerNorm(d, bias=bias)
    ln.weight.data.normal_()
    model = nn.Sequential(nn.Linear(d, d), ln).double()
    x = torch.randn(m, t, d, dtype=torch.float64)
    check_all(model, sq_loss, x, torch.randn(m, t, d, dtype=torch.float64), rtol=1e-6)


@settings(max_examples=10, deadline=None)
@given(m=st.integers(1, 4), groups=st.sampled_from([1, 2, 4]), spatial=st.integers(1, 4))
def test_groupnorm(m, groups, spatial):
    torch.manual_seed(m + groups)
    gn = nn.GroupNorm(groups, 4)
    gn.weight.data.normal_()
    gn.bias.data.normal_()
    model = nn.Sequential(nn.Conv2d(2, 4, 1), gn).double()
    x = torch.randn(m, 2, spatial, spatial + 1, dtype=torch.float64)
    check_all(model, sq_loss, x, torch.randn(m, 4, spatial, spatial + 1, dtype=torch.float64), rtol=1e-6)


def test_batchnorm_without_running_stats_is_rejected():
    model = nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(CaptureError, match="running statistics"):
        capture(model, sq_loss, torch.randn(4, 3), torch.randn(4, 3))


def test_priming_matches_batch_means_and_is_undone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5)).double()
    model.train()
    batches = [torch.randn(8, 3, dtype=torch.float64) for _ in range(3)]
    before = model[1].running_mean.clone()
    rng = torch.get_rng_state()
    with bn_priming(model, batches, reset=True):
        with torch.no_grad():
            hidden = torch.cat([model[0](b) for b in batches]).reshape(3, 8, 4)
        expected = hidden.mean(1).mean(0)  # momentum None: equal-weight average of the batch means
        torch.testing.assert_close(model[1].running_mean, expected)
        assert model[1].momentum == 0.1 and model.training
    torch.testing.assert_close(model[1].running_mean, before)
    assert torch.equal(torch.get_rng_state(), rng)
    assert prime_batchnorm(model, batches) == 3 and not torch.equal(model[1].running_mean, before)


@settings(max_examples=20, deadline=None)
@given(m=st.integers(1, 4), dims=st.sampled_from([1, 2, 3]), affine=st.booleans(), running=st.booleans(),
       eval_stats=st.booleans())
def test_instancenorm(m, dims, affine, running, eval_stats):
    """Exact in every mode: per-example statistics, or (eval with tracked stats) the running ones."""
    torch.manual_seed(m + dims)
    cls = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dims]
    norm = cls(3, affine=True, track_running_stats=running)
    norm.weight.data.normal_()
    norm.bias.data.normal_()
    if running:
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](2, 3, 1)
    model = nn.Sequential(conv, norm).double()
    x = torch.randn(m, 2, *([3] * dims), dtype=torch.float64)
    res = check_all(model, sq_loss, x, torch.randn(m, 3, *([3] * dims), dtype=torch.float64), rtol=1e-6)
    assert "1.weight" in res.sq_norms
    if running:  # capture read the running statistics and left them as they were
        assert norm.num_batches_tracked.item() == 0


def test_instancenorm_without_affine_has_no_parameters():
    model = nn.Sequential(nn.Conv1d(2, 3, 1), nn.InstanceNorm1d(3)).double()
    x = torch.randn(3, 2, 5, dtype=torch.float64)
    check_all(model, sq_loss, x, torch.randn(3, 3, 5, dtype=torch.float64), rtol=1e-6)


@settings(max_examples=15, deadline=None)
@given(m=st.integers(1, 4), t=st.integers(1, 3), d=st.integers(2, 5), two_dims=st.booleans(),
       eps=st.sampled_from([None, 1e-3]))
def test_rmsnorm(m, t, d, two_dims, eps):
    torch.manual_seed(m + t + d)
    shape = (t, d) if two_dims else (d,)
    norm = nn.RMSNorm(shape, eps=eps)
    norm.weight.data.normal_()
    model = nn.Sequential(nn.Linear(d, d), norm).double()
    x = torch.randn(m, t, d, dtype=torch.float64)
    check_all(model, sq_loss, x, torch.randn(m, t, d, dtype=torch.float64), rtol=1e-6)
