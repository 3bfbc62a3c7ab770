"""Mixed-precision capture (``Recorder(autocast=...)``): bf16 forward, float32 products, float64 sums;
the Recorder on a CUDA device against the CPU (those tests are skipped without one)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradstore.errors import StoreError
from gradstore.record import Recorder
from pipelines.models import build_model


def _step(name, autocast, device="cpu"):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)
    model = build_model(name, seed=0).to(device)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rec = Recorder(f"memory://precision-{name}-{autocast}-{device}", model, train_inputs=x, train_targets=y,
                   train_ids=range(8), moments_inputs=x, moments_targets=y, coords_per_layer=5, n_proj=4,
                   gram=True, background=False, autocast=autocast)
    values = rec.capture_step(model)
    rec.close()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not model._forward_hooks and not model._forward_pre_hooks
    return values


@pytest.mark.parametrize("name", ["mlp-3x256", "cnn-bn"])
def test_bfloat16_capture_is_close_to_float32_and_sums_in_float64(name):
    full, half = _step(name, None), _step(name, "bfloat16")
    assert not np.array_equal(full["loss"], half["loss"])  # the forward really ran in bfloat16
    for key in ("loss", "sq_norm", "dot_with_sum", "norm_sq_of_sum", "sum_of_norm_sq", "gram"):
        scale = np.abs(full[key]).max()
        assert np.abs(half[key] - full[key]).max() < 0.05 * scale, key
    for key in ("m", "norm_sq_of_sum", "sum_of_norm_sq", "sq_norm", "gram"):
        assert half[key].dtype == np.float64
    # products are formed from float32 factors: two different paths agree far below bf16 precision
    diag = np.einsum("lii->il", half["gram"])
    np.testing.assert_allclose(diag, half["sq_norm"], rtol=1e-4)
    np.testing.assert_allclose(half["sum_of_norm_sq"][0], half["sq_norm"].sum(0), rtol=1e-12)
    np.testing.assert_allclose(half["sum_of_norm_sq"][2], half["sum_of_norm_sq"][0], rtol=1e-4)


def cuda(test):
    """A CUDA test: skipped without a device, TF32 off."""
    return pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")(
        pytest.mark.usefixtures("exact_float32")(test))


@cuda
@pytest.mark.parametrize("name", ["mlp-3x256", "cnn-bn"])
def test_recorder_on_cuda_matches_the_cpu(name):
    on_cpu, on_gpu = _step(name, None), _step(name, None, "cuda")
    assert on_cpu.keys() == on_gpu.keys()
    for key, value in on_cpu.items():
        if value.dtype == bool or not value.size:  # flags (non-finite values) must be identical
            np.testing.assert_array_equal(on_gpu[key], value, err_msg=key)
            continue
        scale = max(float(np.abs(value).max()), 1e-12)
        assert np.abs(on_gpu[key] - value).max() <= 1e-4 * scale, key


@cuda
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_autocast_on_cuda_is_close_to_float32(dtype):
    full, half = _step("cnn-bn", None, "cuda"), _step("cnn-bn", dtype, "cuda")
    assert not np.array_equal(full["loss"], half["loss"])  # the forward really ran in reduced precision
    for key in ("loss", "sq_norm", "norm_sq_of_sum", "sum_of_norm_sq", "gram"):
        scale = np.abs(full[key]).max()
        assert np.abs(half[key] - full[key]).max() < 0.05 * scale, key
        assert half[key].dtype == full[key].dtype


def test_autocast_must_be_a_known_dtype():
    with pytest.raises(StoreError, match="autocast"):
        Recorder("memory://precision-bad", build_model("mlp-3x256"), train_inputs=torch.zeros(2, 1, 28, 28),
                 train_targets=torch.zeros(2, dtype=torch.long), train_ids=[0, 1], autocast="int8")


def test_worker_devices_spread_over_the_gpus():
    from gradstore.record.distributed import worker_device

    assert [worker_device("cuda", r, 2) for r in range(1, 5)] == ["cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert worker_device("cpu", 3, 0) == "cpu"
    with pytest.raises(StoreError, match="no CUDA device"):
        worker_device("cuda", 1, 0)
