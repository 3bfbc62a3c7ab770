"""The capture engine on a CUDA device (skipped where there is none, as in CI); the Recorder's CUDA
tests are in tests/test_distributed_precision.py.

Run on a GPU machine with ``pytest tests/capture/test_capture_cuda.py tests/test_distributed_precision.py``.
Each test compares the CUDA result with an independent computation: torch.func vmap(grad) on the
same device, or the same capture on the CPU in float64.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from capture_harness import ce_loss, check_all, rel_err
from mixed_models import Mixed, mixed_batch
from torch import nn

from gradstore.capture import CaptureFallbackWarning, Projection, capture, coherence_moments
from gradstore.capture import fallback as fallback_module

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
              pytest.mark.usefixtures("exact_float32")]


@pytest.fixture(autouse=True)
def _fresh_fallback_warnings():
    fallback_module._WARNED.clear()  # the fallback warns once per module and process
    yield
    fallback_module._WARNED.clear()


def _on(value, device):
    if isinstance(value, tuple):
        return tuple(v.to(device) for v in value)
    return value.to(device)


def _mixed(dtype):
    torch.manual_seed(0)
    return Mixed().to(dtype)


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-6), (torch.float32, 1e-4)])
def test_every_quantity_on_cuda_matches_vmap(dtype, rtol):
    model = _mixed(dtype).cuda()
    inputs, targets = mixed_batch(6, dtype)
    with pytest.warns(CaptureFallbackWarning):
        res = check_all(model, ce_loss, _on(inputs, "cuda"), targets.cuda(), rtol=rtol, k=5)
    assert all(v.device.type == "cuda" for v in res.sq_norms.values())


def test_cuda_and_cpu_captures_agree_projections_included():
    """Same model, data, coordinates and projection seed: every quantity equal across devices."""
    inputs, targets = mixed_batch(8)
    cpu_model = _mixed(torch.float64)
    coords = {n: torch.tensor([0, p.numel() - 1]) for n, p in cpu_model.named_parameters() if p.requires_grad}
    kwargs = dict(coords=coords, projection=Projection(4, seed=3), gram=True, dot_with="sum", grad_sum=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CaptureFallbackWarning)
        on_cpu = capture(cpu_model, ce_loss, inputs, targets, **kwargs)
        on_gpu = capture(copy.deepcopy(cpu_model).cuda(), ce_loss, _on(inputs, "cuda"), targets.cuda(), **kwargs)
    for quantity in ("sq_norms", "coords", "proj", "gram", "dots", "grad_sum"):
        for name, value in getattr(on_cpu, quantity).items():
            err = rel_err(getattr(on_gpu, quantity)[name].cpu(), value)
            assert err <= 1e-9, f"{name} {quantity}: {err:.1e}"


def test_streamed_moments_on_cuda_match_the_cpu():
    from pipelines.models import build_model

    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(300, 1, 28, 28, generator=gen), torch.randint(0, 10, (300,), generator=gen)
    model = build_model("cnn-bn", seed=0).double()
    on_cpu = coherence_moments(model, ce_loss, x.double(), y, chunk_size=128)
    on_gpu = coherence_moments(copy.deepcopy(model).cuda(), ce_loss, x.double().cuda(), y.cuda(), chunk_size=128)
    assert on_gpu.m == on_cpu.m == 300
    for name, total in on_cpu.sum_grad.items():
        assert on_gpu.sum_grad[name].device.type == "cuda"
        assert rel_err(on_gpu.sum_grad[name].cpu(), total) <= 1e-9, name
    for stat in ("norm_sq_of_sum", "sum_of_norm_sq"):
        expected, got = getattr(on_cpu, stat)("layer"), getattr(on_gpu, stat)("layer")
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-9), (stat, key)
        assert getattr(on_gpu, stat)("model") == pytest.approx(getattr(on_cpu, stat)("model"), rel=1e-9)


def test_capture_leaves_the_cuda_run_untouched():
    """Parameters, .grad, modes and the CUDA RNG (a Dropout in training mode draws from it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Dropout(0.5), nn.ReLU(), nn.Linear(7, 3)).cuda().train()
    x, y = torch.randn(9, 5, device="cuda"), torch.randint(0, 3, (9,), device="cuda")
    ce_loss(model(x), y).sum().backward()
    state = copy.deepcopy(model.state_dict())
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    cuda_rng, cpu_rng = torch.cuda.get_rng_state(), torch.get_rng_state()
    capture(model, ce_loss, x, y, gram=True, projection=3, grad_sum=True)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(torch.cuda.get_rng_state(), cuda_rng) and torch.equal(torch.get_rng_state(), cpu_rng)
