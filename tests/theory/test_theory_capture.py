"""The theory held to the capture engine on real networks and real MNIST digits (float64).

Independent oracle: per-example gradients materialized with torch.func (vmap of grad). Checked:
streamed moments are invariant to the chunk size and to the order of the examples; m-coherence
from the moments, from the full Gram matrix and from the materialized gradients agree; and the
loss change of a small SGD step matches −η||g||² (eq. 1) to first order, so the measured change
is −η·alpha·E||g_i||² with alpha from the captured moments.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call, grad, vmap

import analysis
from gradstore.capture import capture, coherence_moments
from pipelines.data import load_mnist
from pipelines.models import build_model

M = 16
SETTINGS = settings(max_examples=5, deadline=None)


def loss_fn(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


@pytest.fixture(scope="module")
def batch():
    data = load_mnist()  # the bundled subset
    x = torch.as_tensor(data.train_images[:M], dtype=torch.float64).unsqueeze(1) / 255.0
    return x, torch.as_tensor(data.train_labels[:M])


def _model(name):
    """The project's model in float64, eval mode, at a generic point.

    At initialization BatchNorm shifts are exactly 0, so over the blank background of a digit the
    ReLUs sit exactly at their kink and the loss is not differentiable there (the first-order loss
    change is off by about 1% for cnn-bn); random shifts move the network off the kinks.
    """
    model = build_model(name, seed=0).double().eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator, dtype=torch.float64))
    return model


@pytest.fixture(scope="module", params=["mlp-3x256", "cnn-bn"])
def model(request):
    return _model(request.param)


@pytest.fixture(scope="module")
def mlp():
    return _model("mlp-3x256")


@pytest.fixture(scope="module")
def mlp_oracle(mlp, batch):
    return oracle_moments(mlp, *batch)


def materialized(model, x, y):
    """Parameter name -> (m, *shape) per-example gradients, by torch.func (the oracle)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def one(p, xi, yi):
        return F.cross_entropy(functional_call(model, (p, buffers), (xi[None],)), yi[None])

    return vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)


def oracle_moments(model, x, y):
    """(||Σ g||², Σ ||g||², Gram) over the whole model, float64 numpy."""
    g = torch.cat([v.reshape(len(x), -1) for v in materialized(model, x, y).values()], dim=1)
    total = g.sum(0)
    return float(total @ total), float((g * g).sum()), (g @ g.T).numpy()


@pytest.fixture(scope="module")
def oracle(model, batch):
    return oracle_moments(model, *batch)


@SETTINGS
@given(chunk_size=st.integers(1, M + 3))
def test_moments_chunk_invariance(mlp, batch, mlp_oracle, chunk_size):
    oracle = mlp_oracle
    moments = coherence_moments(mlp, loss_fn, *batch, chunk_size=chunk_size)
    assert moments.m == M
    np.testing.assert_allclose(moments.norm_sq_of_sum(by="model"), oracle[0], rtol=1e-10)
    np.testing.assert_allclose(moments.sum_of_norm_sq(by="model"), oracle[1], rtol=1e-10)


@SETTINGS
@given(seed=st.integers(0, 2**16))
def test_moments_invariance_to_example_order(mlp, batch, mlp_oracle, seed):
    oracle = mlp_oracle
    perm = torch.randperm(M, generator=torch.Generator().manual_seed(seed))
    x, y = batch
    moments = coherence_moments(mlp, loss_fn, x[perm], y[perm], chunk_size=7)
    np.testing.assert_allclose(moments.norm_sq_of_sum(by="model"), oracle[0], rtol=1e-10)
    np.testing.assert_allclose(moments.sum_of_norm_sq(by="model"), oracle[1], rtol=1e-10)


def test_per_layer_moments_add_up_to_the_model(model, batch):
    """Layers own disjoint parameter blocks, so both moments add across layers."""
    moments = coherence_moments(model, loss_fn, *batch, chunk_size=10)
    grads = materialized(model, *batch)
    for layer, nss in moments.norm_sq_of_sum(by="layer").items():
        g = torch.cat([v.reshape(M, -1) for k, v in grads.items() if moments.layer_of[k] == layer], dim=1)
        np.testing.assert_allclose(nss, float(g.sum(0) @ g.sum(0)), rtol=1e-10)
        np.testing.assert_allclose(moments.sum_of_norm_sq(by="layer")[layer], float((g * g).sum()), rtol=1e-10)
    np.testing.assert_allclose(sum(moments.norm_sq_of_sum(by="layer").values()),
                               moments.norm_sq_of_sum(by="model"), rtol=1e-12)


