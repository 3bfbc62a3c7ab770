"""Random projections: exact for k = dim with an orthogonal projection, unbiased inner products,
seeded and reproducible."""

import pytest
import torch
from capture_harness import ce_loss, oracle_grads, rel_err
from torch import nn

from gradstore.capture import Projection, capture
from gradstore.errors import CaptureError


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 2, groups=2), nn.Flatten(), nn.Linear(4 * 2 * 2, 3)).double()
    x = torch.randn(5, 2, 3, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    return model, x, y


def test_orthogonal_full_dimension_is_exact_per_parameter():
    model, x, y = _setup()
    ref = oracle_grads(model, ce_loss, x, y)
    for name, g in ref.items():
        k = g[0].numel()
        for other, param in model.named_parameters():  # project one parameter at a time: k = its size
            param.requires_grad_(other == name)
        res = capture(model, ce_loss, x, y, projection=Projection(k, seed=3, kind="orthogonal"))
        assert set(res.proj) == {name}
        p = res.proj[name]
        flat = g.flatten(1)
        assert rel_err(p @ p.T, flat @ flat.T) < 1e-10, name
        assert rel_err(p.pow(2).sum(1), flat.pow(2).sum(1)) < 1e-10, name


@pytest.mark.parametrize("kind", ["gaussian", "orthogonal"])
def test_inner_products_preserved_in_expectation(kind):
    # E[P^T P] = I  <=>  E[<P g, P g'>] = <g, g'> for all g, g'
    shape, k, draws = (2, 3), 2, 600
    acc = torch.zeros(6, 6, dtype=torch.float64)
    for seed in range(draws):
        u, v = Projection(k, seed=seed, kind=kind).matrices("w", shape, dtype=torch.float64)
        p = (u[:, :, None] * v[:, None, :]).reshape(k, -1)
        acc += p.T @ p
    assert (acc / draws - torch.eye(6, dtype=torch.float64)).abs().max() < 0.4  # ~5 sd; a wrong scale is off by >= 0.6


def test_projection_is_seeded_and_reproducible():
    model, x, y = _setup()
    a = capture(model, ce_loss, x, y, projection=Projection(3, seed=7)).proj
    b = capture(model, ce_loss, x, y, projection=Projection(3, seed=7)).proj
    c = capture(model, ce_loss, x, y, projection=Projection(3, seed=8)).proj
    for name in a:
        assert torch.equal(a[name], b[name])
        assert not torch.allclose(a[name], c[name])
    u1, _ = Projection(3, seed=7).matrices("2.weight", (3, 16))
    u2, _ = Projection(3, seed=7).matrices("0.weight", (3, 16))
    assert not torch.equal(u1, u2)  # each parameter has its own matrices


def test_projection_errors():
    with pytest.raises(CaptureError, match="positive integer"):
        Projection(0)
    with pytest.raises(CaptureError, match="kind must be one of"):
        Projection(2, kind="sparse")
    with pytest.raises(CaptureError, match="impossible"):
        Projection(7, kind="orthogonal").matrices("w", (2, 3))
