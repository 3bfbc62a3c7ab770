"""Model shapes, parameter counts and initialisation."""

import math

import pytest
import torch
from torch import nn

from gradstore.errors import GradstoreError
from pipelines.models import MODELS, build_model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_output_shape_and_seeding(name):
    x = torch.rand(3, 1, 28, 28)
    model = build_model(name, seed=1)
    model.eval()
    assert model(x).shape == (3, 10)
    again = build_model(name, seed=1)
    other = build_model(name, seed=2)
    for (ka, a), (_, b), (_, c) in zip(model.state_dict().items(), again.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), ka
    assert any(not torch.equal(a, c) for a, c in zip(model.parameters(), other.parameters()))


def test_build_model_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_model("mlp-3x256", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_coherent_gradients_mlp_is_784_2048_10_with_xavier_init():
    model = build_model("mlp-cg", seed=0)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 2048), (2048, 10)]
    assert sum(p.numel() for p in model.parameters()) == 784 * 2048 + 2048 + 2048 * 10 + 10
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 1
    for m in linears:
        bound = math.sqrt(6 / (m.in_features + m.out_features))  # Glorot & Bengio uniform bound
        assert m.weight.abs().max() <= bound
        assert m.weight.abs().max() > 0.95 * bound
        # Uniform(-b, b) has variance b^2 / 3.
        assert m.weight.var().item() == pytest.approx(bound**2 / 3, rel=0.05)
        assert torch.count_nonzero(m.bias) == 0


def test_winsorization_mlp_has_three_hidden_layers_of_256():
    model = build_model("mlp-3x256")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 256), (256, 256), (256, 256), (256, 10)]


@pytest.mark.parametrize("name", ["cnn-bn", "resnet-small"])
def test_conv_models_use_batchnorm(name):
    assert any(isinstance(m, nn.BatchNorm2d) for m in build_model(name).modules())


def test_unknown_model():
    with pytest.raises(GradstoreError, match="unknown model 'vgg'"):
        build_model("vgg")