def test_m_coherence_three_ways(model, batch, oracle):
    """From streamed moments, from the captured Gram matrix, from torch.func gradients."""
    moments = coherence_moments(model, loss_fn, *batch, chunk_size=5)
    from_moments = analysis.m_coherence(moments.norm_sq_of_sum(by="model"), moments.sum_of_norm_sq(by="model"), M)
    gram = sum(g.to(torch.float64) for g in capture(model, loss_fn, *batch, sq_norms=False, gram=True).gram.values())
    from_gram = float(gram.sum() / gram.trace())
    nss, sns, oracle_gram = oracle
    from_oracle = analysis.m_coherence(nss, sns, M)
    np.testing.assert_allclose(gram.numpy(), oracle_gram, rtol=1e-9, atol=1e-12 * np.abs(oracle_gram).max())
    np.testing.assert_allclose([from_moments, from_gram], [from_oracle, from_oracle], rtol=1e-10)
    assert 0 <= analysis.alpha(nss, sns, M) <= 1  # Theorem 1 on a real network


def _mean_loss(model, x, y):
    with torch.no_grad():
        return float(loss_fn(model(x), y).mean())


@pytest.mark.parametrize("name", ["mlp-3x256"])
def test_sgd_step_first_order_loss_change(name, batch):
    """ℓ(w − ηg) − ℓ(w) = −η||g||² + O(η²), with ||g||² = alpha·Σ||g_i||²/m from the captured moments.

    Only on a network that is differentiable at w: on ``cnn-bn`` max-pooling over MNIST's blank
    background has exact ties whose resolution depends on the thread schedule, so the loss has a
    kink at w and the first-order error stalls near 1e-2 in some runs (seen in the full suite).
    """
    model = _model(name)
    x, y = batch
    moments = coherence_moments(model, loss_fn, x, y, chunk_size=M)
    a = analysis.alpha(moments.norm_sq_of_sum(by="model"), moments.sum_of_norm_sq(by="model"), M)
    g_sq = a * moments.sum_of_norm_sq(by="model") / M  # = ||Σ g_i / m||², the full-batch gradient
    params = dict(model.named_parameters())
    full = {k: s / M for k, s in moments.sum_grad.items()}
    autograd = torch.autograd.grad(loss_fn(model(x), y).mean(), list(params.values()))
    for (k, _), g in zip(params.items(), autograd):
        torch.testing.assert_close(full[k], g.detach(), rtol=1e-10, atol=1e-14)
    base = _mean_loss(model, x, y)
    errors = []
    for eta in (1e-2, 1e-3, 1e-4):
        with torch.no_grad():
            for k, p in params.items():
                p.sub_(eta * full[k])
            change = _mean_loss(model, x, y) - base
            for k, p in params.items():
                p.add_(eta * full[k])
        errors.append(abs(change / (-eta * g_sq) - 1))
    assert errors[-1] < 1e-3, errors  # ratio → 1 ...
    assert errors[-1] < errors[0] / 10, errors  # ... at first order: the error shrinks with η
    assert _mean_loss(model, x, y) == base  # parameters restored exactly by the test itself


def test_one_example_step_changes_each_loss_by_its_gram_entry(batch):
    """Eq. (1) per example: a step on z' changes ℓ_z by −η g_z·g_z' to first order (Gram from capture)."""
    model = _model("mlp-3x256")
    x, y = batch
    result = capture(model, loss_fn, x, y, sq_norms=False, gram=True, grads=True)
    gram = sum(result.gram.values())
    params = dict(model.named_parameters())
    with torch.no_grad():
        before = loss_fn(model(x), y)
    eta, z_prime = 1e-5, 3
    with torch.no_grad():
        for k, p in params.items():
            p.sub_(eta * result.grads[k][z_prime])
        after = loss_fn(model(x), y)
        for k, p in params.items():
            p.add_(eta * result.grads[k][z_prime])
    predicted = -eta * gram[:, z_prime]
    scale = float(gram[z_prime, z_prime]) * eta
    np.testing.assert_allclose((after - before).numpy(), predicted.numpy(), atol=1e-3 * scale)
    # m-coherence reading: Σ_z of the changes relative to the step's own example = Σ_z G_zz'/G_z'z'
    benefit = float((after - before).sum() / (after - before)[z_prime])
    np.testing.assert_allclose(benefit, float(gram[:, z_prime].sum() / gram[z_prime, z_prime]), rtol=1e-3)
