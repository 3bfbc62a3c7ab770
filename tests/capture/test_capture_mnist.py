"""The project's models on real MNIST batches vs the vmap(grad) oracle."""

import pytest
import torch
from capture_harness import ce_loss, check_all, oracle_grads, rel_err

from gradstore.capture import bn_priming, coherence_moments
from pipelines.models import build_model


@pytest.fixture(scope="module")
def batch(mnist_full):
    images = torch.tensor(mnist_full.train_images[:48]).float().div(255).unsqueeze(1)
    return images, torch.tensor(mnist_full.train_labels[:48]).long()


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-6), (torch.float32, 1e-4)])
def test_cnn_bn_primed_on_mnist(batch, dtype, rtol):
    images, labels = batch
    model = build_model("cnn-bn", seed=1).to(dtype)
    with bn_priming(model, [images[32:].to(dtype)], reset=True):
        check_all(model, ce_loss, images[:12].to(dtype), labels[:12], rtol=rtol, k=8)


def test_mlp_3x256_on_mnist(batch):
    images, labels = batch
    model = build_model("mlp-3x256", seed=2).double()
    check_all(model, ce_loss, images[:16].double(), labels[:16], rtol=1e-6, k=8)


def test_mlp_cg_moments_on_mnist(batch):
    images, labels = batch
    model = build_model("mlp-cg", seed=0)
    ref = {k: v.flatten(1).double() for k, v in oracle_grads(model, ce_loss, images[:24], labels[:24]).items()}
    mom = coherence_moments(model, ce_loss, images[:24], labels[:24], chunk_size=10)
    for name, flat in ref.items():
        assert rel_err(torch.tensor(mom.sum_of_norm_sq()[name], dtype=torch.float64), flat.pow(2).sum()) < 1e-4
        assert rel_err(torch.tensor(mom.norm_sq_of_sum()[name], dtype=torch.float64), flat.sum(0).pow(2).sum()) < 1e-4
