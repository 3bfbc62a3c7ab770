"""The papers' models. Every model takes float images (n, 1, 28, 28) in [0, 1] and returns logits (n, 10).

| name | paper | what |
|---|---|---|
| ``mlp-cg`` | Coherent Gradients §2 | 784-2048-10, one hidden layer of ReLUs, Xavier init |
| ``mlp-3x256`` | Coherent Gradients §3 (winsorization) | 784-256-256-256-10 ReLU MLP, Xavier init |
| ``cnn-bn`` | Making Coherence… (coherence by layer) | two conv-BN-ReLU-pool blocks + linear |
| ``resnet-small`` | Making Coherence… | a stem, two BN residual blocks, a strided block, linear |
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from gradstore.errors import GradstoreError

N_CLASSES = 10


def _xavier(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model


def mlp(hidden: tuple[int, ...]) -> nn.Sequential:
    """A ReLU MLP 784-hidden-10 with Xavier-uniform weights and zero biases."""
    widths = (28 * 28, *hidden, N_CLASSES)
    layers: list[nn.Module] = [nn.Flatten()]
    for k, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if k < len(widths) - 2:
            layers.append(nn.ReLU())
    return _xavier(nn.Sequential(*layers))


def small_cnn(channels: tuple[int, int] = (16, 32)) -> nn.Sequential:
    """conv3x3-BN-ReLU-maxpool twice (28→14→7), then a linear classifier."""
    c1, c2 = channels
    return _xavier(
        nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1, bias=False),
            nn.BatchNorm2d(c1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1, bias=False),
            nn.BatchNorm2d(c2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(c2 * 7 * 7, N_CLASSES),
        )
    )


class BasicBlock(nn.Module):
    """Two conv3x3-BN layers with an identity (or 1x1-conv-BN) shortcut, ReLU after the sum."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A CPU-sized ResNet: stem (16 ch, 28×28), a block at 16 ch, a strided block to 32 ch (14×14)."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.block1 = BasicBlock(width, width)
        self.block2 = BasicBlock(width, 2 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "mlp-cg": lambda: mlp((2048,)),
    "mlp-3x256": lambda: mlp((256, 256, 256)),
    "cnn-bn": small_cnn,
    "resnet-small": lambda: _xavier(SmallResNet()),
}


def build_model(name: str, *, seed: int = 0) -> nn.Module:
    """Build model ``name`` with weights drawn from a generator seeded by ``seed`` (global RNG untouched)."""
    if name not in MODELS:
        raise GradstoreError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name]()
