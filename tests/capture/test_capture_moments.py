"""Streaming coherence moments: chunk invariance, exact merging, agreement with the oracle."""

import pytest
import torch
from capture_harness import ce_loss, oracle_grads, rel_err
from torch import nn

from gradstore.capture import coherence_moments
from gradstore.errors import CaptureError


def _model_and_data(m=7):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))
    model = model.double()
    x = torch.randn(m, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (m,))
    return model, x, y


def test_moments_match_oracle_for_every_chunking():
    model, x, y = _model_and_data()
    g = {k: v.flatten(1) for k, v in oracle_grads(model, ce_loss, x, y).items()}
    layer_of = {k: k.rsplit(".", 1)[0] for k in g}
    for chunk in (1, 3, 7, 100):
        mom = coherence_moments(model, ce_loss, x, y, chunk_size=chunk)
        assert mom.m == 7
        nss = mom.norm_sq_of_sum("param")
        sns = mom.sum_of_norm_sq("param")
        for name, flat in g.items():
            assert rel_err(torch.tensor(nss[name], dtype=torch.float64), flat.sum(0).pow(2).sum()) < 1e-10
            assert rel_err(torch.tensor(sns[name], dtype=torch.float64), flat.pow(2).sum()) < 1e-10
            assert mom.sum_grad[name].dtype == torch.float64
        by_layer = mom.sum_of_norm_sq("layer")
        for layer in set(layer_of.values()):
            expected = sum(g[k].pow(2).sum() for k in g if layer_of[k] == layer)
            assert rel_err(torch.tensor(by_layer[layer], dtype=torch.float64), expected) < 1e-10
        total_sum = torch.cat([flat.sum(0) for flat in g.values()])
        assert rel_err(torch.tensor(mom.norm_sq_of_sum("model"), dtype=torch.float64), total_sum.pow(2).sum()) < 1e-10


def test_moments_merge_exactly():
    model, x, y = _model_and_data()
    whole = coherence_moments(model, ce_loss, x, y, chunk_size=7)
    merged = coherence_moments(model, ce_loss, x[:3], y[:3]) + coherence_moments(model, ce_loss, x[3:], y[3:])
    assert merged.m == whole.m
    for by in ("param", "layer"):
        for key, value in whole.sum_of_norm_sq(by).items():
            assert merged.sum_of_norm_sq(by)[key] == pytest.approx(value, rel=1e-12)
            assert merged.norm_sq_of_sum(by)[key] == pytest.approx(whole.norm_sq_of_sum(by)[key], rel=1e-12)


def test_moments_float32_model_accumulates_in_float64():
    model, x, y = _model_and_data(9)
    model = model.float()
    g = {k: v.flatten(1).double() for k, v in oracle_grads(model, ce_loss, x.float(), y).items()}
    mom = coherence_moments(model, ce_loss, x.float(), y, chunk_size=4)
    for name, flat in g.items():
        assert mom.sum_grad[name].dtype == torch.float64
        assert rel_err(torch.tensor(mom.sum_of_norm_sq()[name], dtype=torch.float64), flat.pow(2).sum()) < 1e-4


def test_moments_errors():
    model, x, y = _model_and_data()
    with pytest.raises(CaptureError, match="chunk_size"):
        coherence_moments(model, ce_loss, x, y, chunk_size=0)
    with pytest.raises(CaptureError, match="at least one example"):
        coherence_moments(model, ce_loss, x[:0], y[:0])
    with pytest.raises(CaptureError, match="by must be one of"):
        coherence_moments(model, ce_loss, x, y).sum_of_norm_sq("example")
